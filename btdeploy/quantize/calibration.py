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


def _refuse_rows_past_memory(size: int, config: Any, length: int) -> None:
    """The rows are held in memory while they run one at a time: a count whose inputs alone would
    take more than half of the memory available is refused here, not killed by the kernel later."""
    side = int(config.vision_config.image_size)
    row_bytes = 3 * side * side * 4 + 2 * length * 8  # float32 pixels, int64 ids and mask
    needed = size * row_bytes
    available = _available_memory()
    if available is None:
        return  # not Linux: nothing to measure against
    if needed > available / 2:
        raise BtDeployError(
            f"--calib-size {size} holds {needed / 2**30:.1f} GB of inputs in memory, more than half of the "
            f"{available / 2**30:.1f} GB available: use fewer rows"
        )


def _available_memory() -> int | None:
    """MemAvailable (free memory plus what the page cache would give back), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_calibration(
    manifest: Manifest, images: Path | None, texts: Path | None, size: int = DEFAULT_CALIB_SIZE
) -> CalibrationData:
    """`size` image-caption pairs through the processor, or generated inputs (with a loud warning)."""
    if size < 1:
        raise BtDeployError(f"--calib-size {size} must be at least 1")
    config = manifest.config
    length = min(CALIB_TEXT_LENGTH, max_text_length(config))
    _refuse_rows_past_memory(size, config, length)
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
