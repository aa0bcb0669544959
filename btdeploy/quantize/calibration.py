"""Calibration batches for INT8 and FP16 range analysis, made by the checkpoint's own processor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest
from btdeploy.errors import BtDeployError
from btdeploy.model import media
from btdeploy.model.configs import max_text_length
from btdeploy.model.inputs import sample_inputs
from btdeploy.progress import say, warn

# Rows run one at a time (btdeploy/quantize/tensor_ranges.py), so memory does not grow with the
# count; each row costs about a second of calibration on base.
DEFAULT_CALIB_SIZE = 16
CALIB_TEXT_LENGTH = 40  # the profiles' optimum text length; shorter captions are padded to it


@dataclass
class CalibrationData:
    feeds: dict[str, np.ndarray]  # name -> [size, ...], padded to one text length
    source: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest

    @property
    def size(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])


def load_calibration(
    manifest: Manifest, images: Path | None, texts: Path | None, size: int = DEFAULT_CALIB_SIZE
) -> CalibrationData:
    """`size` image-caption pairs through the processor, or generated inputs (with a loud warning)."""
    if size < 1:
        raise BtDeployError(f"--calib-size {size} must be at least 1")
    config = manifest.config
    length = min(CALIB_TEXT_LENGTH, max_text_length(config))
    if images is None and texts is None:
        warn(
            f"no calibration data given (--calib-images DIR --calib-texts FILE): calibrating {manifest.head} on "
            f"{size} GENERATED inputs (random pixels and token ids). Ranges from real images and captions differ; "
            "quantize again with real data before shipping."
        )
        feeds = sample_inputs(config, size, length, seed=1234)
        return CalibrationData(
            feeds, {"kind": "generated", "size": size, "text_length": length, "warning": "not real data"}
        )
    if images is None or texts is None:
        raise BtDeployError("give both --calib-images DIR and --calib-texts FILE, or neither")
    image_files = media.image_files(Path(images), "--calib-images")
    captions = media.read_captions(Path(texts), "--calib-texts")
    processor = media.export_processor(manifest)
    pictures = [media.load_image(image_files[i % len(image_files)], processor.image_processor) for i in range(size)]
    lines = [captions[i % len(captions)] for i in range(size)]
    say(f"calibration: {size} pairs from {len(image_files)} images and {len(captions)} captions, length {length}")
    feeds = media.pair_inputs(processor, pictures, lines, padding="max_length", truncation=True, max_length=length)
    source = {
        "kind": "files",
        "images": str(images),
        "texts": str(texts),
        "image_files": len(image_files),
        "captions": len(captions),
        "size": size,
        "text_length": length,
    }
    return CalibrationData(feeds, source)
