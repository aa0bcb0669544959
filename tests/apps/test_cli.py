"""The command line end to end on the tiny preset: export, check (pass and fail), run, pipeline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import onnx
import pytest
from conftest import cli_commands
from onnx import numpy_helper
from PIL import Image

from btdeploy.artifacts.manifest import Manifest, read_manifest
from btdeploy.backends.base import Backend
from btdeploy.backends.tensorrt.operators import check_tensorrt_ops
from btdeploy.cli import main
from btdeploy.verify.parity import GENERATED_PIXELS as PIXELS


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    pixels = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_export_then_check_then_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--heads", "itm,mlm", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".lock")) == ["itm", "mlm"]
    capsys.readouterr()
    report = tmp_path / "parity.json"
    code = main(["check", str(out), "--batch-sizes", "1,2", "--seq-lens", "3,17", "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "itm   logits" in printed and "mlm   logits" in printed and "parity PASSED" in printed
    data = json.loads(report.read_text())
    assert data["passed"] is True and len(data["rows"]) == 2
    assert all(len(row["per_shape"]) == 4 for row in data["rows"])
    assert data["inputs"] == {"kind": "generated", "batch_sizes": [1, 2], "text_lengths": [3, 17], "images": PIXELS}
    for row in data["rows"]:  # a lone row keeps its noise, a batch of two holds scenes
        assert [shape["pixels"] for shape in row["per_shape"]] == ["random", "random", "scenes", "scenes"]
    junit = tmp_path / "parity.xml"
    assert main(["check", str(out), "--heads", "itm", "--precision", "fp32", "--junit", str(junit)]) == 0
    suites = ElementTree.parse(junit).getroot()
    assert (suites.get("tests"), suites.get("failures")) == ("1", "0")
    cases = [(c.get("name"), c.find("failure")) for c in suites.iter("testcase")]
    assert cases == [("logits [model.onnx]", None)]
    assert main(["check", str(out), "--junit", str(tmp_path)]) == 2  # a folder, refused before the check
    assert f"--junit {tmp_path} is a folder: give a file name such as" in capsys.readouterr().err


def test_check_fails_with_exit_1_when_the_graph_is_wrong(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Plant a bug an optimizer could make: the ITM classifier bias changed by 1e-3.
    import shutil

    folder = tmp_path / "itm"
    shutil.copytree(tiny_export / "itm", folder)
    model = onnx.load(str(folder / "model.onnx"))
    bias = next(t for t in model.graph.initializer if numpy_helper.to_array(t).shape == (2,))
    tampered = numpy_helper.to_array(bias) + np.float32(1e-3)
    bias.CopyFrom(numpy_helper.from_array(tampered.astype(np.float32), bias.name))
    onnx.save(model, str(folder / "model.onnx"))
    # As if btdeploy itself had written the wrong graph: recorded in the manifest, so it loads.
    manifest = read_manifest(folder)
    manifest.record_graph(folder / "model.onnx")
    manifest.write()
    junit, report = tmp_path / "parity.xml", tmp_path / "parity.json"
    argv = ["check", str(folder), "--batch-sizes", "2", "--seq-lens", "6", "--junit", str(junit)]
    argv += ["--report", str(report)]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "parity FAILED" in printed
    assert "\nitm logits FAILED: max_abs 1.00e-03 > 0.0001; cosine 0." in printed, printed
    # The JUnit report CI reads: the row a failed test case, its message the floor missed with the number.
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures")) == ("1", "1")
    (case,) = suite.iter("testcase")
    assert (case.get("classname"), case.get("name")) == ("btdeploy.itm", "logits [model.onnx]")
    failure = case.find("failure")
    assert failure is not None and failure.text is not None and "model.onnx sha256 " in failure.text
    row = json.loads(report.read_text())["rows"][0]
    missed = failure.get("message", "").split("; ")  # every floor missed, each with its number
    assert [m.split()[0] for m in missed] == ["max_abs", "cosine"], missed
    assert missed[0].endswith(" > 0.0001") and missed[1].endswith(" < 0.99999"), missed
    assert float(missed[0].split()[1]) == pytest.approx(row["max_abs"], rel=1e-2)
    assert float(missed[1].split()[1]) == pytest.approx(row["cosine"], abs=1e-7)


def test_run_prints_one_answer_per_text(tiny_export: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # mlm refuses a text without one; a line break in a text is shown escaped, on the text's own row.
    texts = ["a cat looking out of the <mask>", "a <mask> sitting\non a <mask>"]
    for head, marker in (("itm", "match probability"), ("itc", "text-image cosine"), ("mlm", "mask(s) ->")):
        args = ["run", str(tiny_export), "--head", head, "--image", str(image)]
        for text in texts:
            args += ["--text", text]
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert printed.count(marker) == 2, printed
        assert len(printed.splitlines()) == 3 and "  a <mask> sitting\\non a <mask>  " in printed, printed
    assert "1 mask(s) ->" in printed and "2 mask(s) ->" in printed


def test_run_json_gives_the_answers_the_text_lines_print(
    tiny_export: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints each head's answers as values (what /v1/<head> returns); held to numbers torch
    computes from load()'s outputs for the same encoding, and to the text lines of the same run."""
    import torch
    from PIL import Image
    from transformers import BridgeTowerProcessor

    import btdeploy

    texts = ["a cat on a <mask>", "two <mask> in a park"]
    for head in ("itm", "itc", "mlm", "base"):
        args = ["run", str(tiny_export), "--head", head, "--image", str(image), "--text", texts[0], "--text", texts[1]]
        assert main([*args, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["head"], printed["image"]) == (head, str(image))
        answers = printed["answers"]
        assert [answer["text"] for answer in answers] == texts
        processor = BridgeTowerProcessor.from_pretrained(tiny_export / head / "processor")
        encoding = processor([Image.open(image).convert("RGB")] * 2, texts, padding=True, return_tensors="np")
        outputs = {k: torch.from_numpy(v) for k, v in btdeploy.load(tiny_export, head=head)(**encoding).items()}
        if head == "itm":
            expected = torch.softmax(outputs["logits"].double(), -1)[:, 1]
            assert [a["match_probability"] for a in answers] == pytest.approx(expected.tolist(), abs=1e-6)
        elif head == "itc":
            expected = (outputs["text_embeds"] * outputs["image_embeds"]).sum(-1)
            assert [a["cosine"] for a in answers] == pytest.approx(expected.tolist(), abs=1e-6)
        elif head == "mlm":
            masked = torch.from_numpy(encoding["input_ids"] == processor.tokenizer.mask_token_id)
            best = outputs["logits"].argmax(-1)
            assert [a["predicted_tokens"] for a in answers] == [
                [processor.decode([int(t)]) for t in best[row][masked[row]]] for row in range(2)
            ]
        else:
            expected = outputs["pooler_output"].norm(dim=-1)
            assert [a["pooler_output_norm"] for a in answers] == pytest.approx(expected.tolist(), rel=1e-6)
        assert main(args) == 0  # the text lines say what the values say
        lines = capsys.readouterr().out.splitlines()[1:]
        for line, answer in zip(lines, answers, strict=True):
            for value in answer.values():
                if isinstance(value, float):
                    assert f"{value:.4f}".lstrip("-") in line, (line, answer)


def test_run_top_k_lists_the_likeliest_tokens_of_each_mask(
    tiny_export: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each <mask>'s K tokens and probabilities, held to a softmax and top-k computed by torch on
    the logits btdeploy.load gives for the same encoding."""
    import ast
    import re

    import torch
    from PIL import Image
    from transformers import BridgeTowerProcessor

    import btdeploy

    texts = ["a cat looking out of the <mask>", "a <mask> sitting on a <mask>"]
    args = ["run", str(tiny_export), "--head", "mlm", "--image", str(image), "--top-k", "3"]
    assert main([*args, "--text", texts[0], "--text", texts[1]]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    processor = BridgeTowerProcessor.from_pretrained(tiny_export / "mlm" / "processor")
    encoding = processor([Image.open(image).convert("RGB")] * 2, texts, padding=True, return_tensors="np")
    logits = torch.from_numpy(btdeploy.load(tiny_export, head="mlm")(**encoding)["logits"])
    for row, line in enumerate(lines):
        masked = torch.from_numpy(encoding["input_ids"][row] == processor.tokenizer.mask_token_id)
        best = torch.softmax(logits[row][masked].double(), -1).topk(3)
        listed = re.findall(r"; mask (\d): (.*?)(?=; mask \d:|$)", line)
        assert [int(number) for number, _ in listed] == list(range(1, int(masked.sum()) + 1)), line
        for (_, cells), probabilities, ids in zip(listed, best.values, best.indices, strict=True):
            printed = re.findall(r"('.*?'|\".*?\") (\d\.\d{3})", cells)
            assert [ast.literal_eval(token) for token, _ in printed] == [processor.decode([int(i)]) for i in ids], line
            assert [float(p) for _, p in printed] == pytest.approx(probabilities.tolist(), abs=5e-4), line
    for head in ("itm", "itc"):  # one answer per text: nothing to rank
        assert main(["run", str(tiny_export), "--head", head, "--image", str(image), "--text", "a", *args[-2:]]) == 2
        assert "--top-k lists the mlm head's candidates for each <mask>" in capsys.readouterr().err
    assert main([*args[:-1], "101", "--text", texts[0]]) == 2
    assert "--top-k: top_k for the masked words must be 1..100, got 101" in capsys.readouterr().err


def test_run_picks_the_graph_backend_and_precision(
    tiny_export: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = tmp_path / "itm"
    shutil.copytree(tiny_export / "itm", folder)
    assert main(["optimize", str(folder), "--flavour", "ort"]) == 0
    assert main(["quantize", str(folder), "--precision", "int8-dynamic"]) == 0
    capsys.readouterr()
    logits = {}
    for extra, graph in (([], "(model.onnx on CPU"), (["--precision", "int8-dynamic"], "(model.ort.int8-dynamic.onnx"),
                         (["--backend", "torch"], "(transformers BridgeTowerForImageAndTextRetrieval")):  # fmt: skip
        assert main(["run", str(folder), "--head", "itm", "--image", str(image), "--text", "a cat", *extra]) == 0
        printed = capsys.readouterr().out
        assert graph in printed.splitlines()[0], printed
        logits[graph] = float(printed.split("(logit ")[1].split(")")[0])
    fp32, int8, torch_logit = logits.values()
    assert abs(fp32 - torch_logit) < 2e-4 and abs(fp32 - int8) <= 0.05  # printed to 4 decimals
    assert main(["run", str(folder), "--head", "itm", "--image", str(image), "--text", "x", "--precision", "int8"]) == 2
    assert "model.ort.int8.onnx does not exist: run btdeploy quantize" in capsys.readouterr().err


def test_run_takes_the_head_of_a_head_folder(
    tiny_export: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A head folder names its head: --head is needed only for an export folder of several."""
    assert main(["run", str(tiny_export / "itc"), "--image", str(image), "--text", "a cat"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("itc on ") and "text-image cosine" in printed
    assert main(["run", str(tiny_export), "--image", str(image), "--text", "a cat"]) == 2
    assert "holds several heads (base, itc, itm, mlm): choose one (head=... in Python, --head on the command line)" in (
        capsys.readouterr().err
    )


def test_each_backend_takes_its_own_default_precision(
    tiny_export: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--backend tensorrt without --precision runs its fp16 engine: the command line's fp32 default
    had it refused as 'cannot run fp32 trt graphs'. Without a GPU it is refused for that instead."""
    from btdeploy.backends.targets import get_target

    assert get_target("tensorrt").defaults["precision"] == "fp16"
    code = main(
        ["run", str(tiny_export), "--head", "itm", "--image", str(image), "--text", "a", "--backend", "tensorrt"]
    )
    err = capsys.readouterr().err
    if code == 2:
        assert "fp32" not in err and "tensorrt" in err.lower(), err


def test_run_on_a_missing_image_is_one_line(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", str(tiny_export), "--head", "itm", "--image", str(tmp_path / "none.png"), "--text", "hi"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("none.png does not exist")


def test_pipeline_exports_checks_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pipe"
    assert main(["pipeline", "--model", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pipeline PASSED" in printed
    for head in ("base", "itm", "itc", "mlm"):
        assert (out / head / "model.onnx").is_file()
    graphs = ["plain", "ort", "trt", "trt-compat", "ort.fp16", "ort.int8", "ort.int8-dynamic"]
    graphs += ["trt.fp16", "trt.int8", "trt-compat.fp16", "trt-compat.int8"]
    for graph in graphs:
        report = json.loads((out / f"parity.{graph}.json").read_text())
        assert report["passed"] is True and len(report["rows"]) == 9, graph
    # Every graph TensorRT will be given passes the operator check of the TensorRT line it targets.
    for flavour, line, opsets in (("trt", "10.14", {23}), ("trt-compat", "10.3", set(range(17, 21)))):
        paths = sorted(out.glob(f"*/model.{flavour}.onnx")) + sorted(out.glob(f"*/model.{flavour}.int8.onnx"))
        paths += sorted(out.glob(f"*/model.{flavour}.fp16.onnx"))
        assert len(paths) == 4 * 3  # fp32, fp16 and int8 per head
        for path in paths:
            ops = check_tensorrt_ops(onnx.load(str(path)), line)
            assert ops.passed and ops.opset in opsets, (path, ops.unsupported, ops.opset)
    assert printed.count("14/14 attn, 2/2 bridge") == 9 and printed.count("12/12 attn, 2/2 bridge") == 3


@pytest.mark.parametrize("module", ["btdeploy.cli", "btdeploy"])  # python -m btdeploy: a checkout, not installed
def test_console_script_reports_errors_without_a_traceback(tmp_path: Path, module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is neither a preset (tiny, base, large) nor a checkpoint folder" in result.stderr


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`btdeploy doctor | head -1` where head has gone: exit 141 as a shell reports it, not an error
    telling the user to check a path, and no traceback from Python's last flush of stdout."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        result = subprocess.run(
            [sys.executable, "-m", "btdeploy", "doctor"], stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr[-2000:]
    assert result.stderr == ""


def test_optimize_check_and_bench_the_flavours(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["export", "--model", "tiny", "--heads", "itm", "--out", str(out)]) == 0
    for flavour in ("ort", "trt"):
        assert main(["optimize", str(out), "--flavour", flavour]) == 0
        assert main(["check", str(out), "--flavour", flavour, "--batch-sizes", "2", "--seq-lens", "9"]) == 0
    err = capsys.readouterr().err
    assert err.count("attention blocks fused: 14 of 14, bridge add+LayerNorm: 2 of 2") == 2
    code = main(["bench", str(out), "--variants", "ort,ort-fused,trt-graph", "--batch-sizes", "1",
                 "--seq-lens", "8", "--iters", "2", "--warmup", "0", "--out", str(tmp_path / "bench")])  # fmt: skip
    assert code == 0
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| itm | 1 | 8 | ort-fused |" in table and "| itm | 1 | 8 | trt-graph |" in table


def test_pipeline_builds_and_checks_engines_where_tensorrt_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The engine step, with the tensorrt target standing in: it 'builds' by choosing the graph
    TensorRT 10.3 would parse and runs that graph on ONNX Runtime."""
    import dataclasses

    from btdeploy.apps.pipeline import run_pipeline
    from btdeploy.artifacts.graph_names import Precision
    from btdeploy.backends import targets
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
    from btdeploy.backends.tensorrt.build import choose_graph

    built: list[str] = []

    def build(folder: Path, precision: Precision, **settings: object) -> Path:
        path, _ = choose_graph(read_manifest(folder), Precision(precision), "10.3.0")
        built.append(path.name)
        return path

    def make(manifest: Manifest, options: targets.RunOptions) -> Backend:
        path, _ = choose_graph(manifest, options.precision, "10.3.0")
        return OnnxRuntimeBackend(path, ["logits"], ["cpu"])

    stand_in = dataclasses.replace(targets.TENSORRT, unavailable=lambda options: None, build=build, make=make)
    monkeypatch.setitem(targets.TARGETS, "tensorrt", stand_in)
    out = tmp_path / "pipe"
    assert run_pipeline("tiny", out, heads=["itm"], precisions=("fp16", "int8"))
    assert built == ["model.trt-compat.fp16.onnx", "model.trt-compat.int8.onnx"]  # one engine per precision
    for precision in ("fp16", "int8"):
        report = json.loads((out / f"parity.tensorrt.{precision}.json").read_text())
        assert report["passed"] and report["backend"] == "tensorrt" and report["precision"] == precision
    assert "== tensorrt.int8 graph (tensorrt int8 engine) ==" in capsys.readouterr().out


def test_every_option_of_every_command_says_what_it_does() -> None:
    commands = cli_commands()
    silent = [f"{name} {action.dest}" for name, sub in commands.items() for action in sub._actions if not action.help]
    assert len(commands) >= 10 and silent == []


def test_the_overview_names_every_command() -> None:
    from btdeploy.cli import build_parser

    listed = re.split(r"[\s,.()]+", (build_parser().description or "").partition(":")[2])
    unnamed = [name for name in cli_commands() if name not in listed]
    assert unnamed == []


def test_a_head_without_weights_in_the_checkpoint_is_flagged_where_people_look(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A released checkpoint may lack a head (base-itm-mlm has no itc weights): the export goes
    ahead with random weights, and the summary, pipeline.json and load() all say so."""
    from conftest import NON_DEFAULT_CONFIG, make_checkpoint

    import btdeploy
    from btdeploy.model.heads import HEADS

    checkpoint = make_checkpoint(tmp_path / "ckpt", NON_DEFAULT_CONFIG, heads=("itm", "mlm"))
    out = tmp_path / "out"
    argv = ["pipeline", "--model", str(checkpoint), "--heads", "itm,itc", "--precisions", "none"]
    assert main([*argv, "--flavours", "ort", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    verdicts = {line.split()[0]: line.split("bridge")[-1].strip() for line in printed.splitlines() if "attn," in line}
    assert verdicts == {"itm": "PASS", "itc": "PASS, RANDOM head weights"}
    assert "  itc: " in printed and "drawn at random: its graphs match that random model, but its answers" in printed
    random = json.loads((out / "pipeline.json").read_text())["random_head_weights"]
    assert list(random) == ["itc"] and random["itc"]
    assert all(name.startswith(HEADS["itc"].head_weight_prefixes) for name in random["itc"])
    btdeploy.load(out, head="itc")
    assert "the itc head in" in capsys.readouterr().err
    btdeploy.load(out, head="itm")
    assert "WARNING" not in capsys.readouterr().err


def test_triton_repo_offers_only_precisions_its_backends_run(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bf16 runs on the PyTorch reference and OpenVINO only; Triton (ONNX Runtime, TensorRT) had
    offered it in --help and refused it after reading the export."""
    assert main(["triton-repo", str(tiny_export), "--out", str(tmp_path / "repo"), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bf16' (choose from 'fp32', 'fp16', 'int8', 'int8-dynamic')" in err, err


def test_rank_offers_bf16_and_names_the_backend_that_runs_it(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """rank runs on ONNX Runtime or OpenVINO: bf16 is OpenVINO's, refused on ONNX Runtime before any work."""
    from PIL import Image

    image, texts = tmp_path / "x.png", tmp_path / "captions.txt"
    Image.new("RGB", (40, 30)).save(image)
    texts.write_text("a cat\na dog\n")
    assert main(["rank", str(tiny_export), "--image", str(image), "--texts", str(texts), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "the onnxruntime backend cannot run bf16" in err and "openvino" in err, err


def test_serve_offers_bf16_and_names_the_backend_that_runs_it(
    tiny_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve runs bf16 on --backend openvino only; on its default backend the choice is refused in one line."""
    from btdeploy.serve.process import free_port

    assert main(["serve", str(tiny_export), "--heads", "itm", "--precision", "bf16", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("btdeploy: error: the onnxruntime backend cannot run bf16"), err
    assert err.endswith("bf16 trt on openvino") and "\n" not in err, err


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "btdeploy", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"btdeploy {version('btdeploy')}", done
