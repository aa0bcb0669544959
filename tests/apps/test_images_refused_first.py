"""An image that cannot be read is refused before any model loads or any graph is made: by its
header, not when its batch comes (which had taken 5-12 s of loading on base, and a whole export
in the pipeline)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, NoReturn

import pytest
from PIL import Image

import btdeploy.apps.pipeline
import btdeploy.model.media
import btdeploy.runtime.runtime
import btdeploy.verify.check
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.model.media import load_image, require_readable_images


def _no_work(*args: Any, **kwargs: Any) -> NoReturn:
    # Patched over a module's own global, never over a name other modules import: a module first
    # imported while the patch holds would keep it.
    raise AssertionError("work began before the images were checked")


def _images(folder: Path, broken: bool) -> Path:
    """Two good images and, with `broken`, a third file named as an image that holds no image."""
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (70 + index, 64), (30 * index, 90, 200)).save(folder / f"{index}.png")
    if broken:
        (folder / "2.png").write_bytes(b"a note, not a picture")
    return folder


def _captions(path: Path) -> Path:
    path.write_text("a blue square\na red square\nsomething else\n")
    return path


def _pairs_with_a_note(tmp_path: Path) -> list[str]:
    """A folder of images holding a note under an image's name, and a captions file: DIR FILE."""
    return [str(_images(tmp_path / "images", broken=True)), str(_captions(tmp_path / "captions.txt"))]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


def test_the_header_check_refuses_what_decoding_would(tmp_path: Path) -> None:
    good = _images(tmp_path / "images", broken=True)
    require_readable_images([good / "0.png", good / "1.png"], "test")  # no error
    for path, why in (
        (good / "2.png", "2.png cannot be read (cannot identify image file"),
        (tmp_path / "absent.jpg", "absent.jpg does not exist"),
        (good, "is a folder: give one image file"),
    ):
        with pytest.raises(BtDeployError, match=r"^image .*" + why.replace("(", r"\(")) as by_header:
            require_readable_images([good / "0.png", path], "test")
        with pytest.raises(BtDeployError) as by_decoding:
            load_image(path)
        assert str(by_header.value) == str(by_decoding.value)


def test_the_header_check_does_not_decode(tmp_path: Path) -> None:
    """A file cut after its header passes the header check (the pixels are read when used) and is
    still one line when decoded: the check costs a header, not a decode, per image."""
    whole = _images(tmp_path / "images", broken=False) / "0.png"
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:60])
    require_readable_images([cut], "test")
    with pytest.raises(BtDeployError, match="cut.png cannot be read"):
        load_image(cut)


def test_a_large_folder_says_how_far_its_headers_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _images(tmp_path / "images", broken=False)
    files = sorted(folder.iterdir())
    require_readable_images(files, "rank")
    assert "headers" not in capsys.readouterr().err
    monkeypatch.setattr(btdeploy.model.media, "HEADERS_WITH_PROGRESS", 2)
    require_readable_images(files, "rank")
    assert "rank: reading the headers: 2/2" in capsys.readouterr().err


def test_run_refuses_an_unreadable_image_before_loading(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(btdeploy.runtime.runtime, "get_target", _no_work)  # every load starts there
    note = tmp_path / "note.png"
    note.write_bytes(b"not a picture")
    err = _refused(["run", str(tiny_export), "--head", "itm", "--image", str(note), "--text", "hi"], capsys)
    assert err.endswith(
        "note.png cannot be read (cannot identify image file '" + str(note) + "'): give an image "
        "PIL reads (JPEG, PNG, ...); if it is one of a folder of images, move it out"
    ), err
    # The text is refused first where both are wrong, as before: the request is checked whole.
    err = _refused(["run", str(tiny_export), "--head", "mlm", "--image", str(note), "--text", "no mask"], capsys)
    assert "text 1 of 1 has no <mask>" in err, err
    # A text past the model's length and a damaged processor, which the README says run refuses
    # before any work, are refused before the load too (both had been said after it).
    photo = _images(tmp_path / "images", broken=False) / "0.png"
    err = _refused(["run", str(tiny_export), "--head", "itm", "--image", str(photo), "--text", "word " * 600], capsys)
    assert "text 1 of 1 ('word word" in err and "shorten it" in err, err
    copy = tmp_path / "export"
    shutil.copytree(tiny_export / "itm", copy / "itm")
    (copy / "itm" / "processor" / "tokenizer.json").write_text('{"cut short')
    err = _refused(["run", str(copy), "--head", "itm", "--image", str(photo), "--text", "hi"], capsys)
    assert "tokenizer.json is damaged" in err, err


@pytest.mark.parametrize("which", ["--image", "--images"])
def test_rank_refuses_an_unreadable_image_before_the_heads_load(
    which: str,
    tiny_export: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(btdeploy.runtime.runtime, "get_target", _no_work)
    folder = _images(tmp_path / "images", broken=True)
    if which == "--image":
        argv = ["--image", str(tmp_path / "gone.jpg"), "--texts", str(_captions(tmp_path / "captions.txt"))]
        expected = "gone.jpg does not exist"
    else:
        argv = ["--images", str(folder), "--text", "a blue square"]
        expected = "2.png cannot be read"
    err = _refused(["rank", str(tiny_export), *argv], capsys)
    assert err.startswith("btdeploy: error: image ") and expected in err, err


def test_check_refuses_an_unreadable_image_before_any_model(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(btdeploy.verify.check, "get_target", _no_work)
    images, captions = _pairs_with_a_note(tmp_path)
    err = _refused(["check", str(tiny_export), "--heads", "itm", "--images", images, "--texts", captions], capsys)
    assert "2.png cannot be read" in err, err


@pytest.mark.parametrize("option", ["check", "calib"])
def test_the_pipeline_refuses_an_unreadable_image_before_the_export(
    option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(btdeploy.apps.pipeline, "resolve_model", _no_work)
    images, captions = _pairs_with_a_note(tmp_path)
    out = tmp_path / "out"
    argv = ["pipeline", "--model", "tiny", "--heads", "itm", "--out", str(out)]
    err = _refused([*argv, f"--{option}-images", images, f"--{option}-texts", captions], capsys)
    assert "2.png cannot be read" in err and not out.exists(), err


def test_calibration_checks_only_the_images_its_rows_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows of a folder of three images read all three; two rows read the first two, so a
    broken third image is no reason to refuse them."""
    from btdeploy.quantize.calibration import calibration_images

    folder = _images(tmp_path / "images", broken=True)
    pair = (sorted(folder.iterdir()), ["a", "b", "c"])
    assert [p.name for p in calibration_images(pair, 2)] == ["0.png", "1.png"]
    assert [p.name for p in calibration_images(pair, 64)] == ["0.png", "1.png", "2.png"]
    require_readable_images(calibration_images(pair, 2), "--calib-images")
