"""`btdeploy pipeline`: the main job, export then check every head, ending in a summary table."""

from __future__ import annotations

import time
from pathlib import Path

from .check import check_export, report_data
from .export import DEFAULT_OPSET, export_head
from .fileio import write_json
from .heads import HEADS
from .models import resolve_model
from .parity import ParityRow, format_rows
from .progress import say


def run_pipeline(
    model: str, out: Path, seed: int = 0, heads: list[str] | None = None, opset: int = DEFAULT_OPSET
) -> bool:
    source = resolve_model(model, seed)
    heads = heads or list(HEADS)
    started = time.monotonic()
    summary: list[tuple[str, float, float, float, list[ParityRow]]] = []
    for index, head in enumerate(heads, 1):
        say(f"pipeline {index}/{len(heads)}: {head}")
        head_started = time.monotonic()
        manifest = export_head(source, head, out, opset)
        exported = time.monotonic() - head_started
        rows = check_export(out, [head])
        checked = time.monotonic() - head_started - exported
        size_mb = sum(p.stat().st_size for p in manifest.folder.glob("model.onnx*")) / 1e6
        summary.append((head, exported, checked, size_mb, rows))
    all_rows = [row for *_, rows in summary for row in rows]
    write_json(out / "parity.json", report_data(all_rows, "onnxruntime"))
    total = time.monotonic() - started
    print(format_rows(all_rows))
    print()
    print(f"{'head':<5} {'export':>8} {'check':>8} {'onnx MB':>9}  {'worst max_abs':>13}  {'min cosine':>10}  verdict")
    for head, exported, checked, size_mb, rows in summary:
        worst = max(r.stats.max_abs for r in rows)
        cosine = min(r.stats.cosine for r in rows)
        verdict = "PASS" if all(r.passed for r in rows) else "FAIL"
        print(
            f"{head:<5} {exported:>7.1f}s {checked:>7.1f}s {size_mb:>9.1f}  {worst:>13.2e}  {cosine:>10.7f}  {verdict}"
        )
    passed = all(row.passed for row in all_rows)
    print(f"pipeline {'PASSED' if passed else 'FAILED'} in {total:.0f}s; artifacts in {out}")
    return passed
