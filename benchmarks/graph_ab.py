"""Two graphs of one exported head, A against B on ONNX Runtime: interleaved rounds, each graph
built first in one process and second in another (the graph built first in a process runs a few
percent slower: benchmarks/build_order.py), the rounds of both processes pooled.

    python benchmarks/graph_ab.py A.onnx B.onnx --head-dir DIR/itm [--shapes 1x16,4x40] [--rounds 8]

Prints per shape the median of each graph, their ratio (A / B: above 1, B is faster), the median
of the per-round ratios, and the largest difference between the two graphs' outputs.
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


def _one_process(graphs: list[Path], head_dir: Path, shapes: list[str], rounds: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.backends.onnxruntime import session_options
    from btdeploy.bench.runner import interleaved_order
    from btdeploy.model.inputs import sample_inputs

    options = session_options(threads)
    sessions = [ort.InferenceSession(str(g), options, providers=["CPUExecutionProvider"]) for g in graphs]
    config = read_manifest(head_dir).config
    record: dict[str, dict] = {}
    for shape in shapes:
        batch, length = (int(part) for part in shape.split("x"))
        feeds = sample_inputs(config, batch, length, pad=False)
        inputs = [{i.name: feeds[i.name] for i in s.get_inputs()} for s in sessions]
        outputs = [s.run(None, x) for s, x in zip(sessions, inputs, strict=True)]  # also the warm-up
        worst = max(float(np.abs(a - b).max()) for a, b in zip(*outputs, strict=True))
        times: list[list[float]] = [[], []]
        for round_index in range(rounds):
            for which in interleaved_order([0, 1], round_index):
                started = time.perf_counter()
                sessions[which].run(None, inputs[which])
                times[which].append(1e3 * (time.perf_counter() - started))
        record[shape] = {"ms": times, "max_abs_difference": worst}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--head-dir", type=Path, required=True, help="the head folder (its manifest gives the config)")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=["ab", "ba"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        graphs = [args.a, args.b] if args.child == "ab" else [args.b, args.a]
        record = _one_process(graphs, args.head_dir, shapes, args.rounds, args.threads)
        if args.child == "ba":  # report in A, B order
            record = {s: {**r, "ms": r["ms"][::-1]} for s, r in record.items()}
        print(json.dumps(record))
        return
    pooled: dict[str, dict] = {}
    for order in ("ab", "ba"):
        print(f"building {' then '.join(order.upper())} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, *sys.argv, "--child", order], check=True, capture_output=True, text=True)
        for shape, record in json.loads(done.stdout.strip().splitlines()[-1]).items():
            into = pooled.setdefault(shape, {"ms": [[], []], "max_abs_difference": 0.0})
            into["ms"][0] += record["ms"][0]
            into["ms"][1] += record["ms"][1]
            into["max_abs_difference"] = max(into["max_abs_difference"], record["max_abs_difference"])
    print(f"A: {args.a}\nB: {args.b}\n{2 * args.rounds} interleaved rounds, half with each graph built first; ms")
    print("| batch x length | A median | B median | A / B | per round | max abs difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape, record in pooled.items():
        a_ms, b_ms = record["ms"]
        per_round = statistics.median(a / b for a, b in zip(a_ms, b_ms, strict=True))
        a_median, b_median = statistics.median(a_ms), statistics.median(b_ms)
        print(
            f"| {shape.replace('x', ' x ')} | {a_median:.1f} | {b_median:.1f} | {a_median / b_median:.3f} "
            f"| {per_round:.3f} | {record['max_abs_difference']:.2e} |"
        )


if __name__ == "__main__":
    main()
