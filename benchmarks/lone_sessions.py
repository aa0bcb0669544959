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
import sys
from pathlib import Path

# Goal pairs (peer, btdeploy): the peer's median over btdeploy's, as the issue states them.
GOALS = (("openvino-fp32", "ort-fused"), ("openvino-int8", "ort-int8"), ("openvino-int8", "ort-int8-dynamic"))


def _child(export: Path, head: str, variant: str, shapes: list[str], runs: int, threads: int) -> dict[str, float]:
    from btdeploy.bench.lone import median_ms
    from btdeploy.bench.variants import VARIANTS, BenchEnv
    from btdeploy.runtime.runtime import find_head

    manifest = find_head(export, head)
    env = BenchEnv(threads, "cpu")
    reason = VARIANTS[variant].unavailable(manifest, env)
    if reason:
        raise SystemExit(f"{variant} cannot run here: {reason}")
    return median_ms(VARIANTS[variant].build(manifest, env), manifest.config, shapes, runs)


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
    from btdeploy.bench.lone import alternate

    variants = args.variants.split(",")
    medians = alternate(variants, args.repeats, lambda variant: [*sys.argv, "--child", variant], shapes)
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
