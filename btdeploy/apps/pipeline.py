"""`btdeploy pipeline`: the main job, and the one orchestration of it (export/recipe.sh calls it).

Per head: export (with split towers on request), check; optimize and check every flavour;
quantize and check every precision each flavour is written in; where TensorRT runs, build and
check its engines. It ends with a summary table and one parity report per graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from btdeploy.artifacts.files import write_json
from btdeploy.artifacts.graph_names import Flavour, Precision, graph_file, graph_key
from btdeploy.artifacts.onnx_files import graph_bytes
from btdeploy.backends.targets import TARGETS, RunOptions
from btdeploy.export.exporter import DEFAULT_OPSET, export_head
from btdeploy.model.checkpoints import resolve_model
from btdeploy.model.heads import HEADS
from btdeploy.optimize.optimizer import optimize_head
from btdeploy.progress import say
from btdeploy.quantize.methods import METHODS, PRECISIONS, quantized_graphs
from btdeploy.quantize.quantizer import quantize_head
from btdeploy.verify.check import check_export, report_data
from btdeploy.verify.parity import ParityRow, format_rows


@dataclass(frozen=True)
class CheckedGraph:
    """One graph (or engine) the pipeline checks, and the report it writes."""

    key: str  # plain, ort, trt.int8, split, tensorrt.fp16, ...
    backend: str
    options: RunOptions

    @property
    def label(self) -> str:
        if self.backend != "onnxruntime":
            return f"{self.backend} {self.options.precision} engine"
        files = graph_file(self.options.flavour, self.options.precision)
        return files.replace("model.", "text/vision/fusion.") if self.options.split else files


@dataclass
class HeadSummary:
    head: str
    export_s: float = 0.0
    size_mb: float = 0.0
    rows: dict[str, list[ParityRow]] = field(default_factory=dict)  # graph key -> parity rows
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
    precisions: tuple[str, ...] = tuple(PRECISIONS),
    calibration: tuple[Path | None, Path | None] = (None, None),
    split: bool = False,
    flavours: tuple[Flavour, ...] = tuple(Flavour),
) -> bool:
    source = resolve_model(model, seed)
    heads = heads or list(HEADS)
    quantized = [(f, p) for f, p in quantized_graphs() if p in precisions and f in flavours]
    tensorrt = TARGETS["tensorrt"]
    engines_blocked = tensorrt.unavailable(RunOptions())
    # One engine per precision, from the newest dialect the installed TensorRT parses (build chooses).
    engine_precisions = list(dict.fromkeys(p for f, p in tensorrt.graphs if (f, p) in quantized))
    if engines_blocked:
        say(f"pipeline: no TensorRT engines on this machine ({engines_blocked})")
    started = time.monotonic()
    summaries: list[HeadSummary] = []
    checked: dict[str, CheckedGraph] = {}

    def check(summary: HeadSummary, graph: CheckedGraph) -> None:
        opts = graph.options
        summary.rows[graph.key] = check_export(
            out, [summary.head], backend=graph.backend, flavour=opts.flavour, precision=opts.precision, split=opts.split
        )
        checked[graph.key] = graph

    for index, head in enumerate(heads, 1):
        say(f"pipeline {index}/{len(heads)}: {head}")
        summary = HeadSummary(head)
        head_started = time.monotonic()
        manifest = export_head(source, head, out, opset, split)
        summary.export_s = time.monotonic() - head_started
        summary.size_mb = graph_bytes(manifest.model_path) / 1e6
        check(summary, CheckedGraph("plain", "onnxruntime", RunOptions()))
        if split:
            check(summary, CheckedGraph("split", "onnxruntime", RunOptions(split=True)))
        # Every flavour first: fp16 and int8 of the ort flavour start from the trt graph.
        for flavour in _optimized_first(flavours, quantized):
            result = optimize_head(manifest.folder, flavour)
            summary.fused[flavour] = (
                f"{result['attention_fused']}/{result['attention_expected']} attn, "
                f"{result['bridges_fused']}/{result['bridges_expected']} bridge"
            )
            check(summary, CheckedGraph(str(flavour), "onnxruntime", RunOptions(flavour=flavour)))
        for flavour, precision in quantized:
            quantize_head(manifest.folder, precision, flavour, *calibration)
            check(summary, CheckedGraph(graph_key(flavour, precision), "onnxruntime", RunOptions(flavour, precision)))
        if not engines_blocked and tensorrt.build is not None:
            for precision in engine_precisions:
                tensorrt.build(manifest.folder, precision)
                check(summary, CheckedGraph(f"tensorrt.{precision}", "tensorrt", RunOptions(precision=precision)))
        summaries.append(summary)
    _report(out, summaries, checked)
    passed = all(s.passed for s in summaries)
    print(f"pipeline {'PASSED' if passed else 'FAILED'} in {time.monotonic() - started:.0f}s; artifacts in {out}")
    return passed


def _optimized_first(flavours: tuple[Flavour, ...], quantized: list[tuple[Flavour, Precision]]) -> list[Flavour]:
    """The flavours to optimize: those asked for, plus any a quantized graph starts from."""
    needed = set(flavours) | {METHODS[p].source(f)[0] for f, p in quantized}
    return [flavour for flavour in Flavour if flavour in needed]


def _report(out: Path, summaries: list[HeadSummary], checked: dict[str, CheckedGraph]) -> None:
    for key, graph in checked.items():
        rows = [row for s in summaries for row in s.rows[key]]
        write_json(out / f"parity.{key}.json", report_data(rows, graph.backend, graph.options))
        print(f"\n== {key} graph ({graph.label}) ==")
        print(format_rows(rows))
    print()
    flavours = [str(f) for f in Flavour if any(str(f) in s.fused for s in summaries)]
    fused_header = " ".join(f"{f + ' fused':<26}" for f in flavours)
    print(f"{'head':<5} {'export':>8} {'onnx MB':>8}  {fused_header} verdict")
    for s in summaries:
        cells = " ".join(f"{s.fused[f]:<26}" for f in flavours)
        print(f"{s.head:<5} {s.export_s:>7.1f}s {s.size_mb:>8.1f}  {cells} {'PASS' if s.passed else 'FAIL'}")
    print("\nworst row per graph (lowest cosine, then its max_abs):")
    for s in summaries:
        worst_cells = []
        for key in checked:
            worst = min(s.rows[key], key=lambda r: r.stats.cosine)
            worst_cells.append(f"{key} {worst.stats.cosine:.5f}/{worst.stats.max_abs:.1e}")
        print(f"  {s.head:<5} " + "  ".join(worst_cells))
