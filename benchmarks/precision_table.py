"""Markdown table of the worst parity row per head and precision, with each graph's size on disk.

    python benchmarks/precision_table.py EXPORT_DIR PARITY_JSON... > table.md

Each PARITY_JSON is a `btdeploy check --report` file; sizes come from the head folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from btdeploy.artifacts.onnx_files import graph_bytes
from btdeploy.cli import script_entry
from btdeploy.errors import BtDeployError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="the export folder the reports checked (head folders inside)")
    parser.add_argument("reports", type=Path, nargs="+", help="btdeploy check --report files")
    args = parser.parse_args(argv)
    root, reports = args.export, args.reports
    missing = [str(report) for report in reports if not report.is_file()]
    if missing:
        raise BtDeployError(f"no report {', '.join(missing)}: give the files `btdeploy check --report` wrote")
    columns = ["head", "graph", "worst output", "cosine", "max_abs", "of range", "argmax agreed/clear/all", "size MiB"]
    print("| " + " | ".join(columns) + " | verdict |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for report in reports:
        data = json.loads(report.read_text())
        for head in sorted({row["head"] for row in data["rows"]}):
            rows = [row for row in data["rows"] if row["head"] == head]
            worst = min(rows, key=lambda row: row["cosine"])
            argmax = [r for r in rows if r["argmax_total"]]
            counts = ("argmax_agree", "argmax_counted", "argmax_total")
            agreed = "/".join(str(sum(r[k] for r in argmax)) for k in counts)
            mib = graph_bytes(root / head / data["graph"]) / 2**20
            verdict = "PASS" if all(row["passed"] for row in rows) else "FAIL"
            print(
                f"| {head} | {data['graph']} | {worst['output']} | {worst['cosine']:.6f} | {worst['max_abs']:.2e} "
                f"| {worst['of_range']:.2e} | {agreed if argmax else '-'} | {mib:.1f} "
                f"| {verdict} |"
            )
    return 0


if __name__ == "__main__":
    script_entry(main)
