"""Calibration batches for INT8 and FP16 range analysis, made by the checkpoint's own processor."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.files import sha256_of, sha256_of_json
from btdeploy.artifacts.manifest import Manifest
from btdeploy.errors import BtDeployError
from btdeploy.model import media
from btdeploy.model.configs import max_text_length
from btdeploy.model.inputs import sample_inputs
from btdeploy.model.scenes import NOISE_ALONE, put_scenes
from btdeploy.progress import RowProgress, say, warn

# Rows run one at a time (btdeploy/quantize/tensor_ranges.py), so memory does not grow with the
# count; each row costs about a second of calibration on base.
DEFAULT_CALIB_SIZE = 16
CALIB_TEXT_LENGTH = 40  # the profiles' optimum text length; shorter captions are padded to it
IMAGE_CHUNK = 16  # calibration images decoded at once


@dataclass
class CalibrationData:
    feeds: dict[str, np.ndarray]  # name -> [size, ...], padded to one text length
    source: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest


@dataclass(frozen=True)
class CalibrationPlan:
    """What `size` calibration rows will be made from, known before any image is decoded: its
    `source` (with a digest of the images' bytes and the captions the rows read) is what a
    quantized graph records, so a graph is reused only when the same data would calibrate it."""

    manifest: Manifest
    size: int
    length: int
    source: dict[str, Any]
    images: tuple[Path, ...] = ()  # the distinct image files the rows read, in row order
    captions: tuple[str, ...] = ()  # the distinct captions the rows read
    asked: int = 0  # the rows asked for, where the files make fewer distinct pairs than that

    def load(self) -> CalibrationData:
        """The rows, refused up front when they would not fit in memory."""
        require_rows_fit_memory(self.size, self.manifest.config)
        if not self.images:
            return CalibrationData(generated_rows(self.manifest, self.size, self.length), self.source)
        each_once = f" (each pair once: {self.asked} rows would repeat them)" if self.asked > self.size else ""
        say(
            f"calibration: {self.size} pairs from {len(self.images)} images and {len(self.captions)} captions"
            f"{each_once}, length {self.length}"
        )
        processor = media.export_processor(self.manifest)
        rows = np.arange(self.size)
        texts = media.text_inputs(
            processor, [self.captions[i % len(self.captions)] for i in range(self.size)],
            padding="max_length", truncation=True, max_length=self.length,
        )  # fmt: skip
        pixels = _image_rows(processor, self.images)
        return CalibrationData({**texts, "pixel_values": pixels[rows % len(self.images)]}, self.source)


GENERATED_SEED = 1234
GENERATED_IMAGES = "random pixels and synthetic scenes, row by row in turn"


def generated_rows(manifest: Manifest, size: int, length: int) -> dict[str, np.ndarray]:
    """Generated calibration rows: random token ids, and pixels that are random on the even rows
    and a synthetic scene through the checkpoint's processor on the odd ones (model/scenes.py), so
    the ranges cover both noise and what pictures make, as `check`'s generated inputs hold both
    (random on every row where the export has no processor)."""
    feeds = sample_inputs(manifest.config, size, length, seed=GENERATED_SEED)
    processor = media.processor_if_any(manifest)
    return feeds if processor is None else put_scenes(feeds, range(1, size, 2), processor, GENERATED_SEED)


def _image_rows(processor: Any, images: tuple[Path, ...]) -> np.ndarray:
    """Each image once through the processor, IMAGE_CHUNK decoded pictures at a time: a photo
    holds its full size in memory until the processor shrinks it (36 MB for 12 megapixels), so
    the pictures of every row at once had held gigabytes for a few hundred rows."""
    chunks = []
    progress = RowProgress(-(-len(images) // IMAGE_CHUNK), f"calibration images ({IMAGE_CHUNK} at a time)")
    for start in range(0, len(images), IMAGE_CHUNK):
        pictures = [media.load_image(path, processor.image_processor) for path in images[start : start + IMAGE_CHUNK]]
        chunks.append(media.image_inputs(processor, pictures))  # one size: the processor center-crops
        progress.advance()
    return np.concatenate(chunks)


def calibration_rows(size: int, pair: tuple[list[Path], list[str]] | None) -> int:
    """The rows `size` asks for, stopped where a pair would come round again: row k pairs image
    k % a with caption k % b, so the pairs repeat after lcm(a, b) rows, and a repeated pair would
    weigh twice in the ranges and cost a run for nothing. Generated rows are all different."""
    return size if pair is None else min(size, math.lcm(len(pair[0]), len(pair[1])))


def calibration_images(pair: tuple[list[Path], list[str]], size: int) -> list[Path]:
    """The images `size` calibration rows of the user's pairs read (row k: image k % a)."""
    return pair[0][: calibration_rows(size, pair)]


def calibration_length(config: Any) -> int:
    return min(CALIB_TEXT_LENGTH, max_text_length(config))


def require_rows_fit_memory(size: int, config: Any) -> None:
    """The rows' inputs are held in memory while they run one at a time (the fusion graph's text
    and image states are spooled to files, btdeploy/quantize/rows.py): a count whose inputs would
    take more than half of the memory available is refused before any work, not killed by the
    kernel later."""
    side = int(config.vision_config.image_size)
    row_bytes = 3 * side * side * 4 + 2 * calibration_length(config) * 8  # float32 pixels, int64 ids and mask
    needed = size * row_bytes
    available = _available_memory()
    if available is None:
        return  # not Linux: nothing to measure against
    if needed > available / 2:
        raise BtDeployError(
            f"--calib-size {size} holds {needed / 2**30:.1f} GB of calibration inputs in memory, more than half of "
            f"the {available / 2**30:.1f} GB available: use fewer rows"
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


GENERATED_ADVICE = (
    "(random token ids; random pixels, and synthetic scenes where the export has a processor). Ranges from "
    "real images and captions differ; quantize again with real data (--calib-images DIR --calib-texts FILE) "
    "before shipping."
)


def warn_generated(what: str, rows: int | None = None) -> None:
    """The loud warning that `what` is calibrated on generated inputs, not on the user's data."""
    count = f"{rows} " if rows else ""
    warn(f"no calibration data given: {what} is calibrated on {count}GENERATED inputs {GENERATED_ADVICE}")


def require_calib_size(size: int) -> None:
    if size < 1:
        raise BtDeployError(f"--calib-size {size} must be at least 1")


def plan_calibration(
    manifest: Manifest, images: Path | None, texts: Path | None, size: int = DEFAULT_CALIB_SIZE
) -> CalibrationPlan:
    """`size` image-caption pairs from the user's files, or generated inputs (`warn_generated` says
    so, where the rows are used)."""
    require_calib_size(size)
    length = calibration_length(manifest.config)
    pair = media.paired_files(images, texts, ("--calib-images", "--calib-texts"))
    if pair is None:
        pixels = GENERATED_IMAGES if media.has_processor(manifest) else NOISE_ALONE  # as generated_rows draws them
        source = {"kind": "generated", "size": size, "text_length": length, "images": pixels}
        source["warning"] = "not real data"
        return CalibrationPlan(manifest, size, length, source)
    image_files, captions = pair
    asked, size = size, calibration_rows(size, pair)
    used_images, used_captions = tuple(calibration_images(pair, asked)), tuple(captions[:size])
    media.require_readable_images(used_images, "--calib-images")  # before anything is decoded or hashed
    source = {
        "kind": "files",
        "images": str(images),
        "texts": str(texts),
        "image_files": len(image_files),
        "captions": len(captions),
        "size": size,
        "text_length": length,
        # What the rows read, by content: other images or captions under the same names calibrate anew.
        "sha256": sha256_of_json({"images": [_file_sha256(f) for f in used_images], "captions": used_captions}),
    }
    return CalibrationPlan(manifest, size, length, source, used_images, used_captions, asked)


def _file_sha256(path: Path) -> str:
    """An image's sha256, hashed once per process while its size and time stay the same: the
    pipeline plans calibration for every head, flavour and precision from the same files."""
    stat = path.stat()
    return _sha256_of_version(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _sha256_of_version(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_of(path)


def load_calibration(
    manifest: Manifest, images: Path | None, texts: Path | None, size: int = DEFAULT_CALIB_SIZE
) -> CalibrationData:
    """The calibration rows of `plan_calibration`, made at once."""
    return plan_calibration(manifest, images, texts, size).load()
