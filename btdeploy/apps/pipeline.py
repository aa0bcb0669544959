"""`btdeploy pipeline`: the main job. Per head: export, check, optimize and check each flavour,
then quantize and check each precision; it ends with a summary table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from btdeploy.artifacts.files import graph_bytes, write_json
from btdeploy.artifacts.manifest import precision_file
from btdeploy.export.exporter import DEFAULT_OPSET, export_head
from btdeploy.model.checkpoints import resolve_model
from btdeploy.model.heads import HEADS
from btdeploy.optimize.optimizer import optimize_head
from btdeploy.optimize.passes import FLAVOURS
from btdeploy.progress import say
from btdeploy.quantize.quantizer import quantize_head
from btdeploy.verify.check import check_export, report_data
from btdeploy.verify.parity import ParityRow, format_rows

# (flavour, precision) graphs the pipeline writes after the FP32 ones: what ONNX Runtime
# users run (ort) and what TensorRT builds engines from (trt; dynamic INT8 is ORT-only).
PIPELINE_PRECISIONS = [("ort", "fp16"), ("ort", "int8"), ("ort", "int8-dynamic"), ("trt", "fp16"), ("trt", "int8")]


def graph_key(flavour: str | None, precision: str = "fp32") -> str:
    """plain, ort, trt, ort.int8, ...: how the pipeline names each graph's parity report."""
    if not flavour:
        return "plain"
    return flavour if precision == "fp32" else f"{flavour}.{precision}"


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
    model: str,
    out: Path,
    seed: int = 0,
    heads: list[str] | None = None,
    opset: int = DEFAULT_OPSET,
    precisions: tuple[str, ...] = ("fp16", "int8", "int8-dynamic"),
    calibration: tuple[Path | None, Path | None] = (None, None),
) -> bool:
    source = resolve_model(model, seed)
    heads = heads or list(HEADS)
    quantized = [(f, p) for f, p in PIPELINE_PRECISIONS if p in precisions]
    keys = ["plain", *FLAVOURS, *(graph_key(f, p) for f, p in quantized)]
    started = time.monotonic()
    summaries: list[HeadSummary] = []
    for index, head in enumerate(heads, 1):
        say(f"pipeline {index}/{len(heads)}: {head}")
        summary = HeadSummary(head)
        head_started = time.monotonic()
        manifest = export_head(source, head, out, opset)
        summary.export_s = time.monotonic() - head_started
        summary.size_mb = graph_bytes(manifest.model_path) / 1e6
        summary.rows["plain"] = check_export(out, [head])
        for flavour in FLAVOURS:
            result = optimize_head(manifest.folder, flavour)
            summary.fused[flavour] = (
                f"{result['attention_fused']}/{result['attention_expected']} attn, "
                f"{result['bridges_fused']}/{result['bridges_expected']} bridge"
            )
            summary.rows[flavour] = check_export(out, [head], flavour=flavour)
        for flavour, precision in quantized:
            quantize_head(manifest.folder, precision, flavour, *calibration)
            rows = check_export(out, [head], flavour=flavour, precision=precision)
            summary.rows[graph_key(flavour, precision)] = rows
        summaries.append(summary)
    for key in keys:
        flavour, _, precision = key.partition(".")
        rows = [row for s in summaries for row in s.rows[key]]
        graph_flavour = None if key == "plain" else flavour
        write_json(out / f"parity.{key}.json", report_data(rows, "onnxruntime", graph_flavour, precision or "fp32"))
        name = precision_file(flavour, precision or "fp32") if graph_flavour else "model.onnx"
        print(f"\n== {key} graph ({name}) ==")
        print(format_rows(rows))
    print()
    print(f"{'head':<5} {'export':>8} {'onnx MB':>8}  {'ort fused':<26} {'trt fused':<26} verdict")
    for s in summaries:
        print(
            f"{s.head:<5} {s.export_s:>7.1f}s {s.size_mb:>8.1f}  {s.fused['ort']:<26} {s.fused['trt']:<26} "
            f"{'PASS' if s.passed else 'FAIL'}"
        )
    print("\nworst row per graph (lowest cosine, then its max_abs):")
    for s in summaries:
        cells = []
        for key in keys:
            worst = min(s.rows[key], key=lambda r: r.stats.cosine)
            cells.append(f"{key} {worst.stats.cosine:.5f}/{worst.stats.max_abs:.1e}")
        print(f"  {s.head:<5} " + "  ".join(cells))
    passed = all(s.passed for s in summaries)
    print(f"pipeline {'PASSED' if passed else 'FAILED'} in {time.monotonic() - started:.0f}s; artifacts in {out}")
    return passed
