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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any


def _backend(graph: Path, head_dir: Path, threads: int) -> tuple[Any, Any]:  # (the backend, the config)
    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
    from btdeploy.model.heads import get_head

    manifest = read_manifest(head_dir)
    outputs = get_head(manifest.head).output_names
    return OnnxRuntimeBackend(graph, outputs, ["cpu"], threads), manifest.config


def _largest_difference(graphs: list[Path], head_dir: Path, shapes: list[str], threads: int) -> dict[str, float]:
    import numpy as np

    from btdeploy.bench.lone import shape_feeds

    (a, config), (b, _) = (_backend(g, head_dir, threads) for g in graphs)
    worst = {}
    for shape, feeds in shape_feeds(config, shapes).items():
        a_out, b_out = a.run(feeds), b.run(feeds)
        worst[shape] = max(float(np.abs(a_out[name] - b_out[name]).max()) for name in a_out)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--head-dir", type=Path, required=True, help="the head folder (its manifest gives the config)")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--repeats", type=int, default=8, help="processes per graph")
    parser.add_argument("--runs", type=int, default=8, help="timed runs per shape in each process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=["A", "B", "difference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child == "difference":
        print(json.dumps(_largest_difference([args.a, args.b], args.head_dir, shapes, args.threads)))
        return
    from btdeploy.bench.lone import alternate, child_report, run_child

    if args.child:
        backend, config = _backend(args.a if args.child == "A" else args.b, args.head_dir, args.threads)
        print(json.dumps(child_report(backend, config, shapes, args.runs)))
        return
    worst = run_child([*sys.argv, "--child", "difference"])
    times = alternate(["A", "B"], args.repeats, lambda which: [*sys.argv, "--child", which], shapes)
    medians = times.medians
    print(f"A: {args.a}\nB: {args.b}")
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
