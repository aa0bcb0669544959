"""Each variant alone in its own process, as a deployment runs it: one model per process.

In one process, on 4 KB pages, a session built earlier ran slower than one built later (by 4-6 %
on some VMs, by up to 15 % on others, and not by the same amount for every graph: build_order.py), so
any in-process comparison mixes the graphs with the places they were built in. Here every
process builds one variant, warms it up and times it; the processes take turns (the order
rotated every repeat), so the machine's drift over minutes falls on every variant alike.

    python benchmarks/lone_sessions.py DIR [--head itm] [--variants ort-fused,openvino-fp32,ort-int8,openvino-int8]
        [--shapes 1x16,4x40] [--repeats 4] [--runs 8] [--threads 2] [--hugepages on|off|both]
        [--python LABEL=PATH ...]

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

`--python LABEL=PATH` (repeatable) runs every variant under each of these interpreters, named
"VARIANT @LABEL": the same graphs on another ONNX Runtime, from a venv made with
`python -m venv --system-site-packages` and `pip install onnxruntime==V` there (its own
onnxruntime comes first on its path; this btdeploy and every other package are the machine's).
The peers run under each too, a control: they do not use ONNX Runtime, so their times must agree.
A table then sets each variant's time under every later interpreter over its time under the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from btdeploy.errors import BtDeployError

# Goal pairs (peer, btdeploy): the peer's median over btdeploy's, as the issue states them.
GOALS = (("openvino-fp32", "ort-fused"), ("openvino-int8", "ort-int8"), ("openvino-int8", "ort-int8-dynamic"))
SMALL_PAGES = " (4 KB pages)"  # the name of a variant run with --hugepages off
UNDER = " @"  # "VARIANT @LABEL": the variant run under the interpreter --python gave that label


def _environment(name: str) -> dict[str, str]:
    from btdeploy import hugepages

    if name.endswith(SMALL_PAGES):
        return hugepages.without_hugepages(os.environ)
    reason = hugepages.status().unavailable()
    if reason:
        raise SystemExit(f"huge pages cannot be used here: {reason}; run with --hugepages off")
    return hugepages.with_hugepages(os.environ)


def _variant_and_label(name: str) -> tuple[str, str]:
    """ "VARIANT @LABEL (4 KB pages)" as (VARIANT, LABEL); LABEL is "" where --python gave none."""
    variant, _, label = name.removesuffix(SMALL_PAGES).partition(UNDER)
    return variant, label


def _interpreters(pairs: list[str]) -> dict[str, str]:
    """--python LABEL=PATH options as {LABEL: PATH}, this interpreter first as "this" when any is given."""
    pythons = {"this": sys.executable} if pairs else {}
    for pair in pairs:
        label, equals, path = pair.partition("=")
        if not equals or not label or not Path(path).is_file():
            raise BtDeployError(f"--python takes LABEL=PATH to an interpreter, not {pair!r}: give a python that exists")
        pythons[label] = path
    return pythons


def _onnxruntime_version(python: str) -> str:
    """The ONNX Runtime an interpreter imports (its venv's own, where it has one)."""
    code = "import onnxruntime; print(onnxruntime.__version__, onnxruntime.__file__)"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise BtDeployError(f"{python} cannot import onnxruntime ({last}): install one in its venv")
    return done.stdout.strip()


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
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run every variant under this interpreter (another venv's ONNX Runtime); repeatable",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.child:
        variant = _variant_and_label(args.child)[0]
        print(json.dumps(_child(args.export, args.head, variant, shapes, args.runs, args.threads)))
        return
    from btdeploy.bench.lone import alternate

    variants = args.variants.split(",")
    pythons = _interpreters(args.python)
    labels = [UNDER + label for label in pythons] or [""]
    suffixes = {"on": [""], "off": [SMALL_PAGES], "both": ["", SMALL_PAGES]}[args.hugepages]
    names = [variant + label + suffix for suffix in suffixes for label in labels for variant in variants]

    def child_python(name: str) -> str | None:
        return pythons.get(_variant_and_label(name)[1])

    for label, path in pythons.items():
        print(f"@{label}: {path}, onnxruntime {_onnxruntime_version(path)}", flush=True)
    times = alternate(
        names, args.repeats, lambda name: [*sys.argv, "--child", name], shapes, _environment, child_python
    )
    medians = times.medians
    print(f"{args.export} {args.head}: each variant alone in {args.repeats} processes, {args.runs} runs per shape")
    print("| batch x length | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for shape in shapes:
        row = " | ".join(f"{statistics.median(medians[name][shape]):.1f}" for name in names)
        print(f"| {shape.replace('x', ' x ')} | {row} |")
    for suffix in suffixes:
        for label in labels:
            _print_goals(medians, shapes, label + suffix, label + suffix)
    if len(labels) > 1:
        print(f"\n| under each interpreter / under {labels[0].strip()} | " + " | ".join(shapes) + " |")
        print("|---|" + "---:|" * len(shapes))
        for suffix in suffixes:
            for label in labels[1:]:
                for variant in variants:
                    first, other = medians[variant + labels[0] + suffix], medians[variant + label + suffix]
                    cells = [_ratio(other[s], first[s]) for s in shapes]
                    print(f"| {variant}{label}{suffix} | " + " | ".join(cells) + " |")
    if len(suffixes) == 2:
        # each engine as its own users start it: btdeploy's commands on huge pages, peers not
        for label in labels:
            _print_goals(medians, shapes, label + SMALL_PAGES, label)
        print("\n| 4 KB pages / huge pages | " + " | ".join(shapes) + " |")
        print("|---|" + "---:|" * len(shapes))
        for name in (variant + label for label in labels for variant in variants):
            cells = [_ratio(medians[name + SMALL_PAGES][s], medians[name][s]) for s in shapes]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| variant | resident MB | of it on huge pages, MB |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {times.memory_row(name)} |")


if __name__ == "__main__":
    from btdeploy.cli import script_entry

    script_entry(main)
