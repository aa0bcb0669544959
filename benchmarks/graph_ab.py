"""Two graphs of one exported head, A against B on ONNX Runtime, each alone in its own process.

In one process a session built earlier runs slower than one built later, and by a different
amount for different graphs (build_order.py; on one Xeon VM the ort INT8 graph lost 13-22 % when
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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _feeds(head_dir: Path, shape: str, index: int) -> dict:
    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.model.inputs import sample_inputs

    batch, length = (int(part) for part in shape.split("x"))
    return sample_inputs(read_manifest(head_dir).config, batch, length, seed=index, pad=False)


def _session(graph: Path, threads: int) -> Any:  # onnxruntime is imported in the children only
    import onnxruntime as ort

    from btdeploy.backends.onnxruntime import session_options

    return ort.InferenceSession(str(graph), session_options(threads), providers=["CPUExecutionProvider"])


def _time_one(graph: Path, head_dir: Path, shapes: list[str], runs: int, threads: int) -> dict[str, float]:
    session = _session(graph, threads)
    medians = {}
    for index, shape in enumerate(shapes, 1):
        feeds = _feeds(head_dir, shape, index)
        inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
        for _ in range(2):  # warm-up
            session.run(None, inputs)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, inputs)
            times.append(1e3 * (time.perf_counter() - started))
        medians[shape] = statistics.median(times)
    return medians


def _largest_difference(graphs: list[Path], head_dir: Path, shapes: list[str], threads: int) -> dict[str, float]:
    import numpy as np

    sessions = [_session(g, threads) for g in graphs]
    worst = {}
    for index, shape in enumerate(shapes, 1):
        feeds = _feeds(head_dir, shape, index)
        a, b = (s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()}) for s in sessions)
        worst[shape] = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    return worst


def _child(*extra: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, *sys.argv, *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--head-dir", type=Path, required=True, help="the head folder (its manifest gives the config)")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--repeats", type=int, default=8, help="processes per graph")
    parser.add_argument("--runs", type=int, default=8, help="timed runs per shape in each process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=["a", "b", "difference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child == "difference":
        print(json.dumps(_largest_difference([args.a, args.b], args.head_dir, shapes, args.threads)))
        return
    if args.child:
        graph = args.a if args.child == "a" else args.b
        print(json.dumps(_time_one(graph, args.head_dir, shapes, args.runs, args.threads)))
        return
    worst = _child("--child", "difference")
    medians: dict[str, dict[str, list[float]]] = {"a": {s: [] for s in shapes}, "b": {s: [] for s in shapes}}
    for repeat in range(args.repeats):
        for which in ("a", "b") if repeat % 2 == 0 else ("b", "a"):
            got = _child("--child", which)
            for shape in shapes:
                medians[which][shape].append(got[shape])
            cells = ", ".join(f"{s} {got[s]:.1f} ms" for s in shapes)
            print(f"repeat {repeat + 1}/{args.repeats}: {which.upper()}: {cells}", file=sys.stderr, flush=True)
    print(f"A: {args.a}\nB: {args.b}")
    print(f"each graph alone in {args.repeats} processes, alternating; {args.runs} runs per shape; ms")
    print("| batch x length | A median | B median | A / B | paired | max abs difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in shapes:
        a_ms, b_ms = medians["a"][shape], medians["b"][shape]
        paired = statistics.median(a / b for a, b in zip(a_ms, b_ms, strict=True))
        a_median, b_median = statistics.median(a_ms), statistics.median(b_ms)
        print(
            f"| {shape.replace('x', ' x ')} | {a_median:.1f} | {b_median:.1f} | {a_median / b_median:.3f} "
            f"| {paired:.3f} | {worst[shape]:.2e} |"
        )


if __name__ == "__main__":
    main()
