"""Images and captions named on the command line: folders of images, caption files, one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from btdeploy.errors import BtDeployError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def image_files(folder: Path, option: str) -> list[Path]:
    """The images in a folder, sorted by name; `option` names the flag in the errors."""
    if not folder.is_dir():
        raise BtDeployError(f"{option} {folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BtDeployError(f"{option} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_captions(path: Path, option: str) -> list[str]:
    """One caption per non-blank line."""
    if not path.is_file():
        raise BtDeployError(f"{option} {path} is not a file: give a text file with one caption per line")
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not lines:
        raise BtDeployError(f"{option} {path} has no captions: put one caption per line")
    return lines


def load_image(path: Path) -> Any:
    """An RGB PIL image, read fully so the file is closed."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise BtDeployError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise BtDeployError(f"image {path} cannot be read ({error}): remove it or replace it") from None
