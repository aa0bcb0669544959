"""The pipeline makes nothing twice: graphs on disk from the same sources and tool versions are
kept (and checked again), a damaged one is made again, --force makes all; and the memory path:
external data forced by a low size threshold on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from xml.etree import ElementTree

import numpy as np
import onnx
import pytest

from btdeploy.apps import disk_space
from btdeploy.apps.pipeline import run_pipeline
from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.artifacts.onnx_files import EXTERNAL_DATA_ENV, data_file
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.model.checkpoints import preset_checkpoint_dir

FLAVOURS = (Flavour.ORT, Flavour.TRT)
PRECISIONS = ("fp16", "int8")


def _made(out: Path) -> dict[str, bool]:
    """step -> reused, for every step that makes something (checks always run)."""
    steps = json.loads((out / "pipeline.json").read_text())["steps"]
    return {s["step"]: s["reused"] for s in steps if not s["step"].startswith("check")}


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}


def _graph_hashes(folder: Path) -> dict[str, str]:
    """Each graph's sha256 as the manifest records it, checked against the file."""
    manifest = read_manifest(folder)
    for name in manifest.data["graphs"]:
        manifest.verify_graph(folder / name, full=True)
    return {name: record["sha256"] for name, record in manifest.data["graphs"].items()}


def test_a_second_run_reuses_every_graph_a_damaged_one_is_remade_and_force_remakes_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_pipeline("tiny", out, heads=["itm"], precisions=PRECISIONS, flavours=FLAVOURS)
    printed = capsys.readouterr()
    # export, 2 x (optimize, check), 4 x (quantize, check), and the plain check: 14 steps counted down.
    progress = [line for line in printed.err.splitlines() if "] pipeline [" in line]
    assert len(progress) == 14 and "pipeline [1/14] itm export:" in progress[0]
    assert all("elapsed, about" in line and line.endswith(" left") for line in progress[:-1])
    first = _made(out)
    assert set(first) == {"export", "optimize ort", "optimize trt", "quantize ort.fp16", "quantize ort.int8",
                          "quantize trt.fp16", "quantize trt.int8"}  # fmt: skip
    assert not any(first.values())
    record = json.loads((out / "pipeline.json").read_text())
    assert record["passed"] and record["peak_rss_gb"] > 0.1 and record["wall_seconds"] > 0
    # Generated calibration is said once up front and once under the summary, not at each quantize step.
    warned = [line for line in printed.err.splitlines() if "GENERATED" in line]
    assert warned == [line for line in warned if "every fp16 and int8 graph of this run" in line] and len(warned) == 1
    assert [line for line in printed.out.splitlines() if "GENERATED" in line][0].startswith("calibration: the fp16")
    assert record["calibration"] == "generated"
    # The ort INT8 graph is checked with exact integer sums on any CPU (recoded where they would saturate).
    assert json.loads((out / "parity.ort.int8.json").read_text())["integer_sums"].startswith("exact (")
    steps = read_manifest(out / "itm").data["pipeline_steps"]
    assert len(steps) == len(record["steps"]) and all(s["peak_rss_gb"] > 0 for s in steps)
    # Each graph's record carries what it cost to make.
    manifest = read_manifest(out / "itm")
    assert manifest.data["optimized"]["trt"]["peak_rss_gb"] > 0
    assert manifest.data["precisions"]["ort.int8"]["seconds"] > 0
    # The trt int8 graph is the ort one's calibration with FP16 outside the Q/DQ, not a second calibration.
    assert manifest.data["precisions"]["trt.int8"]["reused_from"] == "model.ort.int8.onnx"
    assert manifest.data["precisions"]["trt.int8"]["high_precision"] == "fp16"

    assert record["disk"]["new_graph_files"] == 7  # plain, ort, trt and four quantized graphs
    # One JUnit suite per checked graph, a test case per output, for CI.
    suites = ElementTree.parse(out / "parity.junit.xml").getroot().findall("testsuite")
    names = ["model.onnx", "model.ort.onnx", "model.trt.onnx", "model.ort.fp16.onnx", "model.ort.int8.onnx",
             "model.trt.fp16.onnx", "model.trt.int8.onnx"]  # fmt: skip
    assert sorted(str(s.get("name")) for s in suites) == sorted(names)
    assert all((s.get("tests"), s.get("failures")) == ("1", "0") for s in suites)

    first_hashes = _graph_hashes(out / "itm")
    before = _mtimes(out / "itm")
    assert run_pipeline("tiny", out, heads=["itm"], precisions=PRECISIONS, flavours=FLAVOURS)
    assert all(_made(out).values())
    assert json.loads((out / "pipeline.json").read_text())["disk"]["new_graph_files"] == 0  # all on disk already
    assert _mtimes(out / "itm") == before  # nothing rewritten

    damaged = out / "itm" / "model.ort.int8.onnx"
    damaged.write_bytes(damaged.read_bytes() + b"\0")
    assert run_pipeline("tiny", out, heads=["itm"], precisions=PRECISIONS, flavours=FLAVOURS)
    again = _made(out)
    assert [step for step, reused in again.items() if not reused] == ["quantize ort.int8"]
    read_manifest(out / "itm").verify_graph(damaged, full=True)  # made again, as recorded
    assert _graph_hashes(out / "itm") == first_hashes  # and the same bytes as the first time

    # --force makes every graph again, here in a fresh interpreter with other string hashes (set
    # order): the same bytes, so a release gate can compare a graph's recorded hash between runs.
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # this process: random, or the one given
    command = [sys.executable, "-m", "btdeploy.cli", "pipeline", "--model", "tiny", "--heads", "itm", "--out", str(out),
               "--precisions", ",".join(PRECISIONS), "--flavours", ",".join(FLAVOURS), "--force"]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not any(_made(out).values())
    remade = _mtimes(out / "itm")
    assert all(remade[name] != before[name] for name in before)  # every graph written again ...
    assert _graph_hashes(out / "itm") == first_hashes  # ... to the same bytes


def test_external_data_forced_on_tiny_goes_through_every_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EXTERNAL_DATA_ENV, str(200_000))  # tiny graphs are a few MB: all go external
    out = tmp_path / "out"
    precisions = ("fp16", "int8", "int8-dynamic")
    assert run_pipeline("tiny", out, heads=["itm"], precisions=precisions, flavours=FLAVOURS, split=True)
    folder = out / "itm"
    graphs = sorted(folder.glob("*.onnx"))
    # model, text, vision, fusion: plain, ort, trt; ort.fp16/int8/int8-dynamic, trt.fp16/int8
    assert len(graphs) == 4 * 8
    # The disk estimate made before the run is a lower bound of what it wrote, and a close one.
    disk = json.loads((out / "pipeline.json").read_text())["disk"]
    written = sum(g.stat().st_size + data_file(g).stat().st_size for g in graphs)
    assert disk["new_graph_files"] == len(graphs)
    assert 0.8 * written < disk["new_graph_bytes_at_least"] <= written, (disk, written)
    for graph in graphs:
        assert data_file(graph).is_file(), graph.name
        proto = onnx.load(str(graph), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer), graph.name
    # OpenVINO reads the same files (large's graphs are past 2 GB): whole and split, FP32 and the
    # Q/DQ INT8 graph, it answers as ONNX Runtime does on each, within the precision's floors.
    import btdeploy
    from btdeploy.artifacts.graph_names import Precision
    from btdeploy.model.heads import get_head
    from btdeploy.model.inputs import sample_inputs
    from btdeploy.verify.parity import compare, shortfalls

    logits = get_head("itm").output("logits")
    for precision in (Precision.FP32, Precision.INT8):
        options: dict[str, Any] = {"head": "itm", "flavour": "trt", "precision": precision}
        ort = btdeploy.load(out, **options)
        feeds = sample_inputs(ort.config, 2, 7, seed=23)
        expected = np.asarray(ort(**feeds)["logits"])
        tolerance = logits.tolerances[precision]
        for split in (False, True):
            got = np.asarray(btdeploy.load(out, backend="openvino", split=split, **options)(**feeds)["logits"])
            assert not shortfalls(compare(expected, got, logits, tolerance), tolerance), (precision, split)
    # The recorded hash covers the weights: a flipped byte in a .data file is refused.
    manifest = read_manifest(folder)
    weights = data_file(folder / "model.ort.int8.onnx")
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(BtDeployError, match="sha256 differs"):
        manifest.verify_graph(folder / "model.ort.int8.onnx", full=True)


def test_a_disk_too_small_for_the_new_graphs_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    free = 5_000_000  # tiny itm's five FP32 graphs alone need more
    usage = SimpleNamespace(total=10**9, used=10**9 - free, free=free)
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda path: usage)
    out = tmp_path / "deep" / "out"
    argv = ["pipeline", "--model", "tiny", "--heads", "itm", "--precisions", "none", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"btdeploy: error: this run writes 4 new graph files to {out}, at least "), err
    assert "and its disk has 5 MB free: free some space, give --out on a larger disk" in err[-1]
    assert not (tmp_path / "deep").exists() and not any("pipeline [" in line for line in err)


def test_a_bad_external_data_threshold_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from btdeploy.artifacts.onnx_files import external_data_threshold

    monkeypatch.setenv(EXTERNAL_DATA_ENV, "2GB")
    with pytest.raises(BtDeployError, match="is not a number of bytes"):
        external_data_threshold()


def test_an_export_is_kept_only_for_the_same_checkpoint_seed_and_opset(tmp_path: Path) -> None:
    from btdeploy.export.exporter import export_head
    from btdeploy.model.checkpoints import resolve_model

    out = tmp_path / "out"
    assert not export_head(resolve_model("tiny"), "itc", out).reused
    assert export_head(resolve_model("tiny"), "itc", out, reuse=True).reused
    assert not export_head(resolve_model("tiny"), "itc", out, opset=18, reuse=True).reused
    assert not export_head(resolve_model("tiny", seed=1), "itc", out, opset=18, reuse=True).reused
    assert read_manifest(out / "itc").data["model"]["seed"] == 1
    assert not export_head(resolve_model("tiny", seed=1), "itc", out, opset=18).reused  # no reuse asked


def test_a_run_without_split_keeps_a_split_export_and_what_was_made_from_it(tmp_path: Path) -> None:
    """A split export holds the whole graph too: a later pipeline without --split reuses it, and
    the graphs of flavours it was not asked for stay (they were all thrown away with a re-export)."""
    out = tmp_path / "out"
    assert run_pipeline("tiny", out, heads=["itm"], precisions=(), flavours=FLAVOURS, split=True)
    before = _mtimes(out / "itm")
    assert {"text.onnx", "model.trt.onnx", "fusion.ort.onnx"} <= set(before)
    assert run_pipeline("tiny", out, heads=["itm"], precisions=(), flavours=(Flavour.ORT,))
    assert _made(out) == {"export": True, "optimize ort": True}
    assert _mtimes(out / "itm") == before
    # Asking for split graphs where there are none still exports again.
    assert run_pipeline("tiny", out / "plain", heads=["itm"], precisions=(), flavours=())
    assert run_pipeline("tiny", out / "plain", heads=["itm"], precisions=(), flavours=(), split=True)
    assert _made(out / "plain") == {"export": False} and (out / "plain" / "itm" / "text.onnx").is_file()


def test_a_graph_protobuf_cannot_measure_counts_as_past_the_limit() -> None:
    """Past 2 GB in memory (every large graph) protobuf's ByteSize raises instead of answering: the
    writer must take that as "too large for one file" (and write external data), not stop there."""
    from google.protobuf.message import EncodeError

    from btdeploy.artifacts.onnx_files import PROTOBUF_LIMIT, needs_external_data, serialized_bytes

    weight = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight],
    )  # fmt: skip
    model = onnx.helper.make_model(graph)
    assert serialized_bytes(model) == model.ByteSize() < PROTOBUF_LIMIT

    class Unmeasurable:  # what upb does for a ModelProto past 2 GB
        def ByteSize(self) -> int:  # noqa: N802 - protobuf's name
            raise EncodeError("Failed to serialize proto")

    assert serialized_bytes(Unmeasurable()) > PROTOBUF_LIMIT  # type: ignore[arg-type]
    assert needs_external_data(serialized_bytes(Unmeasurable()))  # type: ignore[arg-type]


def test_the_pipeline_calibrates_on_the_rows_asked_and_calibrates_again_when_asked_for_more(tmp_path: Path) -> None:
    """`--calib-size` had been `quantize`'s alone: the main job calibrated on 16 rows whatever the
    user's calibration folder held."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.full((48, 40 + 8 * index, 3), 40 * index, dtype=np.uint8)).save(images / f"p{index}.png")
    texts = tmp_path / "captions.txt"
    texts.write_text("a dog\na cat on a mat\ntwo birds\na red car\n")  # 3 images, 4 captions: 12 distinct rows
    out = tmp_path / "out"
    common = ["pipeline", "--model", "tiny", "--heads", "itm", "--flavours", "ort", "--precisions", "int8",
              "--calib-images", str(images), "--calib-texts", str(texts), "--out", str(out)]  # fmt: skip
    assert main([*common, "--calib-size", "5"]) == 0
    calibration = read_manifest(out / "itm").data["precisions"]["ort.int8"]["calibration"]
    assert (calibration["kind"], calibration["size"]) == ("files", 5)
    assert main([*common, "--calib-size", "7"]) == 0
    assert _made(out)["quantize ort.int8"] is False  # other rows: calibrated again, not reused
    assert read_manifest(out / "itm").data["precisions"]["ort.int8"]["calibration"]["size"] == 7


def test_the_main_job_runs_where_the_preset_checkpoint_is_not_written_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine: the disk estimate built the model on torch's meta device, and writing the
    preset's checkpoint inside it had failed with a traceback (the suite had written it earlier)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BTDEPLOY_CACHE", str(cache))
    assert run_pipeline("tiny", tmp_path / "out", heads=["itm"], precisions=(), flavours=(Flavour.ORT,))
    written = preset_checkpoint_dir("tiny", 0)
    assert written.is_relative_to(cache) and (written / "model.safetensors").is_file()
