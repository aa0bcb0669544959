"""Shared fixtures: a private cache for preset checkpoints, and tiny exports built once per session;
how tests run a script of benchmarks/ and read the tables and ratios it prints; whether the CLI parses a command;
a spy that records the calls of a function it stands in for; and the Ray processes a server leaves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run_benchmark(script: str, *args: object, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run benchmarks/<script> with `args` in a fresh interpreter; a failure shows the script's stderr."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{done.stderr[-4000:]}"
    return done


Returned = TypeVar("Returned")


def spying(wrapped: Callable[..., Returned], note: Callable[..., object]) -> Callable[..., Returned]:
    """`wrapped`, which first hands its arguments to `note`: how a test records the calls of a
    function it monkeypatches, e.g. `spying(real, lambda path: seen.append(path))`."""

    def spy(*args: Any, **keywords: Any) -> Returned:
        note(*args, **keywords)
        return wrapped(*args, **keywords)

    return spy


def benchmark_module(name: str) -> Any:
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: a script's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cli_refusal(words: list[str]) -> str | None:
    """Why btdeploy's CLI parser refuses `btdeploy WORDS`, in one line, or None (nothing is run)."""
    import contextlib
    import io
    import shlex

    from btdeploy.cli import build_parser
    from btdeploy.errors import BtDeployError

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(words)  # what `--help` and a refusal print is not wanted here
    except SystemExit as done:  # --help and --version end the parse
        return f"{shlex.join(words)}: exit {done.code}" if done.code else None
    except BtDeployError as error:
        return f"{shlex.join(words)}: {error}"
    return None


def cli_commands() -> dict[str, Any]:
    """btdeploy's subcommands by name, each its argparse parser."""
    import argparse

    from btdeploy.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def is_quotient_of_printed(ratio: float, a: float, b: float, ratio_half_digit: float, half_digit: float = 0.05) -> bool:
    """Whether `ratio` (rounded to within `ratio_half_digit`) is a / b, where a and b were printed to
    within `half_digit` (0.05: to 0.1 ms): it lies between the smallest and the largest quotient of
    the values that print as a and b (a first-order slack fell short: 2.571 from a 2.4 and a 1.0 is
    2.45 / 0.953)."""
    lowest = (a - half_digit) / (b + half_digit)
    highest = (a + half_digit) / max(b - half_digit, 1e-9)
    return lowest - ratio_half_digit <= ratio <= highest + ratio_half_digit


def markdown_tables(stdout: str, first_cell: str) -> list[list[list[str]]]:
    """The rows (cells stripped) of every Markdown table a script printed whose header starts with `first_cell`."""
    lines = stdout.splitlines()
    tables = []
    for start in (i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |")):
        rows = []
        for line in lines[start + 2 :]:
            if not line.startswith("| "):
                break
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        tables.append(rows)
    return tables


def markdown_table(stdout: str, first_cell: str) -> list[list[str]]:
    """The rows of the first printed Markdown table whose header starts with `first_cell`."""
    return markdown_tables(stdout, first_cell)[0]


def ray_processes() -> set[int]:
    """The pids of Ray's processes on this machine: its GCS server, raylets and workers."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"gcs_server" in command or b"raylet" in command or command.startswith(b"ray::"):
                found.add(int(entry.name))
    return found


def ray_processes_left(before: set[int], wait_s: float = 30) -> set[int]:
    """The Ray processes not in `before` that are still there after up to `wait_s` seconds (a stopped
    server's take a moment to exit)."""
    deadline = time.monotonic() + wait_s
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    return ray_processes() - before


# Preset checkpoints go to a per-session folder, so tests never read a user's cache.
_CACHE_SET_BY_TESTS = "BTDEPLOY_CACHE" not in os.environ


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("btdeploy-cache")
    previous = os.environ.get("BTDEPLOY_CACHE")
    os.environ["BTDEPLOY_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("BTDEPLOY_CACHE", None)
    else:
        os.environ["BTDEPLOY_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_as_from_a_terminal() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in the suite and in every Python it starts, also where the
    suite was started with SIGINT ignored (`nohup`, a script's `&`), which its children would
    inherit: the tests that send SIGINT test btdeploy's answer to it, and the ones about an ignored
    SIGINT ignore it in their own child."""
    import signal

    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, private_cache: Path) -> Path:
    """All four heads of the tiny preset, exported once."""
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.model.heads import HEADS

    out = tmp_path_factory.mktemp("tiny-export")
    export_heads(resolve_model("tiny"), list(HEADS), out)
    return out


@pytest.fixture(scope="session")
def served_export(tmp_path_factory: pytest.TempPathFactory, private_cache: Path) -> Path:
    """Tiny itm with its split towers, optimized in both flavours, and its dynamic INT8 graph (the serve tests')."""
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.optimize.optimizer import optimize_head
    from btdeploy.quantize.quantizer import quantize_head

    out = tmp_path_factory.mktemp("serve-bench-export")
    export_heads(resolve_model("tiny"), ["itm"], out, split=True)
    for flavour in ("ort", "trt"):
        optimize_head(out / "itm", flavour)
    quantize_head(out / "itm", "int8-dynamic", "ort")
    return out


# A config unlike every preset: scaled_add link towers, a single vision attention head
# (vision hidden 64), 48 px images in 12 px patches, 4 text layers of which 2 are cross-modal,
# more vision layers than text layers.
NON_DEFAULT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "link_tower_type": "scaled_add",
    "contrastive_hidden_size": 24,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "hidden_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "vocab_size": 1200,
    },
    "vision_config": {"hidden_size": 64, "num_hidden_layers": 5, "image_size": 48, "patch_size": 12},
}


def make_checkpoint(
    folder: Path, values: dict[str, Any], seed: int = 3, heads: tuple[str, ...] = ("itm", "mlm", "itc")
) -> Path:
    from btdeploy.model.checkpoints import write_random_checkpoint
    from btdeploy.model.configs import build_config

    folder.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(build_config(values), folder, seed, heads)
    return folder


@pytest.fixture(scope="session")
def non_default_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("nondefault") / "ckpt", NON_DEFAULT_CONFIG)


@pytest.fixture(scope="session")
def non_default_export(tmp_path_factory: pytest.TempPathFactory, non_default_checkpoint: Path) -> Path:
    """All four heads of the non-default config, exported once."""
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.model.heads import HEADS

    out = tmp_path_factory.mktemp("non-default-export")
    export_heads(resolve_model(str(non_default_checkpoint), seed=3), list(HEADS), out)
    return out


@pytest.fixture(scope="session", params=["tiny", "non-default"])
def optimized(
    request: pytest.FixtureRequest,
    tiny_export: Path,
    non_default_export: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """Every head of tiny and of the non-default config, optimized in every flavour."""
    from btdeploy.model.heads import HEADS
    from btdeploy.optimize.optimizer import optimize_head

    source = tiny_export if request.param == "tiny" else non_default_export
    out = tmp_path_factory.mktemp(f"optimized-{request.param}")
    for head in HEADS:
        shutil.copytree(source / head, out / head)
        for flavour in ("ort", "trt", "trt-compat"):
            optimize_head(out / head, flavour)
    return out


def work_unit_of(nodeid: str) -> str:
    """The README's test command (pytest-xdist, `-n 2 --dist loadfile`) runs a test file on one
    worker, so its module fixtures are built once; and every file of tests/serve/ on the same
    worker, one after another: each starts Ray and counts the Ray processes left afterwards,
    which a second Ray on the other worker would add to. Read from the node id's file part
    alone, which every pytest release keeps (pytest 9.2 drops the group suffix that xdist's
    `xdist_group` marks relied on)."""
    path = PurePosixPath(nodeid.split("::", 1)[0])
    return str(path.parent) if path.parent.name == "serve" else str(path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a plain `pytest` run may lack
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` with tests/serve/ as one file; any other `--dist` as xdist has it."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileAndServeScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit_of(nodeid)

    return FileAndServeScheduling(config, log)
