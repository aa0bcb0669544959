"""Each variant alone in its own process, as a deployment runs it: one model per process.

In one process, a session built earlier runs slower than one built later (by 4-6 % on some
VMs, by up to 15 % on others, and not by the same amount for every graph: build_order.py), so
any in-process comparison mixes the graphs with the places they were built in. Here every
process builds one variant, warms it up and times it; the processes take turns (the order
rotated every repeat), so the machine's drift over minutes falls on every variant alike.

    python benchmarks/lone_sessions.py DIR [--head itm] [--variants ort-fused,openvino-fp32,ort-int8,openvino-int8]
        [--shapes 1x16,4x40] [--repeats 4] [--runs 8] [--threads 2]

Prints per shape the median over processes of each variant's median, the goal ratios (the peer
over btdeploy's variant: above 1, btdeploy is faster), and the median of the ratios within each
repeat (the processes of one repeat ran minutes apart at most).
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

# Goal pairs (peer, btdeploy): the peer's median over btdeploy's, as the issue states them.
GOALS = (("openvino-fp32", "ort-fused"), ("openvino-int8", "ort-int8"), ("openvino-int8", "ort-int8-dynamic"))


def _child(export: Path, head: str, variant: str, shapes: list[str], runs: int, threads: int) -> dict[str, float]:
    from btdeploy.bench.variants import VARIANTS, BenchEnv
    from btdeploy.model.inputs import sample_inputs
    from btdeploy.runtime.runtime import find_head

    manifest = find_head(export, head)
    env = BenchEnv(threads, "cpu")
    reason = VARIANTS[variant].unavailable(manifest, env)
    if reason:
        raise SystemExit(f"{variant} cannot run here: {reason}")
    backend = VARIANTS[variant].build(manifest, env)
    medians: dict[str, float] = {}
    for index, shape in enumerate(shapes, 1):
        batch, length = (int(part) for part in shape.split("x"))
        feeds = sample_inputs(manifest.config, batch, length, seed=index, pad=False)  # as btdeploy bench
        for _ in range(2):  # warm-up, as btdeploy bench
            backend.run(feeds)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            backend.run(feeds)
            times.append(1e3 * (time.perf_counter() - started))
        medians[shape] = statistics.median(times)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--head", default="itm")
    parser.add_argument("--variants", default="ort-fused,openvino-fp32,ort-int8,openvino-int8")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--repeats", type=int, default=4, help="processes per variant")
    parser.add_argument("--runs", type=int, default=8, help="timed runs per shape in each process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        print(json.dumps(_child(args.export, args.head, args.child, shapes, args.runs, args.threads)))
        return
    variants = args.variants.split(",")
    # per variant, per shape: one median per repeat
    medians: dict[str, dict[str, list[float]]] = {v: {s: [] for s in shapes} for v in variants}
    for repeat in range(args.repeats):
        order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
        for variant in order:
            command = [sys.executable, *sys.argv, "--child", variant]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr.strip()[-2000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            for shape in shapes:
                medians[variant][shape].append(got[shape])
            progress = ", ".join(f"{s} {got[s]:.1f} ms" for s in shapes)
            print(f"repeat {repeat + 1}/{args.repeats}: {variant}: {progress}", file=sys.stderr, flush=True)
    print(f"{args.export} {args.head}: each variant alone in {args.repeats} processes, {args.runs} runs per shape")
    print("| batch x length | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for shape in shapes:
        row = " | ".join(f"{statistics.median(medians[v][shape]):.1f}" for v in variants)
        print(f"| {shape.replace('x', ' x ')} | {row} |")
    goals = [(peer, ours) for peer, ours in GOALS if peer in medians and ours in medians]
    if goals:
        print("\n| goal ratio | " + " | ".join(shapes) + " |")
        print("|---|" + "---:|" * len(shapes))
        for peer, ours in goals:
            cells: list[str] = []
            for shape in shapes:
                of_medians = statistics.median(medians[peer][shape]) / statistics.median(medians[ours][shape])
                pairs = zip(medians[peer][shape], medians[ours][shape], strict=True)
                paired = statistics.median(p / o for p, o in pairs)
                cells.append(f"{of_medians:.3f} (paired {paired:.3f})")
            print(f"| {peer} / {ours} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
