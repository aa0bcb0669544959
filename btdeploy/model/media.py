"""Images and captions named on the command line: folders of images, caption files, one image."""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest
from btdeploy.errors import BtDeployError
from btdeploy.imports import serial_imports
from btdeploy.model.preprocessor import (
    LONGER_OVER_SHORTER,
    Preprocessor,
    resized_size,
    settings_files,
    unread_setting,
)
from btdeploy.progress import RowProgress, say

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_files(folder: Path, option: str) -> list[Path]:
    """The images in a folder, sorted by name; `option` names the flag in the errors."""
    if not folder.is_dir():
        raise BtDeployError(f"{option} {folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if _is_image_file(p))
    if not files:
        nested = sum(1 for p in folder.rglob("*") if _is_image_file(p))
        where = f" (it has {nested} in its subfolders: btdeploy reads the folder's own files, not its subfolders)"
        raise BtDeployError(f"{option} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}){where if nested else ''}")
    return files


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def read_captions(path: Path, option: str) -> list[str]:
    """One caption per non-blank line."""
    if not path.is_file():
        raise BtDeployError(f"{option} {path} is not a file: give a text file with one caption per line")
    data = path.read_bytes()
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))  # as Windows editors save "Unicode"
    if not utf16 and b"\x00" in data[:65536]:  # text has no NUL bytes; images and archives do
        raise BtDeployError(f"{option} {path} is not a text file (it holds binary data): give one caption per line")
    try:
        text = data.decode("utf-16" if utf16 else "utf-8-sig")  # a byte-order mark is not part of the first caption
    except UnicodeDecodeError as error:
        # Replacing the bytes would score, check or calibrate on captions nobody wrote.
        if utf16:
            raise BtDeployError(
                f"{option} {path} starts as UTF-16 but is cut or damaged ({error.reason}): save it again"
            ) from None
        line = data[: error.start].count(b"\n") + 1
        raise BtDeployError(
            f"{option} {path} is not UTF-8: line {line} holds {data[error.start : error.end]!r} "
            f"({error.reason}); save the file as UTF-8 (an old editor may have saved it as Latin-1 or Windows-1252)"
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise BtDeployError(f"{option} {path} has no captions: put one caption per line")
    return lines


def paired_files(
    images: Path | None, texts: Path | None, options: tuple[str, str]
) -> tuple[list[Path], list[str]] | None:
    """A folder of images and a captions file given together, read (`image_files`, `read_captions`),
    or None where neither is; half a pair is refused. `options` name the two flags in the errors."""
    images_option, texts_option = options
    if images is None and texts is None:
        return None
    if images is None or texts is None:
        raise BtDeployError(f"give both {images_option} DIR and {texts_option} FILE, or neither")
    return image_files(Path(images), images_option), read_captions(Path(texts), texts_option)


# EXIF orientations (tag 0x0112) that turn the stored image a quarter: width and height swap.
_QUARTER_TURNS = {5, 6, 7, 8}


def upright_size(image: Any) -> tuple[int, int]:
    """(width, height) as the image is shown, from its header alone (before decoding)."""
    turned = image.getexif().get(0x0112) in _QUARTER_TURNS
    return (image.height, image.width) if turned else (image.width, image.height)


def depth_problem(image: Any) -> str | None:
    """Why an image's pixels have no one reading as 8-bit colour, or None. PIL's RGB conversion
    clips every value to 0..255: a float image in 0..1 became black. 16-bit images are read
    (`upright_rgb`); 32-bit integer pixels within 0..255 are 8-bit values stored wide."""
    if image.mode == "F":
        return (
            "holds floating-point pixels (PIL mode F), which have no fixed scale (0..1 or 0..255): "
            "save it with 8 or 16 bits per channel"
        )
    if image.mode == "I":
        low, high = image.getextrema()
        if low < 0 or high > 255:
            return (
                f"holds 32-bit pixels from {low} to {high} (PIL mode I), past the 0..255 of 8-bit colour: "
                "save it with 8 or 16 bits per channel"
            )
    return None


def upright_rgb(image: Any) -> Any:
    """The decoded image as it is shown: turned as its EXIF orientation says (a phone stores a
    portrait photo sideways with a tag), 16-bit grey scaled to 8 bits, transparency over white,
    then RGB; what image viewers show. Without the turn a photo reached the model on its side; without the scaling
    (PIL's conversion, and transformers' `load_image`, clip every 16-bit value past 255) a 16-bit
    scan reached it white."""
    from PIL import Image, ImageOps

    upright = ImageOps.exif_transpose(image)
    if upright.mode.startswith("I;16"):
        levels = np.rint(np.asarray(upright, dtype=np.float64) / 257.0)  # 65535 -> 255
        upright = Image.fromarray(levels.astype(np.uint8), "L")
    if "A" in upright.getbands() or upright.info.get("transparency") is not None:
        # Over white, as a page shows it (and transformers' convert_to_rgb): dropping the alpha
        # kept whatever colour the file holds under transparent pixels, often black.
        rgba = upright.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return upright.convert("RGB")


@contextmanager
def _opened_image(path: Path) -> Iterator[Any]:
    """The image file opened, its header read and its pixels not yet decoded; whatever fails in the
    block, opening or decoding, is one line naming the image."""
    from PIL import Image, UnidentifiedImageError

    if str(path).startswith(("http:/", "https:/")):  # a Path has already folded "://" into ":/"
        url = str(path).replace(":/", "://", 1)  # named as the user wrote it
        raise BtDeployError(f"image {url} is a URL: btdeploy reads local files, download it first")
    if path.is_dir():
        raise BtDeployError(f"image {path} is a folder: give one image file (rank --images takes a folder)")
    try:
        with warnings.catch_warnings():
            # PIL's own warning (from inside PIL, once) becomes one line naming the image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            yield image
    except FileNotFoundError:
        raise BtDeployError(f"image {path} does not exist") from None
    except Image.DecompressionBombError as error:
        limit = str(error).rstrip(".")
        raise BtDeployError(f"image {path} is too large to decode ({limit}): shrink it first") from None
    except (UnidentifiedImageError, OSError) as error:
        raise BtDeployError(
            f"image {path} cannot be read ({error}): "
            "give an image PIL reads (JPEG, PNG, ...); if it is one of a folder of images, move it out"
        ) from None


def load_image(path: Path, image_processor: Any = None) -> Any:
    """An RGB PIL image, read fully so the file is closed; with `image_processor`, refused here
    if that processor cannot resize it (`resize_problem`)."""
    from PIL import Image

    with _opened_image(path) as image:
        warned_past = Image.MAX_IMAGE_PIXELS  # None where the program turned PIL's check off
        if warned_past is not None and image.width * image.height > warned_past:
            say(
                f"image {path} is {image.width}x{image.height} ({image.width * image.height:,} "
                "pixels): decoding and resizing it take seconds and gigabytes, for a model that sees it "
                "shrunk to its image size; shrink it first where speed matters"
            )
        depth = depth_problem(image)
        if depth:
            raise BtDeployError(f"image {path} {depth}")
        picture = upright_rgb(image)
    problem = None if image_processor is None else resize_problem(picture.width, picture.height, image_processor)
    if problem:
        raise BtDeployError(f"image {path} {problem}")
    return picture


# Past this many images, checking their headers takes seconds: it says how far it got.
HEADERS_WITH_PROGRESS = 2000


def require_readable_images(paths: Sequence[Path], what: str) -> None:
    """Each image's file opened and its header read, without decoding its pixels: a missing,
    unreadable or non-image file refused before any model loads, where decoding it when its
    batch comes had refused it after seconds of loading or minutes of work. `what` names the
    images in the progress line of a large folder."""
    progress = RowProgress(len(paths), f"{what}: reading the headers") if len(paths) >= HEADERS_WITH_PROGRESS else None
    for path in paths:
        with _opened_image(Path(path)):
            pass
        if progress:
            progress.advance()


def resize_problem(width: int, height: int, image_processor: Any) -> str | None:
    """Why the checkpoint's image processor cannot take a width x height image, or None.

    An image far longer than it is wide (a banner, a strip) resizes to a side of 0 pixels, and
    transformers fails deep inside its resize; the limit is about 15:1 at base's 288 pixels and
    3.4:1 at the tiny preset's 64.
    """
    if width < 1 or height < 1:
        return f"is {width}x{height} pixels: it has no pixels to read; replace it"
    if not getattr(image_processor, "do_resize", True):
        return None
    size = image_processor.size
    shorter = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    if not shorter:
        return None  # not BridgeTower's shorter-side resize: nothing known to refuse
    divisor = int(getattr(image_processor, "size_divisor", None) or 1)
    longer = int(LONGER_OVER_SHORTER * int(shorter))
    if min(resized_size(width, height, int(shorter), longer, divisor)) > 0:
        return None
    return (
        f"is {width}x{height} pixels, more than {longer / (divisor - 0.5):.1f} times as long as it is wide: the "
        f"checkpoint's processor would resize its shorter side to 0 pixels (it scales that side to {shorter}, "
        f"caps the longer at {longer} and rounds both down to multiples of {divisor}); crop or pad it nearer "
        "to square"
    )


def text_length_problem(tokenizer: Any, texts: list[str], limit: int, chunk: int = 256) -> str | None:
    """Why one of the texts cannot be taken whole, or None: the first text longer than the model's
    `limit` tokens. A text is refused rather than cut, since a cut text gets another answer.
    Tokenized `chunk` texts at a time, so a long captions file does not sit in memory as ids;
    quietly (`verbose=False`), since the refusal says what the tokenizer's warning would."""
    for start in range(0, len(texts), chunk):
        lengths = [len(ids) for ids in tokenizer(texts[start : start + chunk], verbose=False)["input_ids"]]
        for offset, length in enumerate(lengths):
            if length > limit:
                index = start + offset
                text = texts[index]
                preview = text[:40] + ("..." if len(text) > 40 else "")
                return (
                    f"text {index + 1} of {len(texts)} ({preview!r}) is {length} tokens, longer than the model's "
                    f"{limit}: shorten it"
                )
    return None


def image_size_problem(image_processor: Any, image_size: int) -> str | None:
    """Why a checkpoint's image processor cannot feed the model, or None: its pixel_values for a
    4:3 photo must be the model's image_size square (vision_config.image_size; the graphs take that
    size alone). A processor_config.json edited for another model had passed export, and every
    image was then refused at run time with advice to use that same processor."""
    from PIL import Image

    photo = Image.new("RGB", (4 * image_size, 3 * image_size), (128, 128, 128))
    made = tuple(np.asarray(image_processor(images=[photo], return_tensors="np")["pixel_values"]).shape[-2:])
    if made == (image_size, image_size):
        return None
    return (
        f"no usable processor: its image processor makes {made[0]}x{made[1]} pixel_values of a 4:3 image, and "
        f"the model takes {image_size}x{image_size} (vision_config.image_size): set size and crop_size to "
        f'{{"shortest_edge": {image_size}}} and do_center_crop to true in processor_config.json '
        "(or preprocessor_config.json)"
    )


def require_processor(manifest: Manifest) -> Path:
    """The processor folder export copied beside the head, or a refusal saying why there is none or
    which of its files is damaged (cheap, and said before a server starts): each JSON file parsed,
    and read whole where btdeploy reads it (a tokenizer.json that parses but is no tokenizer)."""
    folder, files = _parsed_processor_folder(manifest)
    if not read_by_transformers(manifest, files):
        Preprocessor.from_folder(folder, files)
    return folder


def _parsed_processor_folder(manifest: Manifest) -> tuple[Path, dict[str, Any]]:
    """The processor folder and each of its JSON files, parsed once (the damaged one named)."""
    folder = _processor_folder(manifest)
    return folder, settings_files(folder)


def has_processor(manifest: Manifest) -> bool:
    """Whether export copied the checkpoint's processor beside the head (a checkpoint saved without
    one has none)."""
    return manifest.processor_dir.is_dir()


def _processor_folder(manifest: Manifest) -> Path:
    if not has_processor(manifest):
        why = manifest.data.get("processor_problem")
        raise BtDeployError(
            f"{manifest.folder} has no processor/ folder"
            + (f" (the checkpoint had {why})" if why else "")
            + ": export from a checkpoint that has one"
        )
    return manifest.processor_dir


def _damaged_processor_file(folder: Path) -> str | None:
    """Which of the processor's JSON files does not parse, and what to do, or None."""
    try:
        settings_files(folder)
    except BtDeployError as error:
        return str(error)
    return None


def export_processor(manifest: Manifest) -> Any:
    """The checkpoint's processor, as export copied it beside the head: read by btdeploy's own
    `Preprocessor` (no transformers, so no torch: seconds and hundreds of MB less for every
    command and server that only runs graphs), or by transformers' BridgeTowerProcessor where
    `read_by_transformers` says why."""
    folder, files = _parsed_processor_folder(manifest)
    if read_by_transformers(manifest, files):
        return transformers_processor(folder)
    return Preprocessor.from_folder(folder, files)


def read_by_transformers(manifest: Manifest, files: dict[str, Any] | None = None) -> str | None:
    """Why the head's processor folder is read with transformers rather than btdeploy's own
    reading, or None: export found the readings differ, or the folder holds a setting that
    reading does not cover (copied there by hand after export, say). `files`: the folder's
    parsed JSON files, where already read."""
    return manifest.processor_read_by_transformers or unread_setting(manifest.processor_dir, files)


def transformers_processor(folder: Path) -> Any:
    """transformers' BridgeTowerProcessor of a processor folder, a damaged file named."""
    with serial_imports():
        from transformers import BridgeTowerProcessor

    try:
        return BridgeTowerProcessor.from_pretrained(folder)
    except Exception as error:  # transformers raises many types for a damaged or edited file
        # The files are parsed on their own only now, to name the one that is cut short.
        raise BtDeployError(
            _damaged_processor_file(folder)
            or f"{folder} cannot be read as the head's processor ({' '.join(str(error).split())}): "
            "export the head again, or copy the checkpoint's processor files there"
        ) from None


def processor_if_any(manifest: Manifest) -> Any | None:
    """The export's processor, or None where the checkpoint had none (a damaged one is still
    refused): generated inputs draw synthetic scenes through it, and keep to noise without it."""
    return export_processor(manifest) if has_processor(manifest) else None


def pair_inputs(processor: Any, pictures: list[Any], texts: list[str], **text_options: Any) -> dict[str, np.ndarray]:
    """The head's inputs for (image, text) pairs, preprocessed as the checkpoint's processor does
    (texts padded to the longest unless `text_options` say otherwise), in the graph's dtypes."""
    return {**text_inputs(processor, texts, **text_options), "pixel_values": image_inputs(processor, pictures)}


def text_inputs(processor: Any, texts: list[str], **text_options: Any) -> dict[str, np.ndarray]:
    """input_ids and attention_mask of texts, as pair_inputs makes them."""
    encoding = processor(text=texts, return_tensors="np", **({"padding": True} | text_options))
    return {
        "input_ids": np.asarray(encoding["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(encoding["attention_mask"], dtype=np.int64),
    }


def image_inputs(processor: Any, pictures: list[Any]) -> np.ndarray:
    """pixel_values of pictures, as pair_inputs makes them (the processor center-crops every
    image to the checkpoint's size, so batches made apart join)."""
    return np.asarray(processor(images=pictures, return_tensors="np")["pixel_values"], dtype=np.float32)
