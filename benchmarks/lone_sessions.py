"""Each variant alone in its own process, as a deployment runs it: one model per process.

In one process, on 4 KB pages, a session built earlier ran slower than one built later (by 4-6 %
on some VMs, by up to 15 % on others, and not by the same amount for every graph: build_order.py), so
any in-process comparison mixes the graphs with the places they were built in. Here every
process builds one variant, warms it up and times it; the processes take turns (the order
rotated every repeat), so the machine's drift over minutes falls on every variant alike.

    python benchmarks/lone_sessions.py DIR [--head itm] [--variants ort-fused,openvino-fp32,ort-int8,openvino-int8]
        [--shapes 1x16,4x40] [--repeats 4] [--runs 8] [--threads 2] [--hugepages on|off|both]

Prints per shape the median over processes of each variant's median, the goal ratios (the peer
over btdeploy's variant: above 1, btdeploy is faster), and the median of the ratios within each
repeat (the processes of one repeat ran minutes apart at most). The processes start as btdeploy's
commands do, with malloc's memory on huge pages (btdeploy/hugepages.py); `--hugepages off` starts
them on 4 KB pages, `both` runs every variant both ways and sets the two side by side, and adds
the goal ratios with each engine as its own users start it: btdeploy's variants on huge pages, as
its commands start, the peers on 4 KB pages, malloc's default (OpenVINO gained nothing from the
tunable on a Xeon VM and its INT8 graph ran up to 6 % slower: benchmarks/results/base-peers-cpu,
eleventh look). A last
table gives what each variant's processes held after timing and how much of it was on huge pages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

# Goal pairs (peer, btdeploy): the peer's median over btdeploy's, as the issue states them.
GOALS = (("openvino-fp32", "ort-fused"), ("openvino-int8", "ort-int8"), ("openvino-int8", "ort-int8-dynamic"))
SMALL_PAGES = " (4 KB pages)"  # the name of a variant run with --hugepages off


def _environment(name: str) -> dict[str, str]:
    from btdeploy import hugepages

    if name.endswith(SMALL_PAGES):
        return hugepages.without_hugepages(os.environ)
    reason = hugepages.status().unavailable()
    if reason:
        raise SystemExit(f"huge pages cannot be used here: {reason}; run with --hugepages off")
    return hugepages.with_hugepages(os.environ)


def _print_goals(
    medians: dict[str, dict[str, list[float]]], shapes: list[str], peer_suffix: str, ours_suffix: str
) -> None:
    goals = [(peer + peer_suffix, ours + ours_suffix) for peer, ours in GOALS]
    goals = [(peer, ours) for peer, ours in goals if peer in medians and ours in medians]
    if not goals:
        return
    print("\n| goal ratio | " + " | ".join(shapes) + " |")
    print("|---|" + "---:|" * len(shapes))
    for peer, ours in goals:
        print(f"| {peer} / {ours} | " + " | ".join(_ratio(medians[peer][s], medians[ours][s]) for s in shapes) + " |")


def _ratio(slower: list[float], faster: list[float]) -> str:
    """Of the medians, and the median of the ratios within each repeat."""
    paired = statistics.median(a / b for a, b in zip(slower, faster, strict=True))
    return f"{statistics.median(slower) / statistics.median(faster):.3f} (paired {paired:.3f})"


def _child(export: Path, head: str, variant: str, shapes: list[str], runs: int, threads: int) -> dict[str, Any]:
    from btdeploy.bench.lone import child_report
    from btdeploy.bench.variants import VARIANTS, BenchEnv
    from btdeploy.runtime.runtime import find_head

    manifest = find_head(export, head)
    env = BenchEnv(threads, "cpu")
    reason = VARIANTS[variant].unavailable(manifest, env)
    if reason:
        raise SystemExit(f"{variant} cannot run here: {reason}")
    return child_report(VARIANTS[variant].build(manifest, env), manifest.config, shapes, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--head", default="itm")
    parser.add_argument("--variants", default="ort-fused,openvino-fp32,ort-int8,openvino-int8")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--repeats", type=int, default=4, help="processes per variant")
    parser.add_argument("--runs", type=int, default=8, help="timed runs per shape in each process")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--hugepages", choices=["on", "off", "both"], default="on", help="malloc's memory on 2 MB pages"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        variant = args.child.removesuffix(SMALL_PAGES)
        print(json.dumps(_child(args.export, args.head, variant, shapes, args.runs, args.threads)))
        return
    from btdeploy.bench.lone import alternate

    variants = args.variants.split(",")
    suffixes = {"on": [""], "off": [SMALL_PAGES], "both": ["", SMALL_PAGES]}[args.hugepages]
    names = [variant + suffix for suffix in suffixes for variant in variants]
    times = alternate(names, args.repeats, lambda name: [*sys.argv, "--child", name], shapes, _environment)
    medians = times.medians
    print(f"{args.export} {args.head}: each variant alone in {args.repeats} processes, {args.runs} runs per shape")
    print("| batch x length | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for shape in shapes:
        row = " | ".join(f"{statistics.median(medians[name][shape]):.1f}" for name in names)
        print(f"| {shape.replace('x', ' x ')} | {row} |")
    for suffix in suffixes:
        _print_goals(medians, shapes, suffix, suffix)
    if len(suffixes) == 2:
        # each engine as its own users start it: btdeploy's commands on huge pages, peers not
        _print_goals(medians, shapes, SMALL_PAGES, "")
        print("\n| 4 KB pages / huge pages | " + " | ".join(shapes) + " |")
        print("|---|" + "---:|" * len(shapes))
        for variant in variants:
            cells = [_ratio(medians[variant + SMALL_PAGES][s], medians[variant][s]) for s in shapes]
            print(f"| {variant} | " + " | ".join(cells) + " |")
    print("\n| variant | resident MB | of it on huge pages, MB |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {times.memory_row(name)} |")


if __name__ == "__main__":
    from btdeploy.cli import script_entry

    script_entry(main)
