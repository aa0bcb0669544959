"""`check --images DIR --texts FILE`: parity on the user's own image-caption pairs, preprocessed by
the checkpoint's processor, instead of generated inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from btdeploy.artifacts.manifest import package_version
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.imports import onnxruntime_distribution
from btdeploy.model.media import export_processor, paired_files
from btdeploy.runtime.runtime import find_head
from btdeploy.verify.check import check_export

CAPTIONS = ["a cat", "two dogs asleep on a red couch in the afternoon sun", "a bus"]


@pytest.fixture()
def pairs(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for k, size in enumerate([(64, 48), (90, 70), (70, 100), (80, 80), (120, 96)]):
        pixels = (np.random.default_rng(k).random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{k}.png")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS) + "\n")
    return images, tmp_path / "captions.txt"


def test_real_pairs_go_through_the_processor_in_batches(tiny_export: Path, pairs: tuple[Path, Path]) -> None:
    images, texts = pairs
    rows = check_export(tiny_export, ["itm", "mlm"], batch_sizes=(1, 2), images=images, texts=texts)
    assert [row.head for row in rows] == ["itm", "mlm"] and all(row.passed for row in rows)
    # Five images, three captions: image k with caption k % 3, two pairs at a time, each batch
    # padded to its own longest caption as the processor pads it.
    tokenizer = export_processor(find_head(tiny_export, "itm")).tokenizer
    captions = [CAPTIONS[k % 3] for k in range(5)]
    expected = [(len(batch), len(tokenizer(batch, padding=True)["input_ids"][0])) for batch in
                (captions[0:2], captions[2:4], captions[4:5])]  # fmt: skip
    for row in rows:
        assert [(s["batch"], s["text_length"]) for s in row.per_shape] == expected, row.head
    assert len({length for _, length in expected}) > 1  # the batches really differ in length


def test_an_image_that_recurs_is_decoded_once(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One image against many captions (a caption set checked on one picture) decoded the picture
    once per pair."""
    from btdeploy.verify import check

    images = tmp_path / "one"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(images / "a.png")
    texts = tmp_path / "many.txt"
    texts.write_text("\n".join(f"caption {k}" for k in range(7)) + "\n")
    decoded: list[Path] = []
    load_image = check.load_image

    def counted(path: Path, processor: object) -> object:
        decoded.append(path)
        return load_image(path, processor)

    monkeypatch.setattr(check, "load_image", counted)
    pair = paired_files(images, texts, ("--images", "--texts"))
    assert pair is not None
    pairs = check.real_pairs(find_head(tiny_export, "itm"), *pair, texts_option=f"--texts {texts}")
    assert [len(batch["input_ids"]) for batch in pairs.batches(3)] == [3, 3, 1]
    assert decoded == [images / "a.png"]


def test_with_every_pair_each_image_is_decoded_once_and_batches_are_as_the_processor_makes_them(
    tiny_export: Path, pairs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caption with every image runs caption by caption, so an image recurs once per caption,
    further apart than a batch: it had been decoded and preprocessed again each time."""
    from btdeploy.model.media import load_image, pair_inputs
    from btdeploy.verify import check

    decoded: list[Path] = []

    def counted(path: Path, processor: object) -> object:
        decoded.append(path)
        return load_image(path, processor)

    monkeypatch.setattr(check, "load_image", counted)
    pair = paired_files(*pairs, ("--images", "--texts"))
    assert pair is not None
    manifest = find_head(tiny_export, "itm")
    every = check.real_pairs(manifest, *pair, texts_option="--texts captions.txt", every_pair=True)
    batches = list(every.batches(2))
    assert sorted(decoded) == sorted(pair[0]) and len(decoded) == 5  # five images, three captions, 15 rows
    # The same inputs as the processor makes of each batch's pictures and captions at once.
    rows = [every.layout.indices(row) for row in range(15)]
    for start, batch in zip(range(0, 15, 2), batches, strict=True):
        chunk = rows[start : start + 2]
        pictures = [load_image(pair[0][image], every.processor.image_processor) for _, image in chunk]
        expected = pair_inputs(every.processor, pictures, [pair[1][caption] for caption, _ in chunk])
        assert list(batch) == list(expected)
        for name in expected:
            assert batch[name].dtype == expected[name].dtype and np.array_equal(batch[name], expected[name]), name


def test_the_command_records_its_inputs_and_refuses_half_a_pair(
    tiny_export: Path, pairs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, texts = pairs
    report = tmp_path / "parity.json"
    argv = ["check", str(tiny_export), "--heads", "itm", "--images", str(images), "--texts", str(texts)]
    assert main([*argv, "--report", str(report)]) == 0
    assert "5 real pair(s) from 5 image(s) and 3 caption(s), 3 at a time" in capsys.readouterr().err
    recorded = json.loads(report.read_text())
    files = {"images": str(images), "texts": str(texts), "batch_size": 3, "every_pair": False}
    assert recorded["inputs"] == {"kind": "files", **files}
    # It names exactly what passed: the graph's bytes by hash, the tools and the CPU.
    graph_hash = hashlib.sha256((tiny_export / "itm" / "model.onnx").read_bytes()).hexdigest()
    assert [row["graphs"] for row in recorded["rows"]] == [{"model.onnx": graph_hash}]
    ort = onnxruntime_distribution()  # this platform's package: onnxruntime-gpu, or the CPU one on aarch64, macOS
    assert recorded["versions"][ort] == package_version(ort) and recorded["cpu"]
    assert main(["check", str(tiny_export), "--heads", "itm", "--images", str(images)]) == 2
    assert "give both --images DIR and --texts FILE, or neither" in capsys.readouterr().err
    assert main(["check", str(tiny_export), "--heads", "itm", "--all-pairs"]) == 2
    refusal = "--all-pairs runs every caption with every image: give --images DIR and --texts FILE"
    assert refusal in capsys.readouterr().err
    texts.write_text("a cat\n" + "word " * 600 + "\n")
    with pytest.raises(BtDeployError, match=r"--texts .*captions.txt: text 2 of 2 \('word word"):
        check_export(tiny_export, ["itm"], images=images, texts=texts)


def test_the_pipeline_checks_every_graph_on_the_pairs(
    pairs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, texts = pairs
    out = tmp_path / "out"
    argv = ["pipeline", "--model", "tiny", "--heads", "itm", "--precisions", "int8-dynamic", "--flavours", "ort"]
    assert main([*argv, "--out", str(out), "--check-images", str(images), "--check-texts", str(texts)]) == 0
    reports = sorted(out.glob("parity.*.json"))
    assert [r.name for r in reports] == ["parity.ort.int8-dynamic.json", "parity.ort.json", "parity.plain.json"]
    for report in reports:
        recorded = json.loads(report.read_text())
        assert recorded["inputs"]["kind"] == "files" and recorded["passed"], report.name
        (row,) = recorded["rows"]
        assert [s["batch"] for s in row["per_shape"]] == [3, 2], report.name  # 5 pairs, 3 at a time
    # Half a pair, or a folder without images, is refused before anything is exported: the
    # calibration pair had been read only at the first quantize step, after the export and optimizes.
    for extra, refusal in (
        (["--check-images", str(images)], "give both --check-images DIR and --check-texts FILE"),
        (["--calib-images", str(images)], "give both --calib-images DIR and --calib-texts FILE"),
        (["--calib-images", str(tmp_path), "--calib-texts", str(texts)], "holds no images"),
    ):
        assert main([*argv, "--out", str(tmp_path / "other"), "--precisions", "int8", *extra]) == 2
        assert refusal in capsys.readouterr().err
        assert not (tmp_path / "other").exists()
