"""What the numbers were measured on: CPU, cores, GPU, versions, and the matmul peak."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")


def cpu_description() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model in ("unknown", "", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model": model,
        "logical_cores": os.cpu_count(),
        "flags": [flag for flag in INTERESTING_FLAGS if flag in flags],
    }


def gpu_description() -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "sm": f"{props.major}{props.minor}"}


def machine_description(threads: int) -> dict[str, Any]:
    from ..manifest import tool_versions

    return {
        "cpu": cpu_description(),
        "threads_used": threads,
        "gpu": gpu_description(),
        "os": platform.platform(),
        "versions": tool_versions(),
    }


def matmul_peak_gflops(threads: int, size: int = 1536, seconds: float = 2.0) -> float:
    """The best FP32 GEMM rate of this machine at this thread count (PyTorch's BLAS), in GFLOP/s."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        torch.mm(a, b)  # warm up
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
        return best
    finally:
        torch.set_num_threads(previous)
