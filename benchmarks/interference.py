"""Does a variant run slower when other bench variants share its process? One process, one shape,
the same variant timed under several conditions, each condition's rounds interleaved with the others:

    python benchmarks/interference.py DIR --head itm --target ort-int8-dynamic \
        --others ort-fused,openvino-fp32,openvino-fused-fp32,openvino-int8 --batch 1 --seq-len 16

Conditions (the target's median and minimum, and per run: page faults, involuntary context
switches, and the CPU time threads other than the target's own took while it ran, such as another
engine's pool still spinning):
- alone: the target's runs back to back;
- after a pause: the target alone, after idling for --pause seconds;
- after X: one run of X, then the target (for every other variant X);
- after X, pause: the same with a pause before the target, so that threads X left spinning go idle.
A target that is only slow "after X" is disturbed by what X leaves behind (threads, caches,
memory); one that is slow in every condition once the others are loaded is disturbed by their
presence. Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

from btdeploy.artifacts.manifest import head_folders, read_manifest
from btdeploy.bench.variants import VARIANTS, BenchEnv
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages
from btdeploy.model.inputs import sample_inputs


def _usage() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_nivcsw


_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of every thread of this process, by thread id."""
    seconds = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        seconds[task.name] = (int(fields[11]) + int(fields[12])) / _TICK
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="an export root (the folder holding the head folders)")
    parser.add_argument("--head", default="itm")
    parser.add_argument("--target", default="ort-int8-dynamic")
    parser.add_argument("--others", default="ort-fused,openvino-fp32,openvino-fused-fp32,openvino-int8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds before the target in the pause conditions")
    parser.add_argument("--samples", action="store_true", help="print every sample after its row")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    folder = head_folders(args.root, [args.head])[0]
    manifest = read_manifest(folder)
    env = BenchEnv(threads=args.threads, device="cpu")
    names = [args.target] + [n for n in args.others.split(",") if n]
    backends = {}
    own = {str(threading.get_native_id())}  # the threads that run the target: this one and its pool's
    for name in names:
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        before = set(_thread_cpu_s())
        backends[name] = VARIANTS[name].build(manifest, env)
        if name == args.target:
            backends[name].run(sample_inputs(manifest.config, 1, 8, seed=1, pad=False))
            own |= set(_thread_cpu_s()) - before
    feeds = sample_inputs(manifest.config, args.batch, args.seq_len, seed=1, pad=False)
    for backend in backends.values():
        backend.run(feeds)
        backend.run(feeds)

    conditions: list[tuple[str, str | None, float]] = [("alone", None, 0.0), ("after a pause", None, args.pause)]
    for other in names[1:]:
        conditions += [(f"after {other}", other, 0.0), (f"after {other}, pause", other, args.pause)]
    samples: dict[str, list[tuple[float, int, int, float]]] = {label: [] for label, _, _ in conditions}
    target = backends[args.target]
    for round_index in range(args.rounds):
        shift = round_index % len(conditions)
        for label, other, pause in conditions[shift:] + conditions[:shift]:
            if other is not None:
                backends[other].run(feeds)
            if pause:
                time.sleep(pause)
            faults, switches = _usage()
            cpu = _thread_cpu_s()
            started = time.perf_counter()
            target.run(feeds)
            elapsed = time.perf_counter() - started
            cpu_after = _thread_cpu_s()
            faults_after, switches_after = _usage()
            others = sum(t - cpu.get(k, 0.0) for k, t in cpu_after.items() if k not in own)
            samples[label].append((elapsed * 1e3, faults_after - faults, switches_after - switches, others * 1e3))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    print(f"{args.target} on {args.head}, batch {args.batch} x length {args.seq_len}, {args.threads} threads, "
          f"{args.rounds} rounds; loaded: {', '.join(names)}")  # fmt: skip
    columns = ["condition", "median ms", "min ms", "page faults / run", "involuntary switches / run",
               "other threads' CPU ms / run"]  # fmt: skip
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    for label, values in samples.items():
        ms = [v[0] for v in values]
        medians = [statistics.median(v[k] for v in values) for k in (1, 2, 3)]
        row = [label, f"{statistics.median(ms):.1f}", f"{min(ms):.1f}", *(f"{m:.0f}" for m in medians)]
        print("| " + " | ".join(row) + " |" + (" " + " ".join(f"{v:.0f}" for v in ms) if args.samples else ""))


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
