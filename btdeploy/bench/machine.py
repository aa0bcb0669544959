"""What the numbers were measured on: CPU, cores, GPU, versions, and the matmul peak."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

from btdeploy.backends.tensorrt.environment import gpu
from btdeploy.cpu import cpu_description


def gpu_description() -> dict[str, Any] | None:
    """The GPU the backends found (environment.gpu, the one lookup), with its memory."""
    found = gpu()
    if found is None:
        return None
    import torch

    name, (major, minor) = found
    memory = torch.cuda.get_device_properties(0).total_memory
    return {"name": name, "memory_gb": round(memory / 2**30, 1), "sm": f"{major}{minor}"}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for a block and put back after it: a bench run from Python (a
    notebook, the tests) leaves the caller's setting as it found it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine_description(threads: int) -> dict[str, Any]:
    from btdeploy import hugepages
    from btdeploy.artifacts.manifest import tool_versions

    return {
        "cpu": cpu_description(),
        "threads_used": threads,
        "huge_pages": hugepages.status().describe(),  # up to 1.23x on ONNX Runtime's CPU provider (hugepages.py)
        "gpu": gpu_description(),
        "os": platform.platform(),
        "versions": tool_versions(),
    }


def cpu_text(machine: dict[str, Any]) -> str:
    """The CPU of a machine description as every report names it: model, cores and the instruction
    sets the kernels choose from (INT8 speed depends on them)."""
    cpu = machine.get("cpu", {})
    flags = ", ".join(cpu.get("flags", []))
    return f"{cpu.get('model', '?')} ({cpu.get('logical_cores', '?')} logical cores; flags: {flags})"


def _best_rate(run: Callable[[], object], flop: float, seconds: float) -> float:
    run()  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        best = max(best, flop / (time.perf_counter() - started) / 1e9)
    return best


def matmul_peak_gflops(threads: int, size: int = 2048, seconds: float = 2.0) -> dict[str, float]:
    """The best FP32 GEMM rate at this thread count, in GFLOP/s, from each GEMM library the
    variants use: PyTorch's BLAS and ONNX Runtime's MLAS (one MatMul node). The benchmark's
    ceiling is the larger: on some CPUs one library is well ahead of the other."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from btdeploy.backends.onnxruntime import session_options

    flop = 2.0 * size**3
    rates: dict[str, float] = {}
    with torch_threads(threads):
        a, b = torch.randn(size, size), torch.randn(size, size)
        rates["torch"] = _best_rate(lambda: torch.mm(a, b), flop, seconds)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = session_options(threads)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": np.ascontiguousarray(b.numpy())}
    rates["onnxruntime"] = _best_rate(lambda: session.run(None, feeds), flop, seconds)
    return rates
