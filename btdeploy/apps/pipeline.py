"""`btdeploy pipeline`: the main job, and the one orchestration of it (export/recipe.sh calls it).

Per head: export (with split towers on request), check; optimize and check every flavour;
quantize and check every precision each flavour is written in; where TensorRT runs, build and
check its engines. It ends with a summary table and one parity report per graph.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btdeploy.apps.disk_space import HeadPlan, require_disk_space
from btdeploy.artifacts.files import write_json
from btdeploy.artifacts.graph_names import Flavour, Precision, graph_key
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.artifacts.onnx_files import graph_bytes
from btdeploy.backends.targets import TARGETS, RunOptions
from btdeploy.export.exporter import DEFAULT_EXPORTER, DEFAULT_OPSET, export_head
from btdeploy.model.checkpoints import ModelSource, head_weight_count, load_config, resolve_model
from btdeploy.model.heads import HEADS, get_head
from btdeploy.model.media import paired_files, require_readable_images
from btdeploy.optimize.optimizer import optimize_head
from btdeploy.progress import Countdown, clock, say, step
from btdeploy.quantize.calibration import (
    DEFAULT_CALIB_SIZE,
    GENERATED_ADVICE,
    calibration_images,
    calibration_rows,
    require_calib_size,
    require_rows_fit_memory,
    warn_generated,
)
from btdeploy.quantize.methods import METHODS, PRECISIONS, quantized_graphs
from btdeploy.quantize.quantizer import quantize_head
from btdeploy.verify.check import ReferenceCache, check_export, graph_label, inputs_record, report_data
from btdeploy.verify.junit import junit_suite, write_junit
from btdeploy.verify.parity import ParityRow, format_rows


@dataclass(frozen=True)
class CheckedGraph:
    """One graph (or engine) the pipeline checks, and the report it writes."""

    key: str  # plain, ort, trt.int8, split, tensorrt.fp16, ...
    backend: str
    options: RunOptions

    @property
    def label(self) -> str:
        return graph_label(self.backend, self.options)


@dataclass
class HeadSummary:
    head: str
    size_mb: float = 0.0
    rows: dict[str, list[ParityRow]] = field(default_factory=dict)  # graph key -> parity rows
    fused: dict[str, str] = field(default_factory=dict)  # flavour -> "attention N/M, bridges N/M"
    steps: list[dict[str, Any]] = field(default_factory=list)  # what each step cost: seconds, peak RSS
    missing_weights: list[str] = field(default_factory=list)  # head weights the checkpoint lacks (drawn at random)
    source: str = ""

    @property
    def passed(self) -> bool:
        return all(row.passed for rows in self.rows.values() for row in rows)

    @property
    def export_s(self) -> float:
        return float(next((s["seconds"] for s in self.steps if s["step"] == "export"), 0.0))


JUNIT_FILE = "parity.junit.xml"

# Rough cost of each kind of step, in seconds on base on a 2-core machine: only their ratios matter,
# they weigh the finished steps against the ones left in the pipeline's remaining-time estimate.
STEP_COSTS = {"export": 60.0, "check": 15.0, "optimize": 25.0, "build": 120.0, "quantize": 90.0}


@dataclass(frozen=True)
class RunPlan:
    """What one pipeline run makes of each head, decided (and its inputs refused where bad) before any work."""

    source: ModelSource
    out: Path
    opset: int
    split: bool
    reuse: bool
    exporter: str
    optimized: list[Flavour]  # every flavour first: fp16 and int8 of the ort flavour start from the trt graph
    quantized: list[tuple[Flavour, Precision]]
    calibration: tuple[Path | None, Path | None]
    calib_size: int
    engines: list[Precision]  # TensorRT engines, where TensorRT runs here


class StepRunner:
    """Runs the steps of every head: each one timed into its head's summary, then counted down;
    each check's rows kept, with the graph it checked, for the reports."""

    def __init__(self, out: Path, countdown: Countdown, check_data: tuple[Path | None, Path | None]) -> None:
        self.out = out
        self.countdown = countdown
        self.images, self.texts = check_data
        self.references = ReferenceCache()
        self.checked: dict[str, CheckedGraph] = {}

    @contextmanager
    def timed(self, summary: HeadSummary, name: str) -> Iterator[dict[str, Any]]:
        """One pipeline step: its time and peak memory go to the summary, then the countdown moves."""
        entry: dict[str, Any] = {"head": summary.head, "step": name}
        with step(f"pipeline {summary.head}: {name}") as cost:
            yield entry
        summary.steps.append({**entry, **cost.to_json()})
        kept = bool(entry.get("reused"))
        self.countdown.advance(f"{summary.head} {name}" + (" (kept)" if kept else ""), skipped=kept)

    def check(self, summary: HeadSummary, graph: CheckedGraph) -> None:
        opts = graph.options
        with self.timed(summary, f"check {graph.key}"):
            summary.rows[graph.key] = check_export(
                self.out, [summary.head], backend=graph.backend, flavour=opts.flavour, precision=opts.precision,
                split=opts.split, references=self.references, images=self.images, texts=self.texts,
            )  # fmt: skip
        self.checked[graph.key] = graph


def run_pipeline(
    model: str,
    out: Path,
    seed: int = 0,
    heads: list[str] | None = None,
    opset: int = DEFAULT_OPSET,
    precisions: tuple[str, ...] = tuple(PRECISIONS),
    calibration: tuple[Path | None, Path | None] = (None, None),
    calib_size: int = DEFAULT_CALIB_SIZE,
    split: bool = False,
    flavours: tuple[Flavour, ...] = tuple(Flavour),
    force: bool = False,
    check_data: tuple[Path | None, Path | None] = (None, None),
    exporter: str = DEFAULT_EXPORTER,
) -> bool:
    """The main job. Graphs already in `out` that this run would make the same way (same checkpoint,
    source graphs, calibration and tool versions, intact on disk) are kept unless `force`. Every
    graph is checked on generated inputs, or on the user's pairs given as `check_data` (images, texts)."""
    # Unreadable or half-given pairs fail now, not after minutes of export and optimize.
    check_pair = paired_files(*check_data, ("--check-images", "--check-texts"))
    calibration_pair = paired_files(*calibration, ("--calib-images", "--calib-texts"))
    require_calib_size(calib_size)
    if check_pair:
        require_readable_images(check_pair[0], "--check-images")
    if calibration_pair:
        require_readable_images(calibration_images(calibration_pair, calib_size), "--calib-images")
    source = resolve_model(model, seed)
    heads = heads or list(HEADS)
    quantized = [(f, p) for f, p in quantized_graphs() if p in precisions and f in flavours]
    # Calibration rows past the memory are refused now, not at the first quantize step.
    rows = max((METHODS[p].rows_to_load(calib_size) for _, p in quantized if METHODS[p].calibrates), default=0)
    if rows:
        require_rows_fit_memory(calibration_rows(rows, calibration_pair), load_config(source))
    optimized = _optimized_first(flavours, quantized)
    # A disk too small for even the least the new graphs take is refused before any work.
    graphs = [(None, Precision.FP32), *((flavour, Precision.FP32) for flavour in optimized), *quantized]
    plans = [HeadPlan(head, head_weight_count(source, get_head(head)), graphs) for head in heads]
    disk = require_disk_space(out, plans, split)
    tensorrt = TARGETS["tensorrt"]
    engines_blocked = tensorrt.unavailable(RunOptions())
    # One engine per precision, from the newest dialect the installed TensorRT parses (build chooses).
    engine_precisions = list(dict.fromkeys(p for f, p in tensorrt.graphs if (f, p) in quantized))
    if engines_blocked:
        say(f"pipeline: no TensorRT engines on this machine ({engines_blocked})")
    calibrated = list(dict.fromkeys(str(p) for _, p in quantized if METHODS[p].calibrates))
    generated = calibration == (None, None) and bool(calibrated)
    if generated:  # said here and under the summary, not again at every quantize step
        warn_generated(f"every {' and '.join(calibrated)} graph of this run")
    engines = [] if engines_blocked or tensorrt.build is None else engine_precisions
    plan = RunPlan(source, out, opset, split, not force, exporter, optimized, quantized, calibration, calib_size,
                   engines)  # fmt: skip
    per_head = ["export", "check", *(["check"] if split else []), *(["optimize", "check"] * len(optimized)),
                *(["quantize", "check"] * len(quantized)), *(["build", "check"] * len(engines))]  # fmt: skip
    runner = StepRunner(out, Countdown("pipeline", [STEP_COSTS[kind] for _ in heads for kind in per_head]), check_data)
    started = time.monotonic()
    summaries = []
    for index, head in enumerate(heads, 1):
        say(f"pipeline {index}/{len(heads)}: {head}")
        summaries.append(_run_head(plan, runner, head))
    wall = time.monotonic() - started
    _report(out, summaries, runner.checked, check_data)
    calibrated_on = "generated" if generated else "files" if calibrated else None
    _write_run_record(out, summaries, wall, force, calibrated_on, disk)
    if generated:
        print(f"\ncalibration: the {' and '.join(calibrated)} graphs are calibrated on GENERATED inputs "
              f"{GENERATED_ADVICE}")  # fmt: skip
    passed = all(s.passed for s in summaries)
    peak = max((entry["peak_rss_gb"] for s in summaries for entry in s.steps), default=0.0)
    print(f"pipeline {'PASSED' if passed else 'FAILED'} in {clock(wall)}, peak RSS {peak:.2f} GB; "
          f"artifacts in {out}")  # fmt: skip
    return passed


def _run_head(plan: RunPlan, runner: StepRunner, head: str) -> HeadSummary:
    """One head through every step of the plan, each graph checked after it is made."""
    summary = HeadSummary(head)
    with runner.timed(summary, "export") as entry:
        manifest = export_head(plan.source, head, plan.out, plan.opset, plan.split, reuse=plan.reuse,
                               exporter=plan.exporter)  # fmt: skip
        entry["reused"] = manifest.reused
    summary.size_mb = graph_bytes(manifest.model_path) / 1e6
    summary.missing_weights = list(manifest.data["model"].get("missing_weights", []))
    summary.source = str(manifest.data["model"]["source"])
    runner.check(summary, CheckedGraph("plain", "onnxruntime", RunOptions()))
    if plan.split:
        runner.check(summary, CheckedGraph("split", "onnxruntime", RunOptions(split=True)))
    for flavour in plan.optimized:
        with runner.timed(summary, f"optimize {flavour}") as entry:
            result = optimize_head(manifest.folder, flavour, reuse=plan.reuse)
            entry["reused"] = bool(result.get("reused"))
        summary.fused[flavour] = (
            f"{result['attention_fused']}/{result['attention_expected']} attn, "
            f"{result['bridges_fused']}/{result['bridges_expected']} bridge"
        )
        runner.check(summary, CheckedGraph(str(flavour), "onnxruntime", RunOptions(flavour=flavour)))
    for flavour, precision in plan.quantized:
        key = graph_key(flavour, precision)
        with runner.timed(summary, f"quantize {key}") as entry:
            result = quantize_head(
                manifest.folder, precision, flavour, *plan.calibration, plan.calib_size, reuse=plan.reuse,
                announce_generated=False,
            )  # fmt: skip
            entry["reused"] = bool(result.get("reused"))
        runner.check(summary, CheckedGraph(key, "onnxruntime", RunOptions(flavour, precision)))
    tensorrt = TARGETS["tensorrt"]
    for precision in plan.engines:
        assert tensorrt.build is not None
        with runner.timed(summary, f"build tensorrt.{precision}"):
            tensorrt.build(manifest.folder, precision)
        runner.check(summary, CheckedGraph(f"tensorrt.{precision}", "tensorrt", RunOptions(precision=precision)))
    runner.references.forget(manifest.folder)
    _record_steps(manifest.folder, summary.steps)
    return summary


def _record_steps(folder: Path, steps: list[dict[str, Any]]) -> None:
    """The head's pipeline steps (seconds, peak resident memory, reused or made) into its manifest."""
    manifest = read_manifest(folder)
    manifest.data["pipeline_steps"] = steps
    manifest.write()


def _write_run_record(
    out: Path, summaries: list[HeadSummary], wall: float, force: bool, calibration: str | None, disk: dict[str, int]
) -> None:
    """pipeline.json: wall time, peak memory and every step's cost, for results and comparisons;
    what the quantized graphs were calibrated on (generated or files; None: nothing calibrated);
    the disk estimate made before the run."""
    steps = [entry for s in summaries for entry in s.steps]
    record = {
        "wall_seconds": round(wall, 1),
        "peak_rss_gb": max((entry["peak_rss_gb"] for entry in steps), default=0.0),
        "force": force,
        "machine": platform.processor() or platform.machine(),
        "steps": steps,
        "passed": all(s.passed for s in summaries),
        "random_head_weights": {s.head: s.missing_weights for s in summaries if s.missing_weights},
        "calibration": calibration,
        "disk": disk,
    }
    write_json(out / "pipeline.json", record)


def _optimized_first(flavours: tuple[Flavour, ...], quantized: list[tuple[Flavour, Precision]]) -> list[Flavour]:
    """The flavours to optimize: those asked for, plus any a quantized graph starts from."""
    needed = set(flavours) | {METHODS[p].source(f)[0] for f, p in quantized}
    return [flavour for flavour in Flavour if flavour in needed]


def _report(
    out: Path,
    summaries: list[HeadSummary],
    checked: dict[str, CheckedGraph],
    check_data: tuple[Path | None, Path | None],
) -> None:
    suites = []
    for key, graph in checked.items():
        rows = [row for s in summaries for row in s.rows[key]]
        data = report_data(rows, graph.backend, graph.options, inputs_record(*check_data, rows))
        write_json(out / f"parity.{key}.json", data)
        suites.append(junit_suite(graph.label, rows, data))
        print(f"\n== {key} graph ({graph.label}) ==")
        print(format_rows(rows))
    write_junit(out / JUNIT_FILE, suites)  # every graph's rows as test cases, for CI
    print()
    flavours = [str(f) for f in Flavour if any(str(f) in s.fused for s in summaries)]
    fused_header = " ".join(f"{f + ' fused':<26}" for f in flavours)
    print(f"{'head':<5} {'export':>8} {'onnx MB':>8}  {fused_header} verdict")
    for s in summaries:
        cells = " ".join(f"{s.fused[f]:<26}" for f in flavours)
        verdict = ("PASS" if s.passed else "FAIL") + (", RANDOM head weights" if s.missing_weights else "")
        print(f"{s.head:<5} {s.export_s:>7.1f}s {s.size_mb:>8.1f}  {cells} {verdict}")
    for s in summaries:
        if s.missing_weights:
            # The warning at export scrolls away in a long run; the summary is what people read.
            print(
                f"  {s.head}: {s.source} has no weights for {len(s.missing_weights)} parameter(s) of this head "
                f"({', '.join(s.missing_weights[:3])}{' ...' if len(s.missing_weights) > 3 else ''}), drawn at "
                "random: its graphs match that random model, but its answers are meaningless; export it from a "
                "checkpoint that has them, or leave it out with --heads"
            )
    print("\ntime and peak resident memory per step (reused: kept from an earlier run, checked again):")
    for s in summaries:
        made = [f"{e['step']} {e['seconds']:.0f}s/{e['peak_rss_gb']:.1f}GB{' reused' if e.get('reused') else ''}"
                for e in s.steps if not e["step"].startswith("check")]  # fmt: skip
        checks = [e for e in s.steps if e["step"].startswith("check")]
        made.append(f"{len(checks)} checks {sum(e['seconds'] for e in checks):.0f}s/"
                    f"{max((e['peak_rss_gb'] for e in checks), default=0):.1f}GB")  # fmt: skip
        print(f"  {s.head:<5} " + ", ".join(made))
    print("\nworst row per graph (lowest cosine, then its max_abs):")
    for s in summaries:
        worst_cells = []
        for key in checked:
            worst = min(s.rows[key], key=lambda r: r.stats.cosine)
            worst_cells.append(f"{key} {worst.stats.cosine:.5f}/{worst.stats.max_abs:.1e}")
        print(f"  {s.head:<5} " + "  ".join(worst_cells))
