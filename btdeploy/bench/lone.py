"""Timing each backend alone in its own process, as a deployment runs one model per process.

On 4 KB pages a session built earlier in a process ran slower than one built later, by an amount
that differed between graphs (benchmarks/build_order.py), so the scripts that decide between two
graphs or set btdeploy against a peer (benchmarks/graph_ab.py, benchmarks/lone_sessions.py) run
each candidate in a child process of its own: the child times one backend and prints
`child_report`, the parent takes the children in turns with `alternate`. The children start as btdeploy's commands
do, on huge pages (btdeploy/hugepages.py), unless the caller gives another environment, and
report beside their times what they held and how much of it was on huge pages: an engine that
allocates its own way keeps most of its memory on 4 KB pages whatever malloc is told.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from btdeploy.backends.base import Backend
from btdeploy.bench.runner import interleaved_order, time_case
from btdeploy.errors import BtDeployError
from btdeploy.hugepages import ResidentMemory, engine_environment, resident_memory
from btdeploy.model.inputs import sample_inputs
from btdeploy.verify.parity import parse_batch_by_length

WARMUP = 2  # as btdeploy bench


def shape_feeds(config: Any, shapes: list[str]) -> dict[str, dict[str, Any]]:
    """Inputs per "BxL" shape, drawn as btdeploy bench draws them (seed = the shape's position)."""
    pairs = parse_batch_by_length(",".join(shapes), config)
    return {
        shape: sample_inputs(config, batch, length, seed=index, pad=False)
        for index, (shape, (batch, length)) in enumerate(zip(shapes, pairs, strict=True), 1)
    }


def median_ms(backend: Backend, config: Any, shapes: list[str], runs: int) -> dict[str, float]:
    """In the child: per shape, the median of `runs` timed runs after the bench's warm-up."""
    medians = {}
    for shape, feeds in shape_feeds(config, shapes).items():
        samples, _, _ = time_case({"alone": backend}, feeds, WARMUP, runs, None)
        medians[shape] = 1e3 * statistics.median(samples["alone"])
    return medians


def child_report(backend: Backend, config: Any, shapes: list[str], runs: int) -> dict[str, Any]:
    """In the child, the JSON line `alternate` reads: the medians and the memory held after them."""
    medians = median_ms(backend, config, shapes, runs)
    memory = resident_memory()
    return {"ms": medians, "memory": None if memory is None else vars(memory)}


def run_child(arguments: list[str], environ: dict[str, str] | None = None, python: str | None = None) -> dict[str, Any]:
    """Run `python ARGUMENTS`, whose last line of output is a JSON object, and return it. The child
    starts in `environ`, by default the one btdeploy's own commands run models in (huge pages), under
    `python`, by default this one (another venv's, to time the same graph on another ONNX Runtime)."""
    environ = engine_environment() if environ is None else environ
    done = subprocess.run([python or sys.executable, *arguments], capture_output=True, text=True, env=environ)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise BtDeployError(f"the child {' '.join(arguments[-2:])} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class LoneTimes:
    """Per name: per shape the children's medians in repeat order (repeat i of every name pairs),
    and what each child held after timing (None where the kernel does not say)."""

    medians: dict[str, dict[str, list[float]]]
    memory: dict[str, list[ResidentMemory | None]]

    def memory_row(self, name: str) -> str:
        """The median over the children of the resident and huge-page MB, for a table row."""
        held = [m for m in self.memory[name] if m is not None]
        if not held:
            return "n/a | n/a"
        resident = statistics.median(m.resident_mb for m in held)
        return f"{resident:.0f} | {statistics.median(m.huge_mb for m in held):.0f}"


def alternate(
    names: list[str],
    repeats: int,
    child_arguments: Callable[[str], list[str]],
    shapes: list[str],
    child_environment: Callable[[str], dict[str, str] | None] = lambda name: None,
    child_python: Callable[[str], str | None] = lambda name: None,
) -> LoneTimes:
    """One child per name and repeat (each prints `child_report`), in rotating order (A B, B A, ...)."""
    times = LoneTimes({name: {s: [] for s in shapes} for name in names}, {name: [] for name in names})
    for repeat in range(repeats):
        for name in interleaved_order(names, repeat):
            got = run_child(child_arguments(name), child_environment(name), child_python(name))
            for shape in shapes:
                times.medians[name][shape].append(got["ms"][shape])
            times.memory[name].append(None if got["memory"] is None else ResidentMemory(**got["memory"]))
            progress = ", ".join(f"{s} {got['ms'][s]:.1f} ms" for s in shapes)
            print(f"repeat {repeat + 1}/{repeats}: {name}: {progress}", file=sys.stderr, flush=True)
    return times
