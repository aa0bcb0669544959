"""What CPU this is: model, cores and instruction sets, as bench reports and doctor show them."""

from __future__ import annotations

import os
from pathlib import Path

from btdeploy.cpu import INSTRUCTION_SETS, cpu_description, describe_cpu

# Two logical CPUs as /proc/cpuinfo lists them: every field once per CPU.
_CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse2 avx2 fma f16c avx bmi2 sha_ni
processor\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse2 avx2 fma f16c avx bmi2 sha_ni
"""


def test_a_zen3_lists_its_avx2_and_nothing_wider(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_CPUINFO)
    cpu = cpu_description(cpuinfo)
    assert cpu["model"] == "AMD EPYC 7B13 64-Core Processor"
    assert cpu["flags"] == ["avx", "avx2", "fma", "f16c"]  # in INSTRUCTION_SETS' order, not cpuinfo's
    assert cpu["logical_cores"] == os.cpu_count()
    line = describe_cpu(cpuinfo)
    assert line.startswith("AMD EPYC 7B13 64-Core Processor, ") and line.endswith("; avx avx2 fma f16c")


def test_without_cpuinfo_the_instruction_sets_are_unknown_not_absent(tmp_path: Path) -> None:
    cpu = cpu_description(tmp_path / "missing")
    assert cpu["flags"] == [] and cpu["model"]
    assert "instruction sets not known" in describe_cpu(tmp_path / "missing")


def test_this_machine_is_described_from_its_own_cpuinfo() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text()
    model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    cpu = cpu_description()
    assert cpu["model"] == model
    assert set(cpu["flags"]) == flags & set(INSTRUCTION_SETS)


def test_native_bfloat16_is_read_from_the_flags(tmp_path: Path) -> None:
    """torch's bf16 on a CPU is offered only where the CPU multiplies bfloat16 itself."""
    from btdeploy.cpu import native_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_CPUINFO)
    assert native_bf16(cpuinfo) == []  # Zen 3: AVX2 only
    cpuinfo.write_text(_CPUINFO.replace("sha_ni", "sha_ni avx512f avx512_bf16"))
    assert native_bf16(cpuinfo) == ["avx512_bf16"]  # Zen 4, Cooper Lake
    cpuinfo.write_text(_CPUINFO.replace("sha_ni", "amx_bf16 avx512_bf16 amx_tile"))
    assert native_bf16(cpuinfo) == ["avx512_bf16", "amx_bf16"]  # Sapphire Rapids and later
