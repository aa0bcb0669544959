"""`btdeploy pipeline`: the main job. Per head: export, check, then optimize and check each
flavour; it ends with a summary table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .check import check_export, report_data
from .export import DEFAULT_OPSET, export_head
from .fileio import write_json
from .heads import HEADS
from .models import resolve_model
from .optimize import optimize_head
from .parity import ParityRow, format_rows
from .passes import FLAVOURS
from .progress import say


@dataclass
class HeadSummary:
    head: str
    export_s: float = 0.0
    size_mb: float = 0.0
    rows: dict[str, list[ParityRow]] = field(default_factory=dict)  # graph -> parity rows
    fused: dict[str, str] = field(default_factory=dict)  # flavour -> "attention N/M, bridges N/M"

    @property
    def passed(self) -> bool:
        return all(row.passed for rows in self.rows.values() for row in rows)


def run_pipeline(
    model: str, out: Path, seed: int = 0, heads: list[str] | None = None, opset: int = DEFAULT_OPSET
) -> bool:
    source = resolve_model(model, seed)
    heads = heads or list(HEADS)
    started = time.monotonic()
    summaries: list[HeadSummary] = []
    for index, head in enumerate(heads, 1):
        say(f"pipeline {index}/{len(heads)}: {head}")
        summary = HeadSummary(head)
        head_started = time.monotonic()
        manifest = export_head(source, head, out, opset)
        summary.export_s = time.monotonic() - head_started
        summary.size_mb = sum(p.stat().st_size for p in manifest.folder.glob("model.onnx*")) / 1e6
        summary.rows["plain"] = check_export(out, [head])
        for flavour in FLAVOURS:
            result = optimize_head(manifest.folder, flavour)
            summary.fused[flavour] = (
                f"{result['attention_fused']}/{result['attention_expected']} attn, "
                f"{result['bridges_fused']}/{result['bridges_expected']} bridge"
            )
            summary.rows[flavour] = check_export(out, [head], flavour=flavour)
        summaries.append(summary)
    for graph in ("plain", *FLAVOURS):
        rows = [row for s in summaries for row in s.rows[graph]]
        write_json(out / f"parity.{graph}.json", report_data(rows, "onnxruntime", None if graph == "plain" else graph))
        print(f"\n== {graph} graph ({'model.onnx' if graph == 'plain' else f'model.{graph}.onnx'}) ==")
        print(format_rows(rows))
    print()
    worst_title = "worst max_abs plain/ort/trt"
    header = f"{'head':<5} {'export':>8} {'onnx MB':>8}  {worst_title:<30} {'ort fused':<26} {'trt fused':<26} verdict"
    print(header)
    for s in summaries:
        worst = "/".join(f"{max(r.stats.max_abs for r in s.rows[g]):.1e}" for g in ("plain", *FLAVOURS))
        print(
            f"{s.head:<5} {s.export_s:>7.1f}s {s.size_mb:>8.1f}  {worst:<30} {s.fused['ort']:<26} {s.fused['trt']:<26} "
            f"{'PASS' if s.passed else 'FAIL'}"
        )
    passed = all(s.passed for s in summaries)
    print(f"pipeline {'PASSED' if passed else 'FAILED'} in {time.monotonic() - started:.0f}s; artifacts in {out}")
    return passed
