"""The README's command blocks in the order a user copies them: every `quantize` line comes after
the `optimize` line that makes the graph it starts from (the quantize methods say which)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.quantize.methods import get_method

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(text: str) -> list[list[list[str]]]:
    """Each ```bash block as its btdeploy commands (`a && b` is two), each split as a shell would."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands = []
        for line in body.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                if part.strip().startswith("btdeploy "):  # not curl's escaped JSON
                    commands.append(shlex.split(part)[1:])
        blocks.append(commands)
    return blocks


def _option(words: list[str], name: str, default: str) -> str:
    return words[words.index(name) + 1] if name in words else default


def _unmet_quantize_sources(blocks: list[list[list[str]]]) -> list[str]:
    """`quantize` lines whose source graph no earlier `optimize` line of their block makes."""
    unmet = []
    for commands in blocks:
        optimized: set[tuple[str, str]] = set()  # (folder, flavour)
        for words in commands:
            if words[0] == "optimize":
                optimized.add((words[1], _option(words, "--flavour", "")))
            elif words[0] == "quantize":
                flavour = Flavour(_option(words, "--flavour", Flavour.ORT.value))
                source, _ = get_method(_option(words, "--precision", ""), flavour).source(flavour)
                if (words[1], source.value) not in optimized:
                    unmet.append(f"{shlex.join(words)} (starts from the {source} graph)")
    return unmet


def test_every_quantize_line_follows_the_optimize_line_it_starts_from() -> None:
    blocks = _blocks(README.read_text())
    assert sum(words[0] == "quantize" for commands in blocks for words in commands) >= 3
    assert _unmet_quantize_sources(blocks) == []


@pytest.mark.parametrize(
    ("block", "unmet"),
    [
        ("btdeploy optimize out/ --flavour ort\nbtdeploy quantize out/ --precision int8\n", 1),
        ("btdeploy optimize out/ --flavour trt  # x\nbtdeploy quantize out/ --precision fp16\n", 0),
        ("btdeploy optimize out/ --flavour ort && btdeploy quantize out/ --precision int8-dynamic\n", 0),
    ],
)
def test_the_order_check_finds_a_quantize_line_without_its_source(block: str, unmet: int) -> None:
    assert len(_unmet_quantize_sources(_blocks(f"```bash\n{block}```\n"))) == unmet
