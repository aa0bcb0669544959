"""The target registry: backends are built only through it, with checked, typed options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import btdeploy
from btdeploy.artifacts.graph_names import Flavour, Precision
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.targets import TARGETS, RunOptions, get_target
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS


def _one_line(error: pytest.ExceptionInfo[BtDeployError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_split_false_is_every_backends_default(tiny_export: Path) -> None:
    # load() names split in its signature (so that a type checker knows what split=True returns);
    # passed as False it asks for what every backend does anyway.
    runtime = btdeploy.load(tiny_export, head="itm", backend="torch", split=False)
    assert type(runtime) is btdeploy.Runtime and runtime.load_arguments is not None
    assert "split" not in runtime.load_arguments[3]


@pytest.mark.parametrize(
    ("backend", "options", "expected"),
    [
        ("onnxruntime", {"precison": "int8"}, "unknown option(s) 'precison': the onnxruntime backend takes"),
        ("onnxruntime", {"flavor": "ort"}, "unknown option(s) 'flavor'"),
        ("torch", {"precision": "int8"}, "the torch backend cannot run int8 plain graphs"),
        (
            "torch",
            {"flavour": "ort"},
            "the torch backend (the transformers model itself, rebuilt from the manifest) does not take 'flavour'",
        ),  # fmt: skip
        ("tensorrt", {"precision": "int8-dynamic"}, "the tensorrt backend cannot run int8-dynamic trt graphs"),
        (
            "onnxruntime",
            {"flavour": "trt", "precision": "int8-dynamic"},
            "cannot run int8-dynamic trt graphs: it runs fp32 plain, fp32 ort, fp16 ort, int8 ort, fp32 trt, fp16 trt, "
            "int8 trt, fp32 trt-compat, fp16 trt-compat, int8 trt-compat, int8-dynamic ort; int8-dynamic is run as "
            "int8-dynamic ort on onnxruntime",
        ),  # no backend runs that graph: the message names the one that exists
        ("onnxruntime", {"precision": "int9"}, "precision 'int9': choose one of fp32, fp16, bf16, int8, int8-dynamic"),
        ("onnxruntime", {"flavour": "tensorrt"}, "flavour 'tensorrt': choose one of ort, trt"),
        ("onnxruntime", {"cuda_graphs": True}, "does not take 'cuda_graphs'"),
        ("torch", {"split": True}, "does not take 'split'"),
        ("onnxruntime", {"split": "yes"}, "split='yes': give True or False"),
        ("torch", {"spin": False}, "does not take 'spin'"),
        ("onnxruntime", {"providers": ["cuda"]}, "GPU providers need an NVIDIA GPU, and torch sees none here"),
        ("tensorflow", {}, "unknown backend 'tensorflow': choose one of onnxruntime, torch, tensorrt, openvino"),
        ("onnxruntime", {"spin": "no"}, "spin='no': give True or False"),
        ("onnxruntime", {"threads": -1}, "threads=-1: give a number of threads (0 or None: every core)"),
        ("onnxruntime", {"threads": 1.5}, "threads=1.5: give a number of threads"),
        ("onnxruntime", {"providers": "cuda"}, "GPU providers need an NVIDIA GPU"),  # one name
    ],
)
def test_load_refuses_bad_options_with_one_line(
    tiny_export: Path, backend: str, options: dict[str, Any], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from btdeploy.backends.tensorrt import environment

    monkeypatch.setattr(environment, "gpu", lambda: None)  # the same refusals on a machine with a GPU
    with pytest.raises(BtDeployError) as error:
        btdeploy.load(tiny_export, head="itm", backend=backend, **options)
    assert expected in _one_line(error)


def test_the_onnx_runners_run_split_graphs_and_the_others_refuse_the_option() -> None:
    assert [name for name, target in TARGETS.items() if target.runs_split] == ["onnxruntime", "openvino"]
    for name, target in TARGETS.items():
        if not target.runs_split:
            with pytest.raises(BtDeployError) as error:
                target.resolve({"split": True})
            assert f"the {name} backend" in _one_line(error) and "does not take 'split'" in _one_line(error)


def test_the_impossible_pair_names_where_it_runs() -> None:
    with pytest.raises(BtDeployError) as error:
        get_target("torch").resolve({"precision": "int8"})
    assert "int8 plain runs on" not in _one_line(error)  # no target runs an unoptimized int8 graph
    with pytest.raises(BtDeployError) as error:
        get_target("tensorrt").resolve({"precision": "fp32"})
    message = _one_line(error)
    expected = (
        "cannot run fp32 trt graphs: it runs fp16 trt, int8 trt, fp16 trt-compat, int8 trt-compat; fp32 trt runs on"
    )
    assert expected in message


def test_resolved_options_are_typed_and_defaulted() -> None:
    options = get_target("onnxruntime").resolve({"precision": "int8", "providers": ["cpu"], "threads": 2})
    assert options == RunOptions(Flavour.ORT, Precision.INT8, ("cpu",), 2)
    assert get_target("onnxruntime").resolve({}) == RunOptions()
    assert get_target("onnxruntime").resolve({"spin": False}).spin is False
    assert get_target("torch").resolve({"spin": True}) == RunOptions()  # the default is not an option given
    # Every bench variant is a graph its target declares.
    for target in TARGETS.values():
        for variant in target.variants:
            assert (variant.options.flavour, variant.options.precision) in target.graphs, variant.name


def test_the_cli_refuses_an_impossible_pair_with_exit_2(tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tiny_export), "--heads", "itm", "--backend", "torch", "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("btdeploy: error: the torch backend cannot run int8 plain graphs") and "\n" not in err


def test_a_provider_fallback_is_allowed_on_request_and_reported_truthfully(tiny_export: Path) -> None:
    # onnxruntime-gpu always lists CUDAExecutionProvider; without a GPU it cannot start it.
    runtime = btdeploy.load(tiny_export, head="itm", providers=["cuda", "cpu"], provider_fallback=True)
    description = runtime.backend.description
    import torch

    expected = "CUDAExecutionProvider, CPUExecutionProvider" if torch.cuda.is_available() else "CPUExecutionProvider"
    assert description.endswith(f"on {expected}"), description


def test_the_cuda_provider_is_asked_for_fp32_without_tf32(tiny_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA provider multiplies FP32 in TF32 by default: on an H200, base itm's FP32 graph then
    differed from the CPU by 4.7e-4 at 32 x 40 (FP32's bound is 1e-4), and by 1.3e-6 with it off."""
    import onnxruntime as ort

    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend

    asked: list[object] = []
    real_session = ort.InferenceSession

    def recording_session(source: object, sess_options: object = None, providers: list[object] | None = None) -> object:
        asked.extend(providers or [])
        return real_session(source, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    output_names = HEADS["itm"].output_names
    OnnxRuntimeBackend(tiny_export / "itm" / "model.onnx", output_names, ["cuda", "cpu"], provider_fallback=True)
    assert asked == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


def test_gpu_providers_without_a_gpu_are_refused_before_the_session_unless_falling_back(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu lists its CUDA provider on any machine: without a GPU the session failed with
    ONNX Runtime's own library errors, and `bench --device cuda` stopped at the first ONNX Runtime
    variant instead of skipping it."""
    from btdeploy.backends.tensorrt import environment
    from btdeploy.bench.variants import VARIANTS, BenchEnv

    monkeypatch.setattr(environment, "gpu", lambda: None)
    with pytest.raises(BtDeployError, match="GPU providers need an NVIDIA GPU, and torch sees none here"):
        btdeploy.load(tiny_export, head="itm", providers=["cuda", "cpu"])
    runtime = btdeploy.load(tiny_export, head="itm", providers=["cuda", "cpu"], provider_fallback=True)
    assert runtime.backend.description.startswith("model.onnx on ")
    manifest = read_manifest(tiny_export / "itm")
    on_gpu = BenchEnv(threads=1, device="cuda")
    for name in ("ort", "ort-hf-optimizer"):
        assert "need an NVIDIA GPU" in str(VARIANTS[name].unavailable(manifest, on_gpu)), name
        assert VARIANTS[name].unavailable(manifest, BenchEnv(threads=1, device="cpu")) is None, name


def test_a_check_report_names_the_options_it_ran_with_and_the_gpu(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parity report says where the candidate ran (the reference's device, ONNX Runtime's providers):
    the first GPU check's reports of the reference in fp16 on the GPU did not say it was on the GPU."""
    import json

    from btdeploy.backends.tensorrt import environment
    from btdeploy.verify.check import check_export

    monkeypatch.setattr(environment, "gpu", lambda: ("NVIDIA H200", (9, 0)))
    report = tmp_path / "parity.json"
    check_export(tiny_export, ["itm"], (1,), (5,), backend="torch", report=report)
    data = json.loads(report.read_text())
    assert data["options"] == {"checkpoint": None, "compile": False, "device": "cpu", "precision": "fp32"}
    assert data["gpu"] == "NVIDIA H200"
    check_export(tiny_export, ["itm"], (1,), (5,), providers=["cpu"], report=report)
    data = json.loads(report.read_text())
    assert data["options"]["providers"] == ["cpu"] and data["options"]["split"] is False


def test_the_reference_runs_bf16_on_a_cpu_that_multiplies_bfloat16(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's bf16 GEMMs on AVX-512 BF16 ran 2.2x its FP32 ones on a Zen 4, and the reference in bf16
    is a peer a CPU user picks there: offered where the CPU has native bfloat16, refused where it
    would be emulated (slower than FP32), fp16 on the GPU only, whatever the CPU."""
    from btdeploy import cpu
    from btdeploy.verify.check import check_export

    monkeypatch.setattr(cpu, "native_bf16", lambda: ["avx512_bf16"])
    rows = check_export(tiny_export, ["itm", "itc"], (1, 2), (5,), backend="torch", precision="bf16")
    assert rows and all(row.passed for row in rows), [row for row in rows if not row.passed]
    assert all(row.stats.max_abs > 1e-4 and row.precision == "bf16" for row in rows)  # it ran in bf16, not FP32
    with pytest.raises(BtDeployError, match="runs fp16 on a CUDA GPU only"):
        btdeploy.load(tiny_export, head="itm", backend="torch", precision="fp16")
    monkeypatch.setattr(cpu, "native_bf16", lambda: [])
    with pytest.raises(BtDeployError, match=r"bf16 on a CPU with native bfloat16 \(avx512_bf16 or amx_bf16\), "
                       "which this CPU lacks.*--device cuda"):  # fmt: skip
        btdeploy.load(tiny_export, head="itm", backend="torch", precision="bf16")


def test_a_listed_gpu_provider_that_does_not_start_is_found_with_its_reason(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """onnxruntime-gpu built for CUDA 12 on a CUDA 13 machine lists its CUDA provider, prints why it
    cannot load it, and runs on the CPU: the probe turns that print into the reason, once."""
    import os

    import onnxruntime

    from btdeploy.backends import provider_probe

    class CudaLibrariesMissing:
        made = 0

        def __init__(self, model: bytes, providers: list[str]) -> None:
            CudaLibrariesMissing.made += 1
            os.write(2, b"\x1b[1;31m[E:onnxruntime:Default] Failed to load library /x/libonnxruntime_providers_cuda.so "
                        b"with error: libcublasLt.so.12: cannot open shared object file\x1b[m\n")  # fmt: skip
            print("Falling back to ['CPUExecutionProvider'] and retrying.")

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    provider_probe.start_problem.cache_clear()
    monkeypatch.setattr(onnxruntime, "InferenceSession", CudaLibrariesMissing)
    try:
        expected = "ONNX Runtime could not start CUDAExecutionProvider here (libcublasLt.so.12: cannot open shared"
        assert (provider_probe.start_problem("CUDAExecutionProvider") or "").startswith(expected)
        assert (provider_probe.start_problem("CUDAExecutionProvider") or "").startswith(expected)
        assert CudaLibrariesMissing.made == 1  # once per process
    finally:
        provider_probe.start_problem.cache_clear()
    print("after the probe")
    os.write(2, b"stderr is back\n")
    printed = capfd.readouterr()
    assert printed.out == "after the probe\n" and printed.err == "stderr is back\n"  # the probe's prints swallowed


def test_load_names_why_a_listed_gpu_provider_does_not_start(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from btdeploy.backends import provider_probe
    from btdeploy.backends.tensorrt import environment

    monkeypatch.setattr(environment, "gpu", lambda: ("NVIDIA H200", (9, 0)))
    reason = "ONNX Runtime could not start CUDAExecutionProvider here (libcublasLt.so.12: cannot open shared object)"
    monkeypatch.setattr(provider_probe, "start_problem", lambda provider: reason)
    with pytest.raises(BtDeployError) as error:
        btdeploy.load(tiny_export, head="itm", providers=["cuda", "cpu"])
    assert _one_line(error) == f"the onnxruntime backend cannot run here: {reason}: btdeploy doctor shows the CUDA " \
        "and ONNX Runtime versions; or --providers cpu"  # fmt: skip


def test_the_probe_runs_without_a_stderr_to_borrow(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from btdeploy.backends import provider_probe

    class NotStarting:
        def __init__(self, model: bytes, providers: list[str]) -> None:
            pass

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    def no_descriptor(fd: int) -> int:
        raise OSError(9, "Bad file descriptor")

    provider_probe.start_problem.cache_clear()
    monkeypatch.setattr(onnxruntime, "InferenceSession", NotStarting)
    monkeypatch.setattr(provider_probe.os, "dup", no_descriptor)
    try:
        assert provider_probe.start_problem("CUDAExecutionProvider") == (
            "ONNX Runtime could not start CUDAExecutionProvider here"
        )
    finally:
        provider_probe.start_problem.cache_clear()
