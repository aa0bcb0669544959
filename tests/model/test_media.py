"""Images and caption files as the user gives them: what the processor cannot take is refused before it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from btdeploy.errors import BtDeployError
from btdeploy.model.media import load_image, read_captions, resize_problem, text_length_problem


def _image_processor(shorter: int, divisor: int) -> object:
    from transformers import BridgeTowerImageProcessor

    # As btdeploy's presets write it (model/checkpoints.build_processor).
    edge = {"shortest_edge": shorter}
    return BridgeTowerImageProcessor(size=edge, crop_size=edge, do_center_crop=True, size_divisor=divisor)


def _processor_takes(image_processor: object, width: int, height: int) -> bool:
    picture = Image.new("RGB", (width, height), (120, 30, 200))
    try:
        pixels = image_processor([picture], return_tensors="np")["pixel_values"]  # type: ignore[operator]
    except ValueError:
        return False
    return bool(np.isfinite(pixels).all())


# (shorter side, divisor): the tiny preset, base, large, and a size 32 does not divide.
SETTINGS = [(64, 32), (288, 32), (384, 32), (96, 16)]


@pytest.mark.parametrize(("shorter", "divisor"), SETTINGS)
def test_the_refusal_matches_what_the_processor_does(shorter: int, divisor: int) -> None:
    image_processor = _image_processor(shorter, divisor)
    short = 20
    refused_at = None
    # Walk the long side across the limit, both ways round; the processor is the judge.
    for long_side in range(short, short * 40, 7):
        for width, height in ((long_side, short), (short, long_side)):
            takes = _processor_takes(image_processor, width, height)
            problem = resize_problem(width, height, image_processor)
            assert (problem is None) == takes, (width, height, problem)
            if not takes and refused_at is None:
                refused_at = long_side / short
    assert refused_at is not None, "no size was refused: the walk did not cross the limit"


def test_the_refusal_says_what_is_wrong_and_what_to_do() -> None:
    problem = resize_problem(3000, 20, _image_processor(288, 32))
    assert problem is not None
    assert problem.startswith("is 3000x20 pixels, more than 15.2 times as long as it is wide")
    assert problem.endswith("crop or pad it nearer to square")
    assert resize_problem(1500, 100, _image_processor(288, 32)) is None  # 15:1 still resizes


def test_load_image_refuses_an_elongated_image_by_name(tmp_path: Path) -> None:
    banner = tmp_path / "banner.png"
    Image.new("RGB", (400, 100), (0, 0, 0)).save(banner)  # 4:1, past the tiny preset's 3.4:1
    with pytest.raises(BtDeployError, match=r"image .*banner.png is 400x100 pixels, more than 3.4 times"):
        load_image(banner, _image_processor(64, 32))
    assert load_image(banner).size == (400, 100)  # without a processor nothing is judged
    assert load_image(banner, _image_processor(288, 32)).size == (400, 100)


def _sideways_photo(path: Path) -> Image.Image:
    """A portrait photo as a phone stores it: landscape pixels and EXIF orientation 6 (shown turned
    a quarter clockwise). Returns what a viewer shows."""
    stored = Image.fromarray((np.random.default_rng(5).random((20, 60, 3)) * 255).astype("uint8"))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)  # PNG: lossless, so pixels compare exactly
    return stored.transpose(Image.Transpose.ROTATE_270)  # a quarter turn clockwise


def test_a_photo_with_an_exif_orientation_is_read_upright(tmp_path: Path) -> None:
    """As transformers' load_image and image viewers read it; before, a phone's portrait photo reached
    the model (and calibration) on its side. The same in run and rank (files) and serve (bytes)."""
    from btdeploy.serve.tasks import decode_image

    shown = _sideways_photo(tmp_path / "portrait.png")
    for picture in (
        load_image(tmp_path / "portrait.png", _image_processor(64, 32)),
        decode_image((tmp_path / "portrait.png").read_bytes(), 0, _image_processor(64, 32)),
    ):
        assert picture.size == (20, 60)
        np.testing.assert_array_equal(np.asarray(picture), np.asarray(shown))
    # An elongated photo is judged and named by the size it is shown at.
    with pytest.raises(BtDeployError, match=r"portrait.png is 20x60 pixels, more than [0-9.]+ times as long"):
        load_image(tmp_path / "portrait.png", _image_processor(32, 32))


def _grey(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((24, 32)) * 255).astype(np.uint8)


def test_sixteen_bit_images_are_read_as_shown_and_float_ones_refused(tmp_path: Path) -> None:
    """PIL's RGB conversion (and transformers' load_image) clips every 16-bit value past 255, so a
    16-bit greyscale scan reached the model white; a float image in 0..1 reached it black."""
    from btdeploy.serve.protocol import RequestError
    from btdeploy.serve.tasks import decode_image

    grey = _grey(3)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "scan16.png")  # 16-bit PNG, full range
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "scan16.tif")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "wide.tif")  # 8-bit values stored as 32-bit
    expected = np.repeat(grey[..., None], 3, axis=2)
    for name in ("scan16.png", "scan16.tif", "wide.tif"):
        assert Image.open(tmp_path / name).mode in ("I;16", "I;16B", "I"), name
        for picture in (
            load_image(tmp_path / name, _image_processor(64, 32)),
            decode_image((tmp_path / name).read_bytes(), 0, _image_processor(64, 32)),
        ):
            np.testing.assert_array_equal(np.asarray(picture), expected, err_msg=name)
    Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / "unit.tif")  # mode F, 0..1
    Image.fromarray(grey.astype(np.int32) * 1000).save(tmp_path / "counts.tif")  # mode I, past 255
    for name, expected_problem in (
        ("unit.tif", "holds floating-point pixels (PIL mode F), which have no fixed scale"),
        ("counts.tif", f"holds 32-bit pixels from {int(grey.min()) * 1000} to {int(grey.max()) * 1000} (PIL mode I)"),
    ):
        with pytest.raises(BtDeployError, match=rf"image .*{name} {re.escape(expected_problem)}"):
            load_image(tmp_path / name, _image_processor(64, 32))
        with pytest.raises(RequestError) as refused:
            decode_image((tmp_path / name).read_bytes(), 2, _image_processor(64, 32))
        assert refused.value.status == 415 and str(refused.value).startswith(f"image 2 {expected_problem}")


def test_transparent_pixels_are_read_over_white(tmp_path: Path) -> None:
    """Dropping the alpha (PIL's RGB conversion, transformers' load_image) kept the colour a file
    holds under transparent pixels: a product photo cut out onto a transparent background reached
    the model on black. Over white, as a page shows it and transformers' convert_to_rgb composites."""
    from btdeploy.serve.tasks import decode_image

    rgba = np.zeros((24, 32, 4), np.uint8)  # transparent black, as cut-outs are often saved
    rgba[4:20, 8:24] = (200, 30, 60, 255)  # the opaque subject
    rgba[0:4, 0:16] = (0, 0, 255, 128)  # a half-transparent blue edge
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    palette = Image.new("P", (32, 24), 0)
    palette.putpalette([0, 0, 0, 200, 30, 60])
    palette.paste(1, (8, 4, 24, 20))
    palette.save(tmp_path / "palette.png", transparency=0)  # index 0 transparent
    expected = np.full((24, 32, 3), 255, np.uint8)
    expected[4:20, 8:24] = (200, 30, 60)
    half = expected.copy()
    half[0:4, 0:16] = np.rint(np.array([0, 0, 255]) * 128 / 255 + 255 * (1 - 128 / 255))
    for name, shown in (("cutout.png", half), ("palette.png", expected)):
        for picture in (
            load_image(tmp_path / name, _image_processor(64, 32)),
            decode_image((tmp_path / name).read_bytes(), 0, _image_processor(64, 32)),
        ):
            assert np.abs(np.asarray(picture).astype(int) - shown).max() <= 1, name  # PIL rounds the blend


def test_an_image_past_pils_warning_size_is_read_with_one_line_of_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """PIL warns from inside itself past MAX_IMAGE_PIXELS (89 million) and refuses past twice that;
    the limit is lowered here so that a small file stands for a 100-megapixel photo."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "large.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(path)  # 1200 pixels: between the two limits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        picture = load_image(path)
    assert picture.size == (40, 30) and picture.getpixel((0, 0)) == (10, 20, 30)
    assert "image " + str(path) + " is 40x30 (1,200 pixels)" in capsys.readouterr().err
    Image.new("RGB", (50, 50)).save(path)  # 2500 pixels: past twice the limit
    with pytest.raises(BtDeployError, match="is too large to decode .*: shrink it first"):
        load_image(path)


def test_caption_files_in_the_encodings_editors_save(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark had become part of the first caption (tokenized as such), and a
    UTF-16 file ("Unicode" in Windows editors) had been read as NUL-riddled bytes."""
    captions = ["a cat on a sofa", "ein Hund im Schnee, müde"]
    for encoding in ("utf-8", "utf-8-sig", "utf-16", "utf-16-le"):
        path = tmp_path / f"{encoding}.txt"
        body = "\r\n".join(captions) + "\r\n"
        data = body.encode(encoding)
        if encoding == "utf-16-le":
            data = b"\xff\xfe" + data  # a mark, as editors write it
        path.write_bytes(data)
        assert read_captions(path, "--texts") == captions, encoding
    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(BtDeployError, match="photo.png is not a text file \\(it holds binary data\\)"):
        read_captions(image, "--texts")
    # Latin-1 / Windows-1252 from an old editor: its bytes had been replaced by U+FFFD, so the
    # captions scored, checked and calibrated on were ones nobody wrote.
    (tmp_path / "latin-1.txt").write_bytes("\r\n".join(captions).encode("latin-1"))
    with pytest.raises(
        BtDeployError,
        match=r"latin-1.txt is not UTF-8: line 2 holds b'\\xfc' .*save the file as UTF-8",
    ):
        read_captions(tmp_path / "latin-1.txt", "--texts")
    (tmp_path / "cut.txt").write_bytes("\n".join(captions).encode("utf-16")[:-1])
    with pytest.raises(BtDeployError, match="cut.txt starts as UTF-16 but is cut or damaged"):
        read_captions(tmp_path / "cut.txt", "--texts")


def test_a_text_past_the_model_is_refused_without_transformers_warning_first() -> None:
    """The tokenizer's own "indexing errors" warning had printed above btdeploy's refusal, for
    a text btdeploy refuses before anything indexes with it."""
    import logging

    from transformers import AutoTokenizer

    from btdeploy.model.checkpoints import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny").checkpoint)
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]
    library = logging.getLogger("transformers")
    level = library.level
    library.addHandler(handler)
    library.setLevel(logging.WARNING)  # as in `btdeploy run`, which loads no checkpoint that quiets it
    try:
        problem = text_length_problem(tokenizer, ["a cat", "word " * 600], tokenizer.model_max_length)
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
    assert problem is not None and problem.startswith("text 2 of 2 ('word word"), problem
    assert "longer than the model's 512" in problem
    assert heard == []


@pytest.mark.parametrize("url", ["http://images.cocodataset.org/val2017/000000039769.jpg", "https://example.com/a.png"])
def test_an_image_url_is_refused_naming_it_as_written(url: str) -> None:
    with pytest.raises(BtDeployError) as refused:
        load_image(Path(url))
    assert str(refused.value) == f"image {url} is a URL: btdeploy reads local files, download it first"
