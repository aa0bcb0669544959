"""How much each engine slows when another busy process takes one of the cores, as on an edge box
that runs a camera pipeline beside the model, or a server whose replicas share the cores.

    python benchmarks/busy_neighbour.py DIR [--head itm] [--batch 1] [--seq-len 16] [--rounds 6]

Variants, 2 threads each (every core on a 2-core machine, --threads otherwise): ONNX Runtime on the
int8-dynamic graph with its workers spinning between operators (btdeploy.load's default) and with
`spin=False`, and OpenVINO on the trt flavour's Q/DQ int8 graph when the `peers` extra is
installed. Each round times every variant with the cores to itself ("quiet"), then again while a
child process spins on the last CPU ("busy neighbour"); the rounds interleave the two conditions
so that both meet the same minutes of the machine. Progress on stderr; the table on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import btdeploy
from btdeploy.backends.openvino import openvino_problem
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages
from btdeploy.model.inputs import sample_inputs
from btdeploy.runtime.runtime import Runtime, find_head

CONDITIONS = ("quiet", "busy neighbour")
_SPIN_ON_ONE_CPU = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def variants(export: Path, head: str, threads: int) -> dict[str, Runtime]:
    ort: dict[str, Any] = {"flavour": "ort", "precision": "int8-dynamic", "threads": threads}
    found: dict[str, Runtime] = {
        "ort-int8-dynamic (spin)": btdeploy.load(export, head=head, **ort),
        "ort-int8-dynamic (spin=False)": btdeploy.load(export, head=head, spin=False, **ort),
    }
    problem = openvino_problem()
    if problem is None:
        options: dict[str, Any] = {"flavour": "trt", "precision": "int8", "threads": threads}
        found["openvino-int8"] = btdeploy.load(export, head=head, backend="openvino", **options)
    else:
        print(f"openvino-int8 skipped: {problem}", file=sys.stderr)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an export folder (ort int8-dynamic and trt int8 graphs)")
    parser.add_argument("--head", default="itm")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    runs = variants(args.export, args.head, args.threads)
    config = find_head(args.export, args.head).config
    feeds = sample_inputs(config, args.batch, args.seq_len, pad=False)
    for run in runs.values():
        run(**feeds)  # warm-up
    busy_cpu = max(os.sched_getaffinity(0))
    times: dict[tuple[str, str], list[float]] = {(name, c): [] for name in runs for c in CONDITIONS}
    for round_index in range(args.rounds):
        for condition in CONDITIONS:
            neighbour = None
            if condition == "busy neighbour":
                spinner = [sys.executable, "-c", _SPIN_ON_ONE_CPU, str(busy_cpu)]
                neighbour = subprocess.Popen(spinner, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                print(f"busy neighbour: pid {neighbour.pid} on CPU {busy_cpu}", file=sys.stderr, flush=True)
                time.sleep(0.2)
            try:
                for name, run in runs.items():
                    started = time.perf_counter()
                    run(**feeds)
                    times[(name, condition)].append(1e3 * (time.perf_counter() - started))
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
            time.sleep(0.1)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(f"{args.export} {args.head}, batch {args.batch} x length {args.seq_len}, {args.threads} threads, "
          f"{args.rounds} rounds; busy neighbour: a process spinning on CPU {busy_cpu}")  # fmt: skip
    print("| variant | quiet median ms | busy neighbour median ms | slowdown |")
    print("|---|---:|---:|---:|")
    for name in runs:
        quiet, busy = (statistics.median(times[(name, c)]) for c in CONDITIONS)
        print(f"| {name} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f}x |")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
