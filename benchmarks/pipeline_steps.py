"""Every step of one or more `btdeploy pipeline` runs side by side, from their pipeline.json records:
seconds and peak resident memory per step, the wall time and the peak of each run.

    python benchmarks/pipeline_steps.py base/pipeline.json itm/pipeline.json --labels base,itm

Prints a markdown table (a step one run did not make shows "-"; "reused" marks a kept graph).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def step_table(records: list[dict[str, Any]], labels: list[str]) -> str:
    steps: list[str] = []
    cells: list[dict[str, str]] = []
    for record in records:
        column: dict[str, str] = {}
        for entry in record["steps"]:
            name = entry["step"]
            if name not in steps:
                steps.append(name)
            mark = " reused" if entry.get("reused") else ""
            column[name] = f"{entry['seconds']:.0f} s / {entry['peak_rss_gb']:.2f} GB{mark}"
        cells.append(column)
    lines = ["| step | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {step} | " + " | ".join(c.get(step, "-") for c in cells) + " |" for step in steps]
    totals = [
        f"**{r['wall_seconds'] / 60:.1f} min / {r['peak_rss_gb']:.2f} GB{'' if r['passed'] else ' FAILED'}**"
        for r in records
    ]
    lines.append("| **whole run** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+", help="pipeline.json files")
    parser.add_argument("--labels", help="comma list, one per record (default: the folder names)")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [path.parent.name for path in args.records]
    if len(labels) != len(args.records):
        parser.error(f"{len(labels)} labels for {len(args.records)} records")
    print(step_table([json.loads(path.read_text()) for path in args.records], labels))


if __name__ == "__main__":
    from btdeploy.cli import script_entry

    script_entry(main)
