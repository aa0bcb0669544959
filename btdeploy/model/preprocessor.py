"""The export's processor read without transformers: its tokenizer through the `tokenizers`
library and its image processor in numpy and PIL, as transformers' BridgeTowerProcessor computes
them without torchvision (its PIL backend). transformers' import brings torch: 3 s and 340 MB
before `run`, `rank` or a serve gateway could read one text, for a model that runs on ONNX
Runtime or OpenVINO.

`unread_setting` says what in a processor folder this reading does not cover (another tokenizer
model, a size given as height and width, ...); `media.export_processor` reads such a folder with
transformers instead. The subset of transformers' calling convention here is the one btdeploy
calls: `processor(images, text, padding=..., return_tensors="np")`, `processor.tokenizer(...)`,
`tokenizer.decode`, `mask_token`, `processor.image_processor(images=...)` and its `size`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.errors import BtDeployError

PROCESSOR_CONFIG = "processor_config.json"
LEGACY_IMAGE_CONFIG = "preprocessor_config.json"  # where older checkpoints keep the image settings
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# BridgeTower's image processor caps the longer side at this multiple of the shorter one.
LONGER_OVER_SHORTER = 1333 / 800

# The image processor settings read here; any other set (not None) leaves the folder to transformers.
IMAGE_SETTINGS = frozenset(
    {
        "crop_size", "do_center_crop", "do_normalize", "do_pad", "do_rescale", "do_resize", "image_mean",
        "image_processor_type", "image_std", "processor_class", "resample", "rescale_factor", "size", "size_divisor",
    }
)  # fmt: skip
# transformers' BridgeTower image processor classes; the torchvision one computes its resize otherwise.
IMAGE_PROCESSOR_TYPES = ("BridgeTowerImageProcessor", "BridgeTowerImageProcessorPil")
TOKENIZER_CLASSES = ("RobertaTokenizer", "RobertaTokenizerFast")
# The settings BridgeTowerProcessor's own call forces on, whatever the image processor's file says:
# a file that turns one off is left to transformers rather than read either way.
FORCED_ON = ("do_center_crop", "do_normalize")
NO_LIMIT = int(1e30)  # transformers' model_max_length when a tokenizer names none


def resized_size(width: int, height: int, shorter: int, longer: int, divisor: int) -> tuple[int, int]:
    """(width, height) after BridgeTower's resize: the shorter side scaled to `shorter`, the
    longer one capped at `longer`, both rounded down to multiples of `divisor`."""
    scale = shorter / min(width, height)
    new_width, new_height = (scale * width, float(shorter)) if height < width else (float(shorter), scale * height)
    if max(new_width, new_height) > longer:
        cap = longer / max(new_width, new_height)
        new_width, new_height = cap * new_width, cap * new_height
    return int(new_width + 0.5) // divisor * divisor, int(new_height + 0.5) // divisor * divisor


def _edge(value: Any) -> int | None:
    """A size setting's one side: an int, or {"shortest_edge": n}; None for any other form."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and set(value) == {"shortest_edge"} and isinstance(value["shortest_edge"], int):
        return int(value["shortest_edge"])
    return None


def settings_files(folder: Path) -> dict[str, Any]:
    """Every JSON file of a processor folder, parsed once, by file name; the first that does not
    parse refused, named, with what to do."""
    files = {}
    for path in sorted(folder.glob("*.json")):
        try:
            files[path.name] = json.loads(path.read_bytes())
        except (OSError, ValueError) as error:
            raise BtDeployError(
                f"{path} is damaged ({error}): export the head again, or copy the checkpoint's processor files there"
            ) from None
    return files


def _settings_object(files: dict[str, Any], folder: Path, name: str) -> dict[str, Any] | None:
    """The settings a parsed file holds, None where there is no such file."""
    if name not in files:
        return None
    if not isinstance(files[name], dict):
        raise BtDeployError(f"{folder / name} holds no settings object: export the head again")
    return dict(files[name])


def image_settings(folder: Path, files: dict[str, Any]) -> dict[str, Any] | None:
    """The image processor's settings as transformers finds them (processor_config.json's
    "image_processor", else preprocessor_config.json), or None where neither file has them."""
    combined = _settings_object(files, folder, PROCESSOR_CONFIG)
    if combined is not None and isinstance(combined.get("image_processor"), dict):
        return dict(combined["image_processor"])
    return _settings_object(files, folder, LEGACY_IMAGE_CONFIG)


def unread_setting(folder: Path, files: dict[str, Any] | None = None) -> str | None:
    """What in the processor folder this module does not read as transformers would, or None
    where it reads all of it (`files`: the folder's `settings_files`, where already parsed)."""
    files = settings_files(folder) if files is None else files
    settings = image_settings(folder, files)
    if settings is None:
        return "no image processor settings"
    kind = settings.get("image_processor_type")
    if kind not in IMAGE_PROCESSOR_TYPES:
        return f"image processor {kind!r}"
    unknown = sorted(key for key, value in settings.items() if key not in IMAGE_SETTINGS and value is not None)
    if unknown:
        return f"image processor settings {', '.join(unknown)}"
    for key in ("size", "crop_size"):
        if key in settings and _edge(settings[key]) is None:
            return f"{key} {settings[key]!r} (read here: a shortest edge)"
    if settings.get("resample", 3) not in range(6):
        return f"resample {settings.get('resample')!r}"
    for key in FORCED_ON:
        if settings.get(key) is False:
            return f"{key} false"
    tokenizer = _settings_object(files, folder, TOKENIZER_FILE)
    if tokenizer is None:
        return f"no {TOKENIZER_FILE}"
    config = _settings_object(files, folder, TOKENIZER_CONFIG) or {}
    if config.get("tokenizer_class", TOKENIZER_CLASSES[0]) not in TOKENIZER_CLASSES:
        return f"tokenizer {config.get('tokenizer_class')!r}"
    model = tokenizer.get("model")
    model_type = model.get("type") if isinstance(model, dict) else None
    if model_type != "BPE":  # transformers' decode cleans up spaces for the other models
        return f"tokenizer model {model_type!r}"
    return None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """The tokenizer of tokenizer.json with tokenizer_config.json's special tokens, length and
    padding side: ids as transformers' fast tokenizer makes them."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        """`config`: tokenizer_config.json's settings ({} where there is none)."""
        from tokenizers import Tokenizer

        path = folder / TOKENIZER_FILE
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
            raise BtDeployError(
                f"{path} cannot be read as a tokenizer ({' '.join(str(error).split())}): export the head again, "
                "or copy the checkpoint's processor files there"
            ) from None
        backend.no_padding()  # padding and truncation are done per call below, not in the shared backend,
        backend.no_truncation()  # so threads that tokenize at once do not set them for each other
        self._backend = backend
        # RobertaTokenizer's own defaults where the file names none
        self.mask_token = _token_text(config.get("mask_token", "<mask>"))
        self.pad_token = _token_text(config.get("pad_token", "<pad>"))
        self.mask_token_id = self._id_of(self.mask_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.model_max_length = int(config.get("model_max_length") or NO_LIMIT)
        self.padding_side = str(config.get("padding_side") or "right")
        self._added_per_text = backend.num_special_tokens_to_add(False)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,  # noqa: ARG002 - transformers' warning of a long text; btdeploy's callers refuse it
    ) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(item, str) for item in texts):
            raise BtDeployError("texts must be strings")
        if truncation and max_length is None:
            max_length = self.model_max_length
        if truncation:
            assert max_length is not None
            encodings = self._backend.encode_batch(texts, add_special_tokens=False)
            for encoding in encodings:
                encoding.truncate(max(max_length - self._added_per_text, 0))
            encodings = [self._backend.post_process(encoding) for encoding in encodings]
        else:
            encodings = self._backend.encode_batch(texts, add_special_tokens=True)
        ids = [list(encoding.ids) for encoding in encodings]
        masks = [[1] * len(row) for row in ids]
        width = self._padded_width(ids, padding, max_length)
        if width is not None:
            ids = [self._pad(row, width, self._pad_id()) for row in ids]
            masks = [self._pad(row, width, 0) for row in masks]
        if return_tensors is None:
            return {"input_ids": ids[0] if isinstance(text, str) else ids,
                    "attention_mask": masks[0] if isinstance(text, str) else masks}  # fmt: skip
        if return_tensors != "np":
            raise BtDeployError(f"return_tensors={return_tensors!r}: btdeploy's processor returns numpy arrays ('np')")
        if len({len(row) for row in ids}) > 1:
            raise BtDeployError(
                "texts of different lengths make no one array: pad them (padding=True), or truncate them "
                "(truncation=True) where one is longer than max_length"
            )
        return {"input_ids": np.asarray(ids, dtype=np.int64), "attention_mask": np.asarray(masks, dtype=np.int64)}

    def _padded_width(self, ids: list[list[int]], padding: bool | str, max_length: int | None) -> int | None:
        if padding is True or padding == "longest":
            return max((len(row) for row in ids), default=0)
        if padding == "max_length":
            return max_length if max_length is not None else self.model_max_length
        if padding is False or padding == "do_not_pad":
            return None
        raise BtDeployError(f"padding={padding!r}: give True, 'longest', 'max_length' or False")

    def _pad_id(self) -> int:
        if self.pad_token_id is None:
            raise BtDeployError("the tokenizer has no pad token, so texts of different lengths cannot be padded")
        return self.pad_token_id

    def _pad(self, row: list[int], width: int, value: int) -> list[int]:
        fill = [value] * max(width - len(row), 0)
        return fill + row if self.padding_side == "left" else row + fill

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids` (BPE's decode; transformers skips its space clean-up for BPE)."""
        return str(self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))


@dataclass(frozen=True)
class ImagePreprocessor:
    """BridgeTower's image processing: the shorter side resized (bicubic by default) with the
    longer capped and both rounded to `size_divisor`, center-cropped to `crop_size` (padded with
    zeros where the resized image is smaller), rescaled, normalised, padded to the batch's largest."""

    size: dict[str, int]
    crop_size: dict[str, int]
    size_divisor: int = 32
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_pad: bool = True

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> ImagePreprocessor:
        size = _edge(settings.get("size", 288))
        crop = _edge(settings.get("crop_size", size))
        assert size is not None and crop is not None  # unread_setting refuses any other form
        chosen = {
            key: settings[key]
            for key in cls.__dataclass_fields__
            if settings.get(key) is not None and key not in ("size", "crop_size")
        }
        for key in ("image_mean", "image_std"):
            if key in chosen:
                chosen[key] = tuple(float(v) for v in chosen[key])
        return cls(size={"shortest_edge": size}, crop_size={"shortest_edge": crop}, **chosen)

    def __call__(self, images: Any = None, return_tensors: str | None = "np") -> dict[str, np.ndarray]:
        """pixel_values and pixel_mask of the pictures, as arrays (`return_tensors` None or "np")."""
        if return_tensors not in (None, "np"):
            raise BtDeployError(f"return_tensors={return_tensors!r}: btdeploy's processor returns numpy arrays ('np')")
        pictures = list(images) if isinstance(images, (list, tuple)) else [images]
        if not pictures:
            raise BtDeployError("give at least one image")
        rows = [self._one(picture) for picture in pictures]
        if not self.do_pad:
            if len({row.shape for row in rows}) > 1:
                raise BtDeployError("images of different sizes need do_pad to make one array")
            return {"pixel_values": np.stack(rows)}
        height = max(row.shape[1] for row in rows)
        width = max(row.shape[2] for row in rows)
        values = np.zeros((len(rows), 3, height, width), dtype=rows[0].dtype)
        mask = np.zeros((len(rows), height, width), dtype=np.int64)
        for index, row in enumerate(rows):
            values[index, :, : row.shape[1], : row.shape[2]] = row
            mask[index, : row.shape[1], : row.shape[2]] = 1
        return {"pixel_values": values, "pixel_mask": mask}

    def _one(self, picture: Any) -> np.ndarray:
        """One RGB picture (PIL, or a height x width x 3 uint8 array) as channels x height x width."""
        from PIL import Image

        if isinstance(picture, np.ndarray):
            if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[-1] != 3:
                raise BtDeployError(
                    f"an image array must be height x width x 3 uint8 RGB, not {picture.shape} {picture.dtype}"
                )
            picture = Image.fromarray(picture)
        if not isinstance(picture, Image.Image) or picture.mode != "RGB":
            raise BtDeployError(f"images must be RGB pictures (PIL, or uint8 arrays), not {picture!r:.60}")
        if self.do_resize:
            shorter = self.size["shortest_edge"]
            width, height = resized_size(
                picture.width, picture.height, shorter, int(LONGER_OVER_SHORTER * shorter), self.size_divisor
            )
            if min(width, height) < 1:
                raise BtDeployError(
                    f"a {picture.width}x{picture.height} image resizes to {width}x{height} pixels: crop or pad it "
                    "nearer to square"
                )
            picture = picture.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(picture)
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["shortest_edge"])
        values: np.ndarray = pixels
        if self.do_rescale:
            values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            values = values.astype(np.float32, copy=False)
            values = (values - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(values.transpose(2, 0, 1))


def _center_crop(pixels: np.ndarray, side: int) -> np.ndarray:
    """The middle side x side of height x width x channels pixels, zeros around an image smaller
    than that (transformers' center_crop, top and left rounded the same way)."""
    height, width = pixels.shape[:2]
    top, left = (height - side) // 2, (width - side) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + side, left : left + side]
    padded_height, padded_width = max(side, height), max(side, width)
    top_pad, left_pad = -(-(padded_height - height) // 2), -(-(padded_width - width) // 2)
    padded = np.zeros((padded_height, padded_width, pixels.shape[2]), dtype=pixels.dtype)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(padded_height, top + side), max(0, left) : min(padded_width, left + side)]


class Preprocessor:
    """The processor folder export wrote, called as transformers' BridgeTowerProcessor is."""

    def __init__(self, tokenizer: TextTokenizer, image_processor: ImagePreprocessor) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_folder(cls, folder: Path, files: dict[str, Any] | None = None) -> Preprocessor:
        """`files`: the folder's `settings_files`, where already parsed."""
        files = settings_files(folder) if files is None else files
        settings = image_settings(folder, files)
        assert settings is not None  # unread_setting says so first
        config = _settings_object(files, folder, TOKENIZER_CONFIG) or {}
        return cls(TextTokenizer(folder, config), ImagePreprocessor.from_settings(settings))

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "np",
    ) -> dict[str, Any]:
        if images is None and text is None:
            raise BtDeployError("give images, text or both")
        encoding: dict[str, Any] = {}
        if text is not None:
            encoding |= self.tokenizer(text, padding, truncation, max_length, return_tensors)
        if images is not None:
            encoding |= self.image_processor(images, return_tensors)
        return encoding


# What export feeds both readings of a processor it writes (`disagreement`): texts with the mask
# token, punctuation and characters past ASCII, and two pictures, one long and one small.
PROBE_TEXTS = ("a photo of a {mask} on a table.", "  Ünïcödé ✓ text, twice  spaced {mask}", "x")


def _probe_pictures(side: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    long = rng.integers(0, 256, (3 * side, 4 * side + 7, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (side // 2 + 3, side // 2 + 1, 3), dtype=np.uint8)
    return [Image.fromarray(long), Image.fromarray(small)]


def disagreement(folder: Path, reference: Any) -> str | None:
    """Where this module's reading of `folder` differs from `reference` (transformers'
    BridgeTowerProcessor of the same folder) on a probe of texts and pictures, or None where
    every pixel and id is the same. Export asks it of each processor it writes."""
    ours = Preprocessor.from_folder(folder)
    mask = ours.tokenizer.mask_token or ""
    texts = [text.format(mask=mask) for text in PROBE_TEXTS]
    mine = ours(_probe_pictures(ours.image_processor.crop_size["shortest_edge"]), texts, padding=True)
    theirs = reference(_probe_pictures(ours.image_processor.crop_size["shortest_edge"]), texts, padding=True,
                       return_tensors="np")  # fmt: skip
    for name in sorted(set(mine) | set(theirs)):
        if name not in mine or name not in theirs:
            return f"{name} made by one reading only"
        if mine[name].shape != np.shape(theirs[name]) or not np.array_equal(mine[name], theirs[name]):
            return f"its {name} differ from transformers'"
    for row in mine["input_ids"].tolist():
        if ours.tokenizer.decode(row) != reference.tokenizer.decode(row):
            return "its decoded texts differ from transformers'"
    return None
