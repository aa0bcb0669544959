"""The README's command blocks as a user copies them: every `btdeploy` line is one the CLI accepts
(an option renamed or a choice dropped would otherwise leave the README behind), every
`quantize` line comes after the `optimize` line that makes the graph it starts from (the quantize
methods say which), every `python benchmarks/...` command it quotes takes the arguments shown, and
the options it lists for each backend of `btdeploy.load` are the ones that backend takes; and every
`--option` the docs name in prose is one that btdeploy, a benchmark script or the quoted tool takes;
and every relative link of the docs reaches a file or a heading."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import BENCHMARKS, benchmark_module, cli_commands, cli_refusal

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.cli import build_parser
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


def _refused(blocks: list[list[list[str]]]) -> list[str]:
    """Each command the CLI's parser refuses, with its one-line reason (nothing is run)."""
    return [refusal for commands in blocks for words in commands if (refusal := cli_refusal(words))]


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


def test_every_command_in_the_readme_parses() -> None:
    blocks = _blocks(README.read_text())
    assert sum(len(commands) for commands in blocks) >= 20
    assert _refused(blocks) == []


@pytest.mark.parametrize(
    "block",
    [
        "btdeploy check out/ --precision int4\n",  # a precision the CLI has not
        "btdeploy check out/ --tolerance 1e-3\n",  # an option it has not
        "btdeploy quantize out/ --flavour ort\n",  # --precision left out
    ],
)
def test_the_parse_check_finds_a_command_the_cli_refuses(block: str) -> None:
    assert len(_refused(_blocks(f"```bash\n{block}```\n"))) == 1


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


class _Parsed(Exception):
    """Raised by the patched parse_args once a script's arguments parsed: nothing of the script runs."""


def _script_commands(text: str) -> list[list[str]]:
    """Each `python benchmarks/NAME.py ARGS` the text quotes inline (a span may wrap), as [NAME.py, ARGS...]."""
    spans = re.findall(r"`python benchmarks/([^`]+)`", text.replace("\n", " "))
    return [shlex.split(span.replace("...", "")) for span in spans]


def _script_refusal(words: list[str]) -> str | None:
    """Why the script would not take these arguments, or None: its main() runs up to its own parse."""
    path = BENCHMARKS / words[0]
    if not path.is_file():
        return f"benchmarks/{words[0]} does not exist"
    script = benchmark_module(path.stem)  # imported, not run as __main__: nothing of it runs yet
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        parse(parser, *args, **kwargs)
        raise _Parsed

    argv, argparse.ArgumentParser.parse_args = sys.argv, parse_then_stop  # type: ignore[assignment]
    sys.argv = [str(path), *words[1:]]
    try:
        with contextlib.redirect_stderr(io.StringIO()) as said:
            script.main()
    except _Parsed:
        return None
    except SystemExit as done:
        return f"{shlex.join(words)}: exit {done.code}, {said.getvalue().strip().splitlines()[-1:]}"
    finally:
        argparse.ArgumentParser.parse_args, sys.argv = parse, argv  # type: ignore[method-assign]
    return f"{shlex.join(words)}: main() returned without parsing its arguments"


def test_every_benchmark_script_the_readme_quotes_takes_the_arguments_shown() -> None:
    commands = _script_commands(README.read_text())
    assert len(commands) >= 15
    assert [refusal for words in commands if (refusal := _script_refusal(words))] == []


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("`python benchmarks/profile_ort.py G.onnx --batch 4 --seq-len 40`", False),
        ("`python benchmarks/profile_ort.py G.onnx --batches 4`", True),  # an option it has not
        ("`python benchmarks/no_such_script.py DIR`", True),
    ],
)
def test_the_script_check_finds_arguments_a_script_refuses(text: str, refused: bool) -> None:
    (words,) = _script_commands(text)
    assert (_script_refusal(words) is not None) == refused


def _listed_backend_options(text: str) -> dict[str, set[str]]:
    """The Python runtime's paragraph "Each backend takes its own options and nothing else:
    `name` takes `option` (...), ..." as each backend's set of options."""
    start = text.index("Each backend takes its own options and nothing else:")
    paragraph = text[start : text.index("A misspelled option", start)]
    names = list(re.finditer(r"`(\w+)` takes ", paragraph))
    listed = {}
    for here, after in zip(names, [*names[1:], None], strict=True):
        segment = paragraph[here.end() : after.start() if after else len(paragraph)]
        listed[here.group(1)] = set(re.findall(r"`(\w+)`", segment))
    return listed


def test_the_readme_lists_each_backends_options_as_the_backend_takes_them() -> None:
    from btdeploy.backends.targets import TARGETS

    listed = _listed_backend_options(README.read_text())
    assert {name: set(target.options) for name, target in TARGETS.items()} == listed


def test_the_option_list_check_finds_an_option_left_out() -> None:
    text = README.read_text().replace("`spin`, ", "", 1)
    assert "spin" not in _listed_backend_options(text)["onnxruntime"]


# Options of other tools the README quotes, each with its tool.
OTHER_TOOLS_OPTIONS = {
    "--data-binary": "curl", "--dist": "pytest-xdist", "--dry-run": "pip", "--ignore-installed": "pip",
    "--index-url": "pip", "--python-platform": "uv pip compile", "--system-site-packages": "venv",
    "--gpus": "docker run", "--rm": "docker run", "--model-repository": "tritonserver",
    "--preload": "gunicorn", "--max-requests": "gunicorn",
}  # fmt: skip


@functools.cache
def _known_options() -> frozenset[str]:
    """Every option a btdeploy command, a benchmark script or a quoted tool takes."""
    parsers = [build_parser(), *cli_commands().values()]
    known = {option for parser in parsers for action in parser._actions for option in action.option_strings}
    for script in BENCHMARKS.glob("*.py"):
        known.update(re.findall(r'"(--[a-z][a-z0-9-]*)"', script.read_text()))
    return frozenset(known | set(OTHER_TOOLS_OPTIONS))


def _unknown_options(text: str) -> list[str]:
    """Each `--option` a document names that nothing takes: prose outside the command blocks,
    which the parse checks above do not read."""
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)) - _known_options())


# The docs a user reads: the README, ARCHITECTURE.md, the recipes' README and every Markdown file
# under benchmarks/ (the results' commands are how a result is measured again).
DOCUMENTS = [README, README.parent / "ARCHITECTURE.md", *sorted((README.parent / "export").glob("*.md"))]
DOCUMENTS += sorted((README.parent / "benchmarks").rglob("*.md"))


def test_every_option_the_docs_name_exists() -> None:
    unknown = {
        str(doc.relative_to(README.parent)): found for doc in DOCUMENTS if (found := _unknown_options(doc.read_text()))
    }
    assert len(DOCUMENTS) > 100 and unknown == {}


def test_the_option_check_finds_a_renamed_option() -> None:
    assert _unknown_options(README.read_text() + " `--calib-image DIR`") == ["--calib-image"]


def _heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _broken_links(doc: Path, text: str) -> list[str]:
    """Relative links of a Markdown file whose file is missing, and #anchors it has no heading for."""
    anchors = {_heading_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        if (path and not (doc.parent / path).exists()) or (not path and anchor not in anchors):
            broken.append(target)
    return broken


def test_every_relative_link_in_the_docs_resolves() -> None:
    """The README's contents line and its links to results, and the results' links to their runs:
    a result moved or renamed would leave them pointing at nothing."""
    broken = {
        str(doc.relative_to(README.parent)): found
        for doc in DOCUMENTS
        if (found := _broken_links(doc, doc.read_text()))
    }
    assert broken == {}


def test_the_link_check_finds_a_missing_file_and_a_missing_heading() -> None:
    text = "# Setup\n[ok](#setup) [gone](#nowhere) [file](ARCHITECTURE.md) [lost](results/nothing.md)"
    assert _broken_links(README, text) == ["#nowhere", "results/nothing.md"]
