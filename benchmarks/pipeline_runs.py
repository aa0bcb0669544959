"""Compare `btdeploy pipeline` runs from their progress logs: wall time per head and what each
graph-making step cost (seconds, peak RSS), side by side, with a bar chart.

    python benchmarks/pipeline_runs.py before.log after.log --labels before,after --out DIR

Reads only the progress lines every btdeploy version prints: `pipeline i/N: HEAD` at each head's
start, and `quantize HEAD (FLAVOUR, PRECISION) from SOURCE: done in Xs, peak RSS Y GB` per graph.
A head's wall time runs from its start line to the next head's (the last head ends at the last
stamped line, and counts only when the run finished: a stopped run's last head is left out), so
it includes everything the head did: export, checks, optimize, quantize. A run finished where the
log holds the summary's `pipeline PASSED|FAILED` line (stdout) or its last step's countdown line,
`pipeline [N/N] ...` (stderr: a log of the progress lines alone, `2> run.log`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from btdeploy.artifacts.files import write_text
from btdeploy.bench.figures import pyplot, save_png
from btdeploy.cli import script_entry

STAMP = re.compile(r"^\[\s*([\d.]+)s\] (.*)$")
HEAD_START = re.compile(r"^pipeline (\d+)/(\d+): (\w+)$")
FINISHED = re.compile(r"^pipeline (PASSED|FAILED) in ")
LAST_STEP = re.compile(r"^pipeline \[(\d+)/\1\] ")  # step N of N: the countdown's last line
QUANTIZE_DONE = re.compile(
    r"^quantize (\w+) \(([\w-]+), ([\w-]+)\) from \S+: done in ([\d.]+)s, (?:process )?peak RSS ([\d.]+) GB$"
)


@dataclass
class Run:
    label: str
    head_seconds: dict[str, float] = field(default_factory=dict)
    quantize: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # (head, graph) -> s, GB
    last: float = 0.0


def read_run(path: Path, label: str) -> Run:
    run = Run(label)
    starts: list[tuple[str, float]] = []
    finished = False
    for line in path.read_text(errors="replace").splitlines():
        finished = finished or bool(FINISHED.match(line))
        stamped = STAMP.match(line)
        if not stamped:
            continue
        at, message = float(stamped.group(1)), stamped.group(2)
        run.last = at
        finished = finished or bool(LAST_STEP.match(message))
        if head := HEAD_START.match(message):
            starts.append((head.group(3), at))
        elif done := QUANTIZE_DONE.match(message):
            head_name, flavour, precision, seconds, peak = done.groups()
            run.quantize[(head_name, f"{flavour}.{precision}")] = (float(seconds), float(peak))
    ends = [at for _, at in starts[1:]] + ([run.last] if finished else [])
    for (head_name, start), end in zip(starts, ends, strict=False):
        run.head_seconds[head_name] = end - start
    return run


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def compare(runs: list[Run]) -> str:
    heads = [h for h in runs[0].head_seconds if all(h in r.head_seconds for r in runs)]
    lines = [_row("head", *(f"{r.label} wall" for r in runs), "ratio"), "|---|" + "---:|" * (len(runs) + 1)]
    for head in heads:
        cells = [r.head_seconds[head] for r in runs]
        lines.append(_row(head, *(f"{c / 60:.1f} min" for c in cells), f"{cells[-1] / cells[0]:.2f}"))
    totals = [sum(r.head_seconds[h] for h in heads) for r in runs]
    ratio = f"**{totals[-1] / totals[0]:.2f}**"
    lines.append(_row("**these heads**", *(f"**{t / 60:.1f} min**" for t in totals), ratio))
    lines += ["", _row("head", "graph", *(f"{r.label} s / peak GB" for r in runs)), "|---|---|" + "---:|" * len(runs)]
    for key in [k for k in runs[0].quantize if k[0] in heads]:
        texts = [f"{r.quantize[key][0]:.0f} / {r.quantize[key][1]:.1f}" if key in r.quantize else "-" for r in runs]
        lines.append(_row(key[0], key[1], *texts))
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path) -> None:
    plt = pyplot("pipeline plot")
    if plt is None:
        return
    heads = [h for h in runs[0].head_seconds if all(h in r.head_seconds for r in runs)]
    keys = [k for k in runs[0].quantize if k[0] in heads]
    figure, (walls, steps) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        offsets = [i + index * width for i in range(len(heads))]
        walls.bar(offsets, [run.head_seconds[h] / 60 for h in heads], width, label=run.label)
        offsets = [i + index * width for i in range(len(keys))]
        steps.bar(offsets, [run.quantize.get(k, (0.0, 0.0))[0] for k in keys], width, label=run.label)
    walls.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(heads))], heads)
    walls.set_ylabel("minutes per head (everything)")
    steps.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(keys))], [f"{h}\n{g}" for h, g in keys],
                     fontsize=7)  # fmt: skip
    steps.set_ylabel("seconds per quantize step")
    walls.legend()
    save_png(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--labels", default=None, help="comma-separated, one per log")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [p.stem for p in args.logs]
    runs = [read_run(path, label) for path, label in zip(args.logs, labels, strict=True)]
    args.out.mkdir(parents=True, exist_ok=True)
    table = compare(runs)
    write_text(args.out / "pipeline_runs.md", table)
    plot(runs, args.out / "pipeline_runs.png")
    print(table)


if __name__ == "__main__":
    script_entry(main)
