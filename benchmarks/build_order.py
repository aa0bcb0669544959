"""Does it matter when a session was built? Identical ONNX Runtime sessions of one graph, built one
after another in one process and timed in interleaved rounds (each in every position of the round
in turn); each repeat in a fresh process.

    python benchmarks/build_order.py DIR/itm/model.ort.onnx [--sessions 3] [--batch 1] [--seq-len 16]
        [--rounds 12] [--repeats 4] [--threads 2]

Prints, per repeat, the median of each session by the position it was built in, and how much
slower the first-built was than the fastest of the others. This is why `btdeploy bench` builds
every variant once in every position of the build order (bench/runner.py, `build_orders`). On
4 KB pages (`BTDEPLOY_HUGEPAGES=0`) the first-built ran 1-10 % slower; on huge pages, as the
script starts by default (btdeploy/hugepages.py), within 1.5 % (benchmarks/results/base-peers-cpu).
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

from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages


def _one_process(model: Path, sessions: int, batch: int, seq_len: int, rounds: int, threads: int) -> list[float]:
    import onnxruntime as ort

    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.backends.onnxruntime import session_options
    from btdeploy.bench.runner import interleaved_order
    from btdeploy.model.inputs import sample_inputs

    built = [
        ort.InferenceSession(str(model), session_options(threads), providers=["CPUExecutionProvider"])
        for _ in range(sessions)
    ]
    names = {i.name for i in built[0].get_inputs()}
    feeds = {k: v for k, v in sample_inputs(read_manifest(model.parent).config, batch, seq_len).items() if k in names}
    for session in built:
        session.run(None, feeds)  # warm-up
    times: list[list[float]] = [[] for _ in built]
    for round_index in range(rounds):
        for position in interleaved_order(list(range(sessions)), round_index):
            started = time.perf_counter()
            built[position].run(None, feeds)
            times[position].append(1e3 * (time.perf_counter() - started))
    return [statistics.median(values) for values in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = (args.model, args.sessions, args.batch, args.seq_len, args.rounds, args.threads)
    if args.child:
        print(json.dumps(_one_process(*case)))
        return
    print(f"{args.model}: {args.sessions} sessions built in turn, batch {args.batch} length {args.seq_len},")
    print(f"{args.threads} threads, {args.rounds} interleaved rounds, median ms by build position, fresh process each")
    print("| repeat | " + " | ".join(f"built {i + 1}" for i in range(args.sessions)) + " | first / fastest other |")
    print("|---|" + "---:|" * (args.sessions + 1))
    for repeat in range(1, args.repeats + 1):
        print(f"repeat {repeat}/{args.repeats} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, *sys.argv, "--child"], check=True, capture_output=True, text=True)
        medians = json.loads(done.stdout.strip().splitlines()[-1])
        cells = " | ".join(f"{m:.1f}" for m in medians)
        print(f"| {repeat} | {cells} | {medians[0] / min(medians[1:]):.3f} |", flush=True)


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
