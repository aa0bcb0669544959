"""Two graphs of one exported head, A against B on ONNX Runtime, each alone in its own process.

In one process on 4 KB pages a session built earlier ran slower than one built later, and by a
different amount for different graphs (build_order.py; on one Xeon VM the ort INT8 graph lost 13-22 % when
built first, its Q/DQ form 0-5 %), so timing two graphs side by side in one process measures
their build order as much as the graphs. Here each process builds one graph, as a deployment
does, warms it up and times it; the processes alternate A, B, B, A, ... so the machine's drift
falls on both alike.

    python benchmarks/graph_ab.py A.onnx B.onnx --head-dir DIR/itm [--shapes 1x16,4x40] [--repeats 8] [--runs 8]

Prints per shape the median over processes of each graph's median, their ratio (A / B: above 1,
B is faster), the median of the ratios of neighbouring A and B processes, and the largest
difference between the two graphs' outputs (both run once in one more process).

Processes minutes apart also meet the VM in different phases (on a 2-core Zen 4 the same graph
ran at 182 or 240 ms from one process to the next), which can hide a change of a few percent.
With `--paired` each process builds both graphs (half of them A first, half B first; on 2 MB
pages, where the build order effect was not seen) and times them round by round, A B then B A;
it prints per shape the median of the per-round ratios A / B and how many rounds B won.

    python benchmarks/graph_ab.py A.onnx B.onnx --head-dir DIR/itm --paired [--repeats 2] [--runs 30]

`--b-config KEY=VALUE` (repeatable) adds an ONNX Runtime session config entry to B's session
only, so that A and B may be one graph with and without an option:

    python benchmarks/graph_ab.py G.onnx G.onnx --head-dir DIR/itm --paired --b-config session.set_denormal_as_zero=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any


def _backend(which: str, args: argparse.Namespace) -> tuple[Any, Any]:  # (the backend, the config)
    """Graph A or B on ONNX Runtime's CPU provider; B's session with the `--b-config` entries."""
    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.backends import onnxruntime
    from btdeploy.model.heads import get_head
    from btdeploy.swaps import replaced

    manifest = read_manifest(args.head_dir)
    outputs = get_head(manifest.head).output_names
    entries = dict(entry.split("=", 1) for entry in args.b_config) if which == "B" else {}
    plain_options = onnxruntime.session_options

    def options(threads: int | None = None, spin: bool = True) -> Any:
        made = plain_options(threads, spin)
        for key, value in entries.items():
            made.add_session_config_entry(key, value)
        return made

    graph = args.a if which == "A" else args.b
    with replaced((onnxruntime, "session_options", options)):
        backend = onnxruntime.OnnxRuntimeBackend(graph, outputs, ["cpu"], args.threads)
    return backend, manifest.config


def _largest_difference(args: argparse.Namespace, shapes: list[str]) -> dict[str, float]:
    import numpy as np

    from btdeploy.bench.lone import shape_feeds

    (a, config), (b, _) = (_backend(which, args) for which in "AB")
    worst = {}
    for shape, feeds in shape_feeds(config, shapes).items():
        a_out, b_out = a.run(feeds), b.run(feeds)
        worst[shape] = max(float(np.abs(a_out[name] - b_out[name]).max()) for name in a_out)
    return worst


def _paired_rounds(args: argparse.Namespace, shapes: list[str], order: str) -> dict[str, Any]:
    """In a child: both graphs built in `order`, timed round by round; per shape each round's A / B."""
    from btdeploy.bench.lone import WARMUP, shape_feeds
    from btdeploy.bench.runner import time_case

    built = {which: _backend(which, args) for which in order}
    config = built["A"][1]
    ratios = {}
    for shape, feeds in shape_feeds(config, shapes).items():
        samples, _, _ = time_case({which: built[which][0] for which in "AB"}, feeds, WARMUP, args.runs, None)
        ratios[shape] = [a / b for a, b in zip(samples["A"], samples["B"], strict=True)]
    return {"ratios": ratios}


def _report_paired(args: argparse.Namespace, shapes: list[str], worst: dict[str, float]) -> None:
    from btdeploy.bench.lone import run_child

    ratios: dict[str, list[float]] = {shape: [] for shape in shapes}
    for repeat in range(args.repeats):
        order = "AB" if repeat % 2 == 0 else "BA"
        got = run_child([*sys.argv, "--child", order])["ratios"]
        for shape in shapes:
            ratios[shape] += got[shape]
        progress = ", ".join(f"{s} {statistics.median(got[s]):.3f}" for s in shapes)
        print(f"process {repeat + 1}/{args.repeats} (built {order}): A / B {progress}", file=sys.stderr, flush=True)
    print(f"A: {args.a}\nB: {args.b} {' '.join(args.b_config)}".rstrip())
    print(f"both graphs in each of {args.repeats} processes (built A first, then B first, ...); "
          f"{args.runs} rounds per shape in each")  # fmt: skip
    print("| batch x length | A / B, median of rounds | rounds B won | max abs difference |")
    print("|---|---:|---:|---:|")
    for shape in shapes:
        won = sum(r > 1 for r in ratios[shape])
        print(f"| {shape.replace('x', ' x ')} | {statistics.median(ratios[shape]):.3f} "
              f"| {won} of {len(ratios[shape])} | {worst[shape]:.2e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--head-dir", type=Path, required=True, help="the head folder (its manifest gives the config)")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--repeats", type=int, default=8, help="processes per graph")
    parser.add_argument("--runs", type=int, default=8, help="timed runs per shape in each process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--paired", action="store_true", help="both graphs in each process, round by round")
    parser.add_argument("--b-config", action="append", default=[], metavar="KEY=VALUE",
                        help="an ONNX Runtime session config entry for B's session only (repeatable)")  # fmt: skip
    parser.add_argument("--child", choices=["A", "B", "AB", "BA", "difference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any("=" not in entry for entry in args.b_config):
        parser.error(f"--b-config takes KEY=VALUE, not {args.b_config}")
    shapes = args.shapes.split(",")
    if args.child == "difference":
        print(json.dumps(_largest_difference(args, shapes)))
        return
    from btdeploy.bench.lone import alternate, child_report, run_child

    if args.child in ("AB", "BA"):
        print(json.dumps(_paired_rounds(args, shapes, args.child)))
        return
    if args.paired:
        _report_paired(args, shapes, run_child([*sys.argv, "--child", "difference"]))
        return
    if args.child:
        backend, config = _backend(args.child, args)
        print(json.dumps(child_report(backend, config, shapes, args.runs)))
        return
    worst = run_child([*sys.argv, "--child", "difference"])
    times = alternate(["A", "B"], args.repeats, lambda which: [*sys.argv, "--child", which], shapes)
    medians = times.medians
    print(f"A: {args.a}\nB: {args.b} {' '.join(args.b_config)}".rstrip())
    print(f"each graph alone in {args.repeats} processes, alternating; {args.runs} runs per shape; ms")
    print("| batch x length | A median | B median | A / B | paired | max abs difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in shapes:
        a_ms, b_ms = medians["A"][shape], medians["B"][shape]
        paired = statistics.median(a / b for a, b in zip(a_ms, b_ms, strict=True))
        a_median, b_median = statistics.median(a_ms), statistics.median(b_ms)
        print(
            f"| {shape.replace('x', ' x ')} | {a_median:.1f} | {b_median:.1f} | {a_median / b_median:.3f} "
            f"| {paired:.3f} | {worst[shape]:.2e} |"
        )
    print("\n| graph | resident MB | of it on huge pages, MB |\n|---|---:|---:|")
    for which in ("A", "B"):
        print(f"| {which} | {times.memory_row(which)} |")


if __name__ == "__main__":
    from btdeploy.cli import script_entry

    script_entry(main)
