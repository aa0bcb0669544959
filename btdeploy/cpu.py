"""What CPU this is: its model, its cores, and the instruction sets ONNX Runtime's and OpenVINO's
kernels choose from. Which engine is faster in INT8 depends on them (AVX2 only, AVX-512 VNNI, AMX:
benchmarks/results/base-peers-cpu), so bench reports record them and `btdeploy doctor` prints them.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

# From /proc/cpuinfo's flags, in this order: the vector widths, then the integer and bfloat16 dot products.
INSTRUCTION_SETS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
    "amx_bf16",
)  # fmt: skip
# The instructions that multiply bfloat16 natively. Without them bf16 runs through FP32 conversions,
# slower than FP32 itself, so bf16 is offered on a CPU (the reference, OpenVINO) only with one of them.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
# The instruction sets with which ONNX Runtime's uint8 x int8 GEMMs sum every product in 32 bits.
# Without them its kernel adds two neighbouring products in a 16-bit integer that saturates
# (vpmaddubsw), so the ort INT8 graphs answer differently there (benchmarks/u8s8_saturation.py).
EXACT_INTEGER_SUMS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT16 = (-32768, 32767)


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """{"model", "logical_cores", "flags"}: the model name, and which of INSTRUCTION_SETS it has."""
    model, flags = "", set[str]()
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass  # not Linux: the model from platform, no flags
    return {
        "model": model or platform.processor() or "unknown",
        "logical_cores": os.cpu_count(),
        "flags": [flag for flag in INSTRUCTION_SETS if flag in flags],
    }


def describe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """One line: model, cores and instruction sets."""
    cpu = cpu_description(cpuinfo)
    flags = " ".join(cpu["flags"]) or "instruction sets not known (no /proc/cpuinfo flags)"
    return f"{cpu['model']}, {cpu['logical_cores']} logical cores; {flags}"


def _has(wanted: tuple[str, ...], cpuinfo: Path) -> list[str]:
    flags = cpu_description(cpuinfo)["flags"]
    return [flag for flag in wanted if flag in flags]


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The instruction sets of NATIVE_BF16 this CPU has (empty: bf16 would be emulated)."""
    return _has(NATIVE_BF16, cpuinfo)


def exact_integer_sums(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The instruction sets of EXACT_INTEGER_SUMS this CPU has (empty: saturating 16-bit pair sums)."""
    return _has(EXACT_INTEGER_SUMS, cpuinfo)


def sums_saturate_here(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ONNX Runtime's uint8 x int8 GEMMs sum pairs of products in a saturating int16 here."""
    return not exact_integer_sums(cpuinfo)


class SaturationCount:
    """How many pairs of products `u8s8_gemm` summed, and how many of them saturated."""

    def __init__(self) -> None:
        self.pairs = 0
        self.saturated = 0


def u8s8_gemm(
    a: np.ndarray, b: np.ndarray, saturate: bool, count: SaturationCount | None = None, a_zero: int | np.ndarray = 0
) -> np.ndarray:
    """uint8 a [..., K] times int8 b [K, N] (or per head [H, K, N] against [..., H, S, K]) in int32, as
    ONNX Runtime's kernel sums them: `saturate`, each two neighbouring products (k, k+1) summed in a
    saturating int16 first, as vpmaddubsw does; then a's zero point taken off exactly, from b's
    column sums."""
    count = count if count is not None else SaturationCount()
    column_sums = b.astype(np.int32).sum(-2)
    zero_off = np.asarray(a_zero).astype(np.int32) * (np.expand_dims(column_sums, -2) if b.ndim > 2 else column_sums)
    return _raw_sums(a.astype(np.int32), b.astype(np.int32), saturate, count) - zero_off


def _raw_sums(a: np.ndarray, b: np.ndarray, saturate: bool, count: SaturationCount) -> np.ndarray:
    if not saturate:
        return a @ b
    if b.ndim > 2:
        return np.stack([_raw_sums(a[..., h, :, :], b[h], True, count) for h in range(b.shape[0])], axis=-3)
    lead, k = a.shape[:-1], a.shape[-1]
    a = a.reshape(-1, k)
    if k % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    out = np.empty((a.shape[0], b.shape[1]), np.int32)
    for row in range(0, a.shape[0], 8):  # [8, K/2, N] pairs at a time
        pairs = a[row : row + 8, 0::2, None] * b[None, 0::2, :] + a[row : row + 8, 1::2, None] * b[None, 1::2, :]
        count.pairs += pairs.size
        count.saturated += int(np.count_nonzero((pairs < INT16[0]) | (pairs > INT16[1])))
        out[row : row + 8] = np.clip(pairs, *INT16).sum(1)
    return out.reshape(*lead, b.shape[1])


def bf16_problem(engine: str) -> str | None:
    """Why `engine` should not run bf16 on this CPU (it would be emulated), or None."""
    if native_bf16():
        return None
    return (
        f"{engine} runs bf16 on a CPU with native bfloat16 ({' or '.join(NATIVE_BF16)}), which this CPU lacks "
        "(btdeploy doctor lists its instruction sets)"
    )
