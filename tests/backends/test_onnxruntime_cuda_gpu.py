"""ONNX Runtime's CUDA provider on a GPU: the plain, fused (ort) and standard-ONNX (trt) graphs of
tiny, FP32 and FP16, held to the precision floors, and a session that really runs on the GPU.
Marked `gpu`; skipped with the reason where there is no NVIDIA GPU or ONNX Runtime cannot start
its CUDA provider (run: python -m pytest -m gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from btdeploy.artifacts.graph_names import Precision
from btdeploy.model.heads import HEADS
from btdeploy.model.inputs import sample_inputs
from btdeploy.verify.check import check_export

pytestmark = pytest.mark.gpu

CUDA = ["cuda", "cpu"]


def _skip_reason() -> str | None:
    from btdeploy.backends.provider_probe import start_problem
    from btdeploy.backends.tensorrt.environment import gpu

    if gpu() is None:
        return "no NVIDIA GPU visible to torch: ONNX Runtime's CUDA provider needs one"
    return start_problem("CUDAExecutionProvider")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.optimize.optimizer import optimize_head
    from btdeploy.quantize.quantizer import quantize_head

    out = tmp_path_factory.mktemp("ort-cuda")
    export_heads(resolve_model("tiny"), list(HEADS), out)
    for head in HEADS:
        for flavour in ("ort", "trt"):
            optimize_head(out / head, flavour)
        for flavour in ("ort", "trt"):  # ort's fp16 graph starts from the trt graph
            quantize_head(out / head, "fp16", flavour)
    return out


@pytest.mark.parametrize(
    ("flavour", "precision"),
    [(None, "fp32"), ("ort", "fp32"), ("ort", "fp16"), ("trt", "fp32"), ("trt", "fp16")],
)
def test_graphs_on_the_cuda_provider_meet_the_floors(graphs: Path, flavour: str | None, precision: str) -> None:
    rows = check_export(graphs, None, (1, 3), (5, 40), providers=CUDA, flavour=flavour, precision=precision)
    assert {row.head for row in rows} == set(HEADS)
    for row in rows:
        assert row.passed, (row.head, row.output, row.stats)


def test_the_fused_graph_runs_on_the_gpu_and_agrees_with_the_cpu(graphs: Path) -> None:
    """Within FP32's bound of the CPU provider (with the CUDA provider's default TF32, base at batch 32 was not)."""
    import btdeploy
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend

    on_gpu = btdeploy.load(graphs, head="itm", flavour="ort", providers=CUDA)
    on_cpu = btdeploy.load(graphs, head="itm", flavour="ort", providers=["cpu"])
    assert isinstance(on_gpu.backend, OnnxRuntimeBackend)
    assert on_gpu.backend.providers[0] == "CUDAExecutionProvider", on_gpu.backend.providers
    bound = HEADS["itm"].output("logits").tolerances[Precision.FP32].max_abs
    for seed, (batch, length) in enumerate([(1, 5), (3, 40), (2, 17)]):
        feeds = sample_inputs(on_cpu.config, batch, length, seed=seed)
        expected, got = on_cpu(**feeds).logits, on_gpu(**feeds).logits
        assert got.shape == expected.shape == (batch, 2)
        np.testing.assert_allclose(got, expected, rtol=0, atol=bound)
