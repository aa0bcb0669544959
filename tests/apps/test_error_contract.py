"""Faults a user or an accident can cause: each is one line and exit 2 (exit 1 stays "the check ran
and failed"), nothing outside the export folder is touched, and an interrupted step leaves the
folder as it was."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import pytest

import btdeploy
from btdeploy.artifacts import onnx_files
from btdeploy.artifacts.files import sha256_of
from btdeploy.artifacts.locks import head_lock
from btdeploy.artifacts.onnx_files import GraphBatch
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.export.exporter import export_head
from btdeploy.model.checkpoints import resolve_model
from btdeploy.model.inputs import sample_inputs
from btdeploy.optimize.optimizer import optimize_head


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny itm (with split graphs) and mlm, the itm head optimized in the ort flavour."""
    out = tmp_path_factory.mktemp("contract") / "out"
    export_head(resolve_model("tiny"), "itm", out, split=True)
    export_head(resolve_model("tiny"), "mlm", out)
    optimize_head(out / "itm", "ort")
    return out


def _copy(export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(export, out)
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


Setup = Callable[[Path, Path], list[str]]  # (copy of the export, scratch folder) -> argv


def _export_out_is_a_file(out: Path, tmp: Path) -> list[str]:
    (tmp / "a-file").write_text("x")
    return ["export", "--model", "tiny", "--heads", "itm", "--out", str(tmp / "a-file")]


def _optimize_an_opset_14_export(out: Path, tmp: Path) -> list[str]:
    """Its bridges and residual LayerNorms had gone unfused: `fused 0 of 2 bridges ... pass
    --allow-partial`, which named neither the cause nor the fix."""
    # The TorchScript exporter writes opset 14 (the dynamo exporter's graph cannot be converted to it:
    # _export_dynamo_at_opset_14)
    export_head(resolve_model("tiny"), "itc", out / "opset14", opset=14, exporter="torchscript")
    return ["optimize", str(out / "opset14" / "itc"), "--flavour", "ort"]


def _export_dynamo_at_opset_14(out: Path, tmp: Path) -> list[str]:
    """ONNX's version converter has no LayerNormalization before opset 17: its assertion, from deep
    inside onnx, was the message, after the model had loaded and exported."""
    return ["export", "--model", "tiny", "--heads", "itc", "--out", str(out / "d14"), "--opset", "14"] + [
        "--exporter",
        "dynamo",
    ]


def _report_is_a_folder(out: Path, tmp: Path) -> list[str]:
    return ["check", str(out), "--heads", "itm", "--report", str(tmp)]


def _bad_config_value(out: Path, tmp: Path) -> list[str]:
    manifest = json.loads((out / "itm" / "manifest.json").read_text())
    manifest["model"]["config"] = "not a config"
    (out / "itm" / "manifest.json").write_text(json.dumps(manifest))
    return ["optimize", str(out / "itm"), "--flavour", "trt"]


def _split_name_is_a_path(out: Path, tmp: Path) -> list[str]:
    manifest = json.loads((out / "itm" / "manifest.json").read_text())
    manifest["split"]["../../elsewhere/x"] = manifest["split"].pop("text")
    (out / "itm" / "manifest.json").write_text(json.dumps(manifest))
    return ["quantize", str(out / "itm"), "--precision", "int8-dynamic"]


def _graph_swapped_for_another_heads(out: Path, tmp: Path) -> list[str]:
    shutil.copy(out / "mlm" / "model.onnx", out / "itm" / "model.onnx")
    return ["check", str(out), "--heads", "itm"]


def _swapped_before(command: list[str]) -> Setup:
    """The itm head's plain and ort graphs swapped for other graphs, then a step that reads one:
    no step may run, optimize, quantize or ship a graph its manifest did not record."""

    def setup(out: Path, tmp: Path) -> list[str]:
        shutil.copy(out / "mlm" / "model.onnx", out / "itm" / "model.onnx")
        shutil.copy(out / "itm" / "text.ort.onnx", out / "itm" / "model.ort.onnx")
        from PIL import Image

        Image.new("RGB", (64, 64), (20, 120, 40)).save(tmp / "photo.png")  # run reads its image before the graph
        return [arg.format(out=out, tmp=tmp) for arg in command]

    return setup


def _one_weight_byte_flipped(out: Path, tmp: Path) -> list[str]:
    """Same size, other bytes: only the full hash tells, and optimize records that hash as its source."""
    graph = out / "itm" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    return ["optimize", str(out), "--heads", "itm", "--flavour", "trt"]


def _one_head_from_another_checkpoint(command: list[str]) -> Setup:
    """itc exported from another checkpoint (the tiny preset at seed 1) beside itm from seed 0."""

    def setup(out: Path, tmp: Path) -> list[str]:
        export_head(resolve_model("tiny", seed=1), "itc", out)
        (out / "captions.txt").write_text("a cat\na dog\n")
        return [arg.format(out=out, tmp=tmp) for arg in command]

    return setup


def _gpu_provider_without_a_gpu(out: Path, tmp: Path) -> list[str]:
    return ["check", str(out), "--heads", "itm", "--providers", "cuda"]


def _two_folders_claim_one_head(out: Path, tmp: Path) -> list[str]:
    shutil.copytree(out / "itm", out / "itm-copy")
    return ["check", str(out)]


def _zero_batch_size(out: Path, tmp: Path) -> list[str]:
    return ["bench", str(out), "--batch-sizes", "0"]


def _bench_count(option: str, value: str) -> Setup:
    def setup(out: Path, tmp: Path) -> list[str]:
        return ["bench", str(out), option, value]

    return setup


def _unknown_flavour(out: Path, tmp: Path) -> list[str]:
    return ["optimize", str(out), "--flavour", "tensorrt"]


def _missing_export(out: Path, tmp: Path) -> list[str]:
    return ["check", str(tmp / "nowhere")]


def _graph_copied_without_its_weights(out: Path, tmp: Path) -> list[str]:
    """A graph kept as two files (past 2 GB; here forced) copied to another machine without its .data."""
    from btdeploy.artifacts.manifest import read_manifest

    graph = out / "itm" / "model.ort.onnx"
    onnx_files.save_graph_atomically(onnx.load(str(graph)), graph, external=True)
    manifest = read_manifest(out / "itm")
    manifest.record_graph(graph)
    manifest.write()
    onnx_files.data_file(graph).unlink()
    return ["check", str(out), "--heads", "itm", "--flavour", "ort"]


def _damaged_graph(out: Path, tmp: Path) -> list[str]:
    (out / "itm" / "model.ort.onnx").write_bytes(b"\x00" * 100)
    return ["check", str(out), "--heads", "itm", "--flavour", "ort"]


def _banner(tmp: Path) -> Path:
    """An image 4 times as wide as tall: past the tiny preset's processor, which takes 3.4:1."""
    from PIL import Image

    (tmp / "images").mkdir(exist_ok=True)
    Image.new("RGB", (256, 64), (10, 200, 30)).save(tmp / "images" / "banner.png")
    return tmp / "images" / "banner.png"


def _run_on_an_elongated_image(out: Path, tmp: Path) -> list[str]:
    return ["run", str(out), "--head", "itm", "--image", str(_banner(tmp)), "--text", "a green banner"]


def _rank_a_folder_with_a_note(out: Path, tmp: Path) -> list[str]:
    """A note saved under an image's name among the pictures: refused by its header before the heads load."""
    _banner(tmp)
    (tmp / "images" / "note.png").write_text("not a picture")
    return ["rank", str(out), "--images", str(tmp / "images"), "--text", "a green banner"]


def _bench_into_a_file(out: Path, tmp: Path) -> list[str]:
    """Refused before the timing starts: it had been refused only when the reports were written."""
    (tmp / "reports").write_text("a file in the way")
    return ["bench", str(out), "--heads", "itm", "--variants", "ort", "--batch-sizes", "1", "--seq-lens", "4",
            "--iters", "1", "--out", str(tmp / "reports")]  # fmt: skip


def _run_on_a_decompression_bomb(out: Path, tmp: Path) -> list[str]:
    """225 megapixels in a 27 kB PNG: PIL refuses to decode it with its own exception."""
    from PIL import Image

    Image.new("1", (15000, 15000)).save(tmp / "huge.png")
    return ["run", str(out), "--head", "itm", "--image", str(tmp / "huge.png"), "--text", "a"]


def _calibrate_on_an_elongated_image(out: Path, tmp: Path) -> list[str]:
    _banner(tmp)
    optimize_head(out / "itm", "trt")  # int8 starts from the trt graph
    (tmp / "captions.txt").write_text("a green banner\n")
    return ["quantize", str(out / "itm"), "--precision", "int8", "--flavour", "ort", "--calib-images",
            str(tmp / "images"), "--calib-texts", str(tmp / "captions.txt")]  # fmt: skip


def _photo(tmp: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (80, 64), (200, 30, 10)).save(tmp / "photo.png")
    return tmp / "photo.png"


def _run_on_a_text_past_the_model(out: Path, tmp: Path) -> list[str]:
    return ["run", str(out), "--head", "itm", "--image", str(_photo(tmp)), "--text", "a cat", "--text", "word " * 600]


def _rank_a_caption_past_the_model(out: Path, tmp: Path) -> list[str]:
    (tmp / "captions.txt").write_text("a cat\ntwo dogs\n" + "word " * 600 + "\n")
    return ["rank", str(out), "--image", str(_photo(tmp)), "--texts", str(tmp / "captions.txt")]


def _processor_file(name: str, content: str, command: str) -> Setup:
    """The head's processor file `name` replaced by `content` (a copy cut short, an edit gone wrong)."""

    def setup(out: Path, tmp: Path) -> list[str]:
        (out / "itm" / "processor" / name).write_text(content)
        if command == "serve":  # refused before Ray starts: nothing listens, so no port is taken
            return ["serve", str(out), "--heads", "itm", "--port", "1"]
        return ["run", str(out), "--head", "itm", "--image", str(_photo(tmp)), "--text", "a cat"]

    return setup


def _bench_past_the_text_length(workload: str) -> Setup:
    def setup(out: Path, tmp: Path) -> list[str]:
        return ["bench", str(out), "--workload", workload, "--seq-lens", "600", "--iters", "1", "--requests", "1"]

    return setup


def _exported_from_a_copy(out: Path, tmp: Path) -> Path:
    """The itm head as if exported from a checkpoint folder of the user's (a copy of the preset's)."""
    checkpoint = tmp / "checkpoint"
    shutil.copytree(resolve_model("tiny").checkpoint, checkpoint)
    manifest = json.loads((out / "itm" / "manifest.json").read_text())
    manifest["model"]["source"] = str(checkpoint)
    (out / "itm" / "manifest.json").write_text(json.dumps(manifest))
    return checkpoint


def _weights_changed_since_export(out: Path, tmp: Path) -> list[str]:
    from safetensors.numpy import load_file, save_file

    checkpoint = _exported_from_a_copy(out, tmp)
    weights = load_file(checkpoint / "model.safetensors")
    weights["itm_score.fc.bias"] += 1.0  # fine-tuned after the export
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    return ["check", str(out), "--heads", "itm"]


def _checkpoint_moved(out: Path, tmp: Path) -> list[str]:
    checkpoint = _exported_from_a_copy(out, tmp)
    checkpoint.rename(tmp / "moved")
    return ["check", str(out), "--heads", "itm"]


def _checkpoint_given_with_other_weights(out: Path, tmp: Path) -> list[str]:
    from safetensors.numpy import load_file, save_file

    _exported_from_a_copy(out, tmp)
    other = tmp / "other"
    shutil.copytree(tmp / "checkpoint", other)
    weights = load_file(other / "model.safetensors")
    weights["itm_score.fc.bias"] += 1.0  # a fine-tune of it
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    return ["check", str(out), "--heads", "itm", "--checkpoint", str(other)]


CASES: list[tuple[str, Setup, str]] = [
    ("export --out is a file", _export_out_is_a_file, "is a file: give a folder"),
    ("check --report is a folder", _report_is_a_folder, "is a folder: give a file name"),
    ("a manifest config with a bad value", _bad_config_value, "not a BridgeTower config (expected a mapping"),
    ("a split graph name that is a path", _split_name_is_a_path, "is damaged (unknown split graph"),
    ("another head's graph swapped in", _graph_swapped_for_another_heads, "is not the graph its manifest recorded"),
    *[
        (f"{command[0]} on a swapped graph", _swapped_before(command), "is not the graph its manifest recorded")
        for command in (
            ["optimize", "{out}", "--heads", "itm", "--flavour", "trt"],
            ["quantize", "{out}", "--heads", "itm", "--precision", "int8-dynamic"],
            ["run", "{out}", "--head", "itm", "--backend", "openvino", "--image", "{tmp}/photo.png", "--text", "a"],
            ["triton-repo", "{out}", "--heads", "itm", "--flavour", "ort", "--out", "{tmp}/repo"],
        )
    ],  # fmt: skip
    ("optimize on a graph with one byte flipped", _one_weight_byte_flipped, "(sha256 differs)"),
    (
        "rank on heads from two checkpoints",
        _one_head_from_another_checkpoint(["rank", "{out}", "--image", "x.png", "--texts", "{out}/captions.txt"]),
        "rank takes its candidates from the itc head and scores them with the itm head, but they were exported",
    ),
    ("a GPU provider without a GPU", _gpu_provider_without_a_gpu, "GPU providers need an NVIDIA GPU, and torch sees"),
    ("two folders claim one head", _two_folders_claim_one_head, "both hold the itm head"),
    ("bench --batch-sizes 0", _zero_batch_size, "every value must be at least 1"),
    ("bench --iters 0", _bench_count("--iters", "0"), "argument --iters: must be at least 1, got 0"),
    ("bench --warmup -1", _bench_count("--warmup", "-1"), "argument --warmup: must be at least 0, got -1"),
    ("bench --seconds 0", _bench_count("--seconds", "0"), "argument --seconds: must be at least 0.1, got 0"),
    (
        "triton-repo --max-batch 0",
        lambda out, tmp: ["triton-repo", str(out), "--out", str(tmp / "repo"), "--max-batch", "0"],
        "argument --max-batch: must be at least 1, got 0",
    ),
    (
        "pipeline --calib-size 0",
        lambda out, tmp: ["pipeline", "--model", "tiny", "--out", str(out), "--calib-size", "0"],
        "argument --calib-size: must be at least 1, got 0",
    ),
    # Refused before the export, not at the first quantize step minutes later.
    (
        "pipeline --calib-size past the memory",
        lambda out, tmp: ["pipeline", "--model", "tiny", "--out", str(tmp / "pipe"), "--calib-size", str(10**9)],
        "--calib-size 1000000000 holds",
    ),
    ("an unknown flavour", _unknown_flavour, "invalid choice: 'tensorrt'"),
    # A command's unknown option points at that command's help, and the top level is not named twice.
    (
        "an option the command does not take",
        lambda out, tmp: ["run", str(out), "--head", "itm", "--image", "x.png", "--text", "a", "--batch-size", "2"],
        "btdeploy: error: run: unrecognized arguments: --batch-size 2 (see btdeploy run --help)",
    ),
    ("no command", lambda out, tmp: [], "btdeploy: error: the following arguments are required: command (see btdeploy"),
    # An empty list (a shell variable left unset) is refused, not read as "all of them".
    ("check --heads ''", lambda out, tmp: ["check", str(out), "--heads", ""], "--heads is empty"),
    (
        "bench --variants ''",
        lambda out, tmp: ["bench", str(out), "--variants", ""],
        "argument --variants: expected a comma list of names, got ''",
    ),
    (
        "pipeline --flavours ''",
        lambda out, tmp: ["pipeline", "--model", "tiny", "--out", str(out), "--flavours", ""],
        "argument --flavours: expected a comma list of names",
    ),
    (
        "check the reference in fp16 on the CPU",
        lambda out, tmp: ["check", str(out), "--heads", "itm", "--backend", "torch", "--precision", "fp16"],
        "the PyTorch reference runs fp16 on a CUDA GPU only: pass device='cuda' (--device cuda)",
    ),
    (
        "check --device for ONNX Runtime",
        lambda out, tmp: ["check", str(out), "--heads", "itm", "--device", "cuda"],
        "does not take 'device': it takes exact_sums, flavour, precision, provider_fallback, providers",
    ),
    ("an export folder that does not exist", _missing_export, "does not exist: pass the --out folder"),
    (
        "a graph file given for its folder",
        lambda out, tmp: ["check", str(out / "itm" / "model.onnx")],
        "model.onnx is a file: pass the folder btdeploy export wrote (the head folder",
    ),
    (
        "a checkpoint given for an export",
        lambda out, tmp: ["run", str(resolve_model("tiny").checkpoint), "--head", "itm", "--image", "x", "--text", "y"],
        "is a checkpoint, not an export: run btdeploy export --model",
    ),
    ("a damaged optimized graph", _damaged_graph, "is not the graph its manifest recorded"),
    (
        "a graph copied without its weights file",
        _graph_copied_without_its_weights,
        "model.ort.onnx keeps its weights in model.ort.onnx.data, which is not beside it: copy it there too",
    ),
    ("run on a text past the model's length", _run_on_a_text_past_the_model, "text 2 of 2 ('word word"),
    (
        "run on an empty text",
        lambda out, tmp: ["run", str(out), "--head", "itm", "--image", "x.png", "--text", "a", "--text", " "],
        "text 2 of 2 is empty",
    ),
    (
        "run mlm on a text without <mask>",
        lambda out, tmp: ["run", str(out), "--head", "mlm", "--image", "x.png", "--text", "a cat"],
        "text 1 of 1 has no <mask>: every text needs at least one <mask>",
    ),
    (
        "run on a folder for --image",
        lambda out, tmp: ["run", str(out), "--head", "itm", "--image", str(tmp), "--text", "a"],
        "is a folder: give one image file",
    ),
    (
        "run on a URL for --image",
        lambda out, tmp: ["run", str(out), "--head", "itm", "--image", "https://example.com/cat.jpg", "--text", "a"],
        "is a URL: btdeploy reads local files",
    ),
    ("rank a caption past the model's length", _rank_a_caption_past_the_model, "text 3 of 3 ('word word"),
    (
        "rank --images with --texts as well",
        lambda out, tmp: ["rank", str(out), "--images", str(tmp), "--text", "a", "--texts", "c.txt"],
        "--texts goes with --image IMG; with --images DIR give --text TEXT",
    ),
    (
        "rank --images on an empty --text",
        lambda out, tmp: ["rank", str(out), "--images", str(tmp), "--text", " "],
        "--text is empty",
    ),
    (
        "quantize int8 before the graph it starts from",
        lambda out, tmp: ["quantize", str(out / "itm"), "--precision", "int8"],
        "int8 of the ort flavour starts from the trt graph (the ort and trt int8 graphs share one calibration",
    ),
    (
        "optimize an export below opset 17",
        _optimize_an_opset_14_export,
        "it was exported at opset 14, where LayerNorm is written out as ReduceMean",
    ),
    (
        "export with the dynamo exporter below opset 17",
        _export_dynamo_at_opset_14,
        "--opset 14 with --exporter dynamo: its graphs convert down to opset 17 at the oldest",
    ),
    ("check after the weights changed", _weights_changed_since_export, "changed since this head was exported"),
    (
        "check after the checkpoint moved",
        _checkpoint_moved,
        "this head was exported from is gone: cannot rebuild the reference; if it has moved, pass its folder "
        "(--checkpoint DIR",
    ),
    (
        "check --checkpoint on other weights",
        _checkpoint_given_with_other_weights,
        "other are not the ones this head was exported from (sha256 ",
    ),
    (
        "check --checkpoint on a folder that is no checkpoint",
        lambda out, tmp: ["check", str(out), "--heads", "itm", "--checkpoint", str(tmp)],
        "has no config.json: give the checkpoint folder the export came from",
    ),
    (
        "run --checkpoint for ONNX Runtime",
        lambda out, tmp: ["run", str(out), "--head", "itm", "--image", "x", "--text", "a", "--checkpoint", str(tmp)],
        "does not take 'checkpoint'",
    ),
    ("rank a folder holding a file that is no image", _rank_a_folder_with_a_note, "note.png cannot be read (cannot"),
    ("run on an image too elongated to resize", _run_on_an_elongated_image, "banner.png is 256x64 pixels, more than"),
    ("calibration on an image too elongated", _calibrate_on_an_elongated_image, "banner.png is 256x64 pixels, more"),
    ("run on an image past PIL's decompression limit", _run_on_a_decompression_bomb, "huge.png is too large to decode"),
    ("bench --out naming a file", _bench_into_a_file, "reports is a file: give a folder for the reports"),
    *[
        (
            f"{command} with a processor file cut short",
            _processor_file("tokenizer.json", '{"version": "1.0", "trunc', command),
            "processor/tokenizer.json is damaged (Unterminated string starting at: line 1 column 20",
        )
        for command in ("run", "serve")
    ],
    *[
        (
            f"{command} with a BPE tokenizer.json that is no tokenizer",
            _processor_file("tokenizer.json", '{"model": {"type": "BPE", "vocab": "none"}}', command),
            "processor/tokenizer.json cannot be read as a tokenizer (",
        )
        for command in ("run", "serve")
    ],
    (
        "run with a processor transformers cannot read",
        _processor_file("tokenizer.json", "{}", "run"),
        "processor cannot be read as the head's processor (",
    ),
    (
        "bench --workload rank with a variant that has no split towers",
        lambda out, tmp: ["bench", str(out), "--workload", "rank", "--variants", "ort-fused,torch-compile"],
        "--workload rank: torch-compile runs on torch, which has no split towers (rank runs ort, ort-fused,",
    ),
    (
        "bench --workload serve with a variant serve does not run",
        lambda out, tmp: ["bench", str(out), "--workload", "serve", "--variants", "torch-eager", "--requests", "1"],
        "--workload serve: torch-eager runs on torch, which btdeploy serve does not run (it runs ort, ort-fused,",
    ),
    *[
        (
            f"bench --workload {workload} past the model's text length",
            _bench_past_the_text_length(workload),
            "--seq-lens 600 is outside 1..512",
        )
        for workload in ("heads", "rank", "serve")
    ],  # fmt: skip
]


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_fault_is_one_line_and_exit_2(
    export: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    setup: Setup,
    expected: str,
) -> None:
    from btdeploy.backends.tensorrt import environment

    monkeypatch.setattr(environment, "gpu", lambda: None)  # the same faults on a machine with a GPU
    out = _copy(export, tmp_path / "work")
    argv = setup(out, tmp_path)
    outside = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2, name
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("btdeploy: error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert expected in errors[0], err
    after = _snapshot(tmp_path)
    new = [p for p in after if p not in outside and not p.startswith("work/")]
    assert new == [], f"{name} wrote outside the export folder: {new}"


def test_files_beside_the_weights_do_not_stop_check(export: Path, tmp_path: Path) -> None:
    """Only the weights decide whether check's reference is the exported model: a README or a new
    tokenizer file added to the checkpoint folder after the export changes nothing."""
    out = _copy(export, tmp_path / "work")
    checkpoint = _exported_from_a_copy(out, tmp_path)
    (checkpoint / "README.md").write_text("# our fine-tune\n")
    assert main(["check", str(out), "--heads", "itm", "--batch-sizes", "1", "--seq-lens", "5"]) == 0


def test_a_moved_checkpoint_is_found_by_its_weights(export: Path, tmp_path: Path) -> None:
    """On a CI machine the checkpoint lies elsewhere than where it was exported from: check and the
    reference backend take its new folder, held to the recorded weights hash."""
    out = _copy(export, tmp_path / "work")
    _exported_from_a_copy(out, tmp_path).rename(tmp_path / "moved")
    argv = ["check", str(out), "--heads", "itm", "--batch-sizes", "1", "--seq-lens", "5"]
    report = tmp_path / "parity.json"
    assert main([*argv, "--checkpoint", str(tmp_path / "moved"), "--report", str(report)]) == 0
    # The report names the folder the reference came from and the weights hash it was held to.
    reference = json.loads(report.read_text())["rows"][0]["reference"]
    recorded = json.loads((out / "itm" / "manifest.json").read_text())["model"]["weights_sha256"]
    assert reference["checkpoint"] == str(tmp_path / "moved") and reference["weights_sha256"] == recorded
    reference = btdeploy.load(out, head="itm", backend="torch", checkpoint=tmp_path / "moved")
    feeds = sample_inputs(reference.config, batch=1, text_length=5)
    onnx_logits = btdeploy.load(out, head="itm")(**feeds)["logits"]
    assert np.abs(reference(**feeds)["logits"] - onnx_logits).max() < 1e-4


def test_a_full_disk_leaves_the_folder_as_it_was(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _copy(export, tmp_path)
    before = _snapshot(out)

    def full(model: onnx.ModelProto, stream: BinaryIO, *held_apart: object) -> None:
        stream.write(b"\x08" * 4096)  # the disk fills part way through the graph
        raise OSError(errno.ENOSPC, "No space left on device", getattr(stream, "name", None))

    monkeypatch.setattr(onnx_files, "write_encoded", full)
    assert main(["optimize", str(out / "itm"), "--flavour", "ort"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("btdeploy: error: No space left on device") and "free some space" in err
    assert _snapshot(out) == before


def test_an_interrupted_step_leaves_the_old_graphs_and_manifest(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _copy(export, tmp_path)
    before = _snapshot(out)
    staged = GraphBatch.stage
    calls = []

    def interrupted(self: GraphBatch, model: onnx.ModelProto, path: Path, *options: Any) -> None:
        calls.append(path.name)
        if len(calls) == 3:  # the whole graph and the text graph are written, the vision graph is not
            raise KeyboardInterrupt
        staged(self, model, path, *options)

    monkeypatch.setattr(GraphBatch, "stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize_head(out / "itm", "ort")
    assert calls[:2] == ["model.ort.onnx", "text.ort.onnx"]
    assert _snapshot(out) == before  # no new graph, no temporary file, the manifest untouched


def test_a_graph_read_while_a_step_swaps_it_in_is_named_as_such(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step swaps its graphs in, then records them: `check` reading between the two had said the
    graph "was replaced or damaged; make it again" while the step was still at work."""
    out = _copy(export, tmp_path)
    graph = out / "itm" / "model.onnx"
    original = graph.read_bytes()
    graph.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, other bytes: as mid-swap
    import fcntl

    from btdeploy.artifacts.locks import lock_path

    with open(lock_path(out / "itm"), "w") as held:  # the lock as another process's step holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("btdeploy quantize --flavour ort --precision int8, pid 4242")
        held.flush()
        assert main(["check", str(out), "--heads", "itm"]) == 2
    err = capsys.readouterr().err
    writer = "(btdeploy quantize --flavour ort --precision int8, pid"
    assert f"model.onnx is being written by another btdeploy step {writer}" in err
    assert main(["check", str(out), "--heads", "itm"]) == 2  # no step at work: the graph is damaged
    assert "model.onnx is not the graph its manifest recorded (sha256 differs)" in capsys.readouterr().err


def test_a_held_lock_is_a_clear_error_and_leftovers_are_cleaned(
    export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(export, tmp_path)
    with head_lock(out / "itm", "a test"):
        assert main(["optimize", str(out / "itm"), "--flavour", "trt"]) == 2
    err = capsys.readouterr().err
    assert "is being written by another btdeploy step (a test, pid" in err
    (out / "itm" / ".model.trt.onnx.1234.partial").write_bytes(b"killed midway")
    (out / ".itm.abcd.partial").mkdir()
    optimize_head(out / "itm", "trt")
    assert not (out / "itm" / ".model.trt.onnx.1234.partial").exists() and not (out / ".itm.abcd.partial").exists()


def test_degenerate_inputs_are_refused_or_passed_through_on_request(export: Path) -> None:
    runtime = btdeploy.load(export, head="itm")
    feeds = sample_inputs(runtime.config, 3, 6)
    feeds["attention_mask"][1] = 0
    with pytest.raises(BtDeployError, match=r"attention_mask row\(s\) 1 are all zeros"):
        runtime(**feeds)
    feeds = sample_inputs(runtime.config, 2, 6)
    feeds["pixel_values"][1, 0, 3, 3] = np.nan
    with pytest.raises(BtDeployError, match=r"pixel_values of image\(s\) 1 hold NaN or Inf"):
        runtime(**feeds)
    passed = btdeploy.load(export, head="itm", check_finite=False)(**feeds)
    assert np.isnan(passed.logits[1]).all() and np.isfinite(passed.logits[0]).all()


def test_a_text_padded_on_the_left_is_refused_where_the_head_reads_its_first_token(export: Path) -> None:
    """itm and itc read each text's first token; padded on the left a shorter text has a pad there,
    and transformers answers from it silently. The mlm head reads every token and takes it."""

    def left_padded(config: Any) -> dict[str, np.ndarray]:
        feeds = sample_inputs(config, 2, 6)
        feeds["attention_mask"][1] = [0, 0, 1, 1, 1, 1]
        feeds["input_ids"][1] = np.roll(feeds["input_ids"][1], 2)
        return feeds

    itm = btdeploy.load(export, head="itm")
    expected = r"attention_mask row\(s\) 1 start with padding: the itm head reads each text's first token, which is"
    with pytest.raises(BtDeployError, match=expected + r" a pad there; pad on the right \(processor.tokenizer"):
        itm(**left_padded(itm.config))
    split = btdeploy.load(export, head="itm", split=True)  # the export has split graphs
    texts = left_padded(itm.config)
    with pytest.raises(BtDeployError, match=expected):
        split.encode_texts(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"])
    mlm = btdeploy.load(export, head="mlm")
    assert mlm(**left_padded(mlm.config)).logits.shape[:2] == (2, 6)


def test_bf16_pixels_and_transformers_attributes(export: Path) -> None:
    import torch

    runtime = btdeploy.load(export, head="itm")
    feeds = sample_inputs(runtime.config, 2, 6)
    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
    reference = runtime(**tensors)
    bf16 = runtime(**{**tensors, "pixel_values": tensors["pixel_values"].to(torch.bfloat16)})
    assert bf16.logits.dtype == torch.float32 and torch.allclose(bf16.logits, reference.logits, atol=0.05)
    assert reference.loss is None and reference.hidden_states is None and reference.attentions is None
    with pytest.raises(AttributeError, match="has no output 'pooler_output'"):
        _ = reference.pooler_output


def test_damaged_or_inconsistent_features_are_refused(export: Path, tmp_path: Path) -> None:
    runtime = btdeploy.load(export, head="itm", split=True)
    feeds = sample_inputs(runtime.config, 3, 5)
    images = runtime.encode_images(feeds["pixel_values"])
    texts = runtime.encode_texts(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"])
    path = tmp_path / "images.npz"
    images.save(path)
    path.write_bytes(path.read_bytes()[:200])  # cut short
    with pytest.raises(BtDeployError, match="is not a btdeploy features file"):
        btdeploy.Features.load(path)
    texts.arrays["attention_mask"] = texts.arrays["attention_mask"][:2]
    with pytest.raises(BtDeployError, match="disagree in row count"):
        runtime.score(images, texts)
    images.arrays["image_states"] = images.arrays["image_states"][:, :, :5]
    with pytest.raises(BtDeployError, match=r"image_states are shaped \[3, 2, 5, 128\]"):
        runtime.score(
            images, runtime.encode_texts(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"])
        )
