"""benchmarks/gpu_check.sh runs only where a GPU is lent, a few minutes at a time: every btdeploy
command it holds must parse, and every bench variant it names must exist, before it gets there
(an option renamed or a variant dropped would otherwise cost a GPU session)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import cli_refusal

from btdeploy.bench.variants import VARIANTS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"

# One value the script's loops and locals take, for each expansion in a command line.
_EXPANSIONS = {
    '"${shapes[@]}"': "--batch-sizes 1,8 --seq-lens 16,40",
    '"${graph%.*}"': "trt",
    '"${graph#*.}"': "fp16",
    '"$precision"': "fp16",
    '"$flavour"': "trt-compat",
}


def _commands(script: str) -> list[list[str]]:
    """Each `btdeploy ...` line and each `check NAME ...` line (which runs `btdeploy check ...`),
    continuation lines joined, expansions replaced by a value they take, as argv after `btdeploy`."""
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = []
    for line in joined.splitlines():
        line = line.split(" >", 1)[0].split(" |", 1)[0].split(" #", 1)[0].strip()
        if line.startswith(("btdeploy() ", "check() ")) or '"$@"' in line:
            continue  # the shell functions themselves
        if line.startswith("btdeploy "):
            words = line
        elif line.startswith("check "):
            words = "btdeploy check " + line.split(maxsplit=2)[2]  # without the report's name
        else:
            continue
        for expansion, value in _EXPANSIONS.items():
            words = words.replace(expansion, value)
        words = re.sub(r'"?\$(?:work|results|\{?\w+\}?)[^ "]*"?', "/tmp/gpu-check", words)
        commands.append(shlex.split(words)[1:])
    return commands


def _problems(commands: list[list[str]]) -> list[str]:
    problems = []
    for words in commands:
        refusal = cli_refusal(words)
        if refusal:
            problems.append(refusal)
        if "--variants" in words:
            unknown = [v for v in words[words.index("--variants") + 1].split(",") if v not in VARIANTS]
            if unknown:
                problems.append(f"{shlex.join(words)}: no bench variant {', '.join(unknown)}")
    return problems


def test_every_command_of_the_gpu_check_parses_and_names_real_variants() -> None:
    commands = _commands(SCRIPT.read_text())
    subcommands = {words[0] for words in commands}
    assert {"export", "check", "optimize", "quantize", "build", "bench", "doctor"} <= subcommands
    assert len(commands) >= 15
    assert _problems(commands) == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('  btdeploy build "$work/$model" --heads itm --precision "$precision" --timing-cash x\n', "--timing-cash"),
        ('  check "parity.x" "$work/base" --providers cuda cpu --tolerance 1e-3\n', "--tolerance"),
        ('  btdeploy bench "$work/base" --heads itm --variants torch-eager,trt-fp32 --out "$results/b"\n', "trt-fp32"),
    ],
)
def test_the_script_check_finds_a_command_that_would_fail_on_the_gpu(line: str, problem: str) -> None:
    problems = _problems(_commands(line))
    assert len(problems) == 1 and problem in problems[0]
