"""Benchmark reports: JSON (every sample), CSV (one row per case), Markdown, and PNG plots."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_json, write_text
from btdeploy.bench.figures import pyplot, save_png
from btdeploy.bench.machine import cpu_text
from btdeploy.bench.runner import BenchRun, CaseResult
from btdeploy.bench.stats import PairedRatio, paired_ratio
from btdeploy.bench.variants import VARIANTS, is_peer, precision_class

# The first columns are those of ONNX Runtime's transformers benchmark CSV, where they fit.
CSV_COLUMNS = [
    "engine", "version", "providers", "device", "precision", "io_binding", "model_name", "inputs", "threads",
    "batch_size", "sequence_length", "datetime", "test_times", "latency_variance", "latency_90_percentile",
    "latency_95_percentile", "latency_99_percentile", "average_latency_ms", "QPS",
    "variant", "median_ms", "min_ms", "rss_peak_mb", "load_rss_mb", "gpu_peak_mb", "gflop", "gflops_per_s",
    "pct_matmul_peak", "speedup_vs_torch_eager", "speedup_vs_ort_hf_optimizer",
]  # fmt: skip


def _engine_version(run: BenchRun, engine: str) -> str:
    versions = run.machine.get("versions", {})
    if engine == "onnxruntime":  # recorded under the package installed: onnxruntime-gpu or the CPU onnxruntime
        return str(versions.get("onnxruntime-gpu") or versions.get("onnxruntime", ""))
    return str(versions.get(engine, ""))


def csv_rows(run: BenchRun) -> list[dict[str, Any]]:
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    rows = []
    for case in run.cases:
        variant = VARIANTS[case.variant]
        rows.append(
            {
                "engine": variant.engine,
                "version": _engine_version(run, variant.engine),
                "providers": "CPUExecutionProvider" if run.settings.device == "cpu" else "CUDAExecutionProvider",
                "device": run.settings.device,
                "precision": variant.precision,
                "io_binding": False,
                "model_name": f"bridgetower-{case.head}",
                "inputs": 3,
                "threads": run.settings.threads,
                "batch_size": case.batch,
                "sequence_length": case.text_length,
                "datetime": stamp,
                "test_times": case.stats.samples,
                "latency_variance": round(case.stats.std_ms**2, 4),
                "latency_90_percentile": round(case.stats.p90_ms, 3),
                "latency_95_percentile": round(case.stats.p95_ms, 3),
                "latency_99_percentile": round(case.stats.p99_ms, 3),
                "average_latency_ms": round(case.stats.mean_ms, 3),
                "QPS": round(case.stats.throughput, 3),
                "variant": case.variant,
                "median_ms": round(case.stats.median_ms, 3),
                "min_ms": round(case.stats.min_ms, 3),
                "rss_peak_mb": round(case.rss_peak_mb, 1),
                "load_rss_mb": round(case.load_rss_mb, 1),
                "gpu_peak_mb": None if case.gpu_peak_mb is None else round(case.gpu_peak_mb, 1),
                "gflop": round(case.flops / 1e9, 3),
                "gflops_per_s": round(case.gflops_per_s, 2),
                "pct_matmul_peak": _percent_record(run, case),
                "speedup_vs_torch_eager": _rounded(case.speedups.get("torch-eager")),
                "speedup_vs_ort_hf_optimizer": _rounded(case.speedups.get("ort-hf-optimizer")),
            }
        )
    return rows


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _percent_record(run: BenchRun, case: CaseResult) -> float | None:
    percent = run.percent_of_peak(case)
    return None if math.isnan(percent) else round(percent, 1)  # no peak on a GPU: null, not NaN


def _peak_line(run: BenchRun) -> str:
    if run.settings.device == "cuda":
        return (
            "- % peak: not given on the GPU (its peak depends on the precision and the tensor cores); "
            "GFLOP/s = model FLOPs / median. GPU MB: the process's peak GPU allocation while a case's "
            "variants ran interleaved (every model built at the time included), so one value per case"
        )
    return (
        f"- FP32 matmul peak measured in this run: {run.matmul_peak_gflops:.1f} GFLOP/s (best 2048^3 GEMM of "
        + ", ".join(f"{k} {v:.1f}" for k, v in run.machine.get("matmul_gflops", {}).items())
        + "); % peak = model FLOPs / median / peak (an FP32 ceiling: INT8 and 16-bit float variants can pass 100 %)"
    )


def markdown(run: BenchRun) -> str:
    gpu = run.machine.get("gpu")
    on_gpu = run.settings.device == "cuda"
    baselines = run.settings.speedups_against
    versions = run.machine.get("versions", {})
    lines = [
        "# btdeploy benchmark",
        "",
        f"- command: `{run.command or '(library call)'}`",
        f"- CPU: {cpu_text(run.machine)}, {run.settings.threads} thread(s) used",
        f"- GPU: {gpu['name'] if gpu else 'none'}",
        f"- huge pages: {run.machine.get('huge_pages', 'not recorded')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        _peak_line(run),
        f"- timing: {run.settings.warmup} warm-up run(s), then "
        + (
            f"{run.settings.iters} interleaved rounds{_rounds_run(run)}"
            if run.settings.iters
            else f"{run.settings.seconds} s per variant"
        )
        + " (A B C, B C A, ...)"
        + (
            ", split evenly between builds of the variants in every order (A B C, B C A, ...; the variant"
            " built first in a process can run a few % slower)"
            if run.settings.rotate_builds
            else ", each variant built once in the order given"
        )
        + "; speedup = baseline median / variant median, same run",
        "",
        "| head | batch | length | variant | median ms | p90 ms | p99 ms | samples/s | GFLOP/s | % peak | "
        + "".join(f"x {name} | " for name in baselines)
        + "RSS MB |"
        + (" GPU MB |" if on_gpu else "")
        + " first call ms |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(baselines) + "---:|"
        + ("---:|" if on_gpu else "") + "---:|",
    ]  # fmt: skip
    for case in run.cases:
        speed = "".join(f"{case.speedups[b]:.2f} | " if b in case.speedups else "- | " for b in baselines)
        percent = run.percent_of_peak(case)
        gpu_memory = f" {case.gpu_peak_mb:.0f} |" if case.gpu_peak_mb is not None else " - |"
        lines.append(
            f"| {case.head} | {case.batch} | {case.text_length} | {case.variant} | {case.stats.median_ms:.1f} "
            f"| {case.stats.p90_ms:.1f} | {case.stats.p99_ms:.1f} | {case.stats.throughput:.2f} "
            f"| {case.gflops_per_s:.1f} | {'-' if math.isnan(percent) else f'{percent:.0f}'} | {speed}"
            f"{case.rss_peak_mb:.0f} |" + (gpu_memory if on_gpu else "") + f" {case.first_call_ms or 0:.0f} |"
        )
    lines += _per_round(run)
    lines += _against_peers(run)
    if run.skips:
        lines += ["", "Skipped:", ""]
        seen = set()
        for skip in run.skips:
            if (skip.variant, skip.reason) not in seen:
                seen.add((skip.variant, skip.reason))
                lines.append(f"- `{skip.variant}` ({skip.head}): {skip.reason}")
    if run.interrupted:
        lines += ["", "**Interrupted**: only the cases above finished."]
    return "\n".join(lines) + "\n"


def plot(run: BenchRun, path: Path, head: str) -> bool:
    """Median latency against batch size (one panel) and against text length (the other),
    one line per variant. Returns False when there is nothing to plot."""
    plt = pyplot("plots")
    if plt is None:
        return False

    cases = [c for c in run.cases if c.head == head]
    if not cases:
        return False
    variants = list(dict.fromkeys(c.variant for c in cases))
    lengths = sorted({c.text_length for c in cases})
    batches = sorted({c.batch for c in cases})
    styles = ["-", "--", ":", "-."]
    figure, (by_batch, by_length) = plt.subplots(1, 2, figsize=(12, 4.8))
    for color, variant in enumerate(variants):
        for style, length in enumerate(lengths):
            points = sorted(
                (c.batch, c.stats.median_ms) for c in cases if c.variant == variant and c.text_length == length
            )
            by_batch.plot(*zip(*points, strict=True), marker="o", color=f"C{color}", linestyle=styles[style % 4],
                          label=f"{variant}, length {length}")  # fmt: skip
        for style, batch in enumerate(batches):
            points = sorted(
                (c.text_length, c.stats.median_ms) for c in cases if c.variant == variant and c.batch == batch
            )
            by_length.plot(*zip(*points, strict=True), marker="o", color=f"C{color}", linestyle=styles[style % 4],
                           label=f"{variant}, batch {batch}")  # fmt: skip
    for axis, xlabel, ticks in ((by_batch, "batch size", batches), (by_length, "text length (tokens)", lengths)):
        axis.set_xticks(ticks)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("median latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    gpu = run.machine.get("gpu")
    if run.settings.device == "cuda" and gpu:
        where = gpu["name"]
    else:
        where = f"{run.machine.get('cpu', {}).get('model', '?')}, {run.settings.threads} threads"
    figure.suptitle(f"BridgeTower {head}: latency per variant ({where})")
    save_png(figure, path)
    return True


@dataclass(frozen=True)
class RoundSpeedup:
    """One variant against one baseline of its case, round by round: on a VM whose speed drifts
    between minutes, the ratio of the two medians can set one's slow minutes against the other's
    fast ones, where each round's ratio cannot."""

    case: CaseResult
    baseline: CaseResult
    paired: PairedRatio

    def as_record(self) -> dict[str, Any]:
        return {
            "head": self.case.head, "batch": self.case.batch, "text_length": self.case.text_length,
            "variant": self.case.variant, "baseline": self.baseline.variant,
            "ratio_of_medians": self.baseline.stats.median_ms / self.case.stats.median_ms,
            "paired": asdict(self.paired),
        }  # fmt: skip


def _cases_by_shape(run: BenchRun) -> list[list[CaseResult]]:
    """The run's cases grouped by head, batch and text length, in the order they ran."""
    shapes: dict[tuple[str, int, int], list[CaseResult]] = {}
    for case in run.cases:
        shapes.setdefault((case.head, case.batch, case.text_length), []).append(case)
    return list(shapes.values())


def _paired(ours: CaseResult, theirs: CaseResult) -> PairedRatio | None:
    """`theirs / ours` round by round, or None where a time-bounded run gave them different round counts."""
    return paired_ratio(ours.samples_s, theirs.samples_s) if len(ours.samples_s) == len(theirs.samples_s) else None


def round_speedups(run: BenchRun) -> list[RoundSpeedup]:
    """Every variant against each baseline of its case that ran the same rounds."""
    found = []
    for cases in _cases_by_shape(run):
        baselines = [c for name in run.settings.speedups_against for c in cases if c.variant == name]
        for case in cases:
            for baseline in baselines:
                if baseline is not case and (paired := _paired(case, baseline)):
                    found.append(RoundSpeedup(case, baseline, paired))
    return found


def _per_round(run: BenchRun) -> list[str]:
    rows = [
        f"| {item.case.head} | {item.case.batch} | {item.case.text_length} | {item.case.variant} "
        f"| {item.baseline.variant} | {item.baseline.stats.median_ms / item.case.stats.median_ms:.2f}x "
        f"| {item.paired.median:.2f}x ({item.paired.low:.2f}-{item.paired.high:.2f}) "
        f"| {item.paired.ahead} of {item.paired.rounds} |"
        for item in round_speedups(run)
    ]
    if not rows:
        return []
    return [
        "",
        "## Speedups round by round",
        "",
        "The baseline's time over the variant's in each interleaved round: median (middle half of the rounds), "
        "and the rounds in which the variant was the faster.",
        "",
        "| head | batch | length | variant | against | ratio of medians | per round | rounds faster |",
        "|---|---:|---:|---|---|---:|---:|---:|",
        *rows,
    ]


@dataclass(frozen=True)
class PeerComparison:
    """One case and precision class: btdeploy's fastest variant against the fastest peer, same run."""

    head: str
    batch: int
    text_length: int
    precision: str
    ours: CaseResult
    peer: CaseResult
    paired: PairedRatio | None  # None where the two have different round counts (a time-bounded run)

    @property
    def ratio_of_medians(self) -> float:
        return self.peer.stats.median_ms / self.ours.stats.median_ms

    def as_record(self) -> dict[str, Any]:
        return {
            "head": self.head, "batch": self.batch, "text_length": self.text_length, "precision": self.precision,
            "btdeploy": self.ours.variant, "btdeploy_median_ms": self.ours.stats.median_ms,
            "peer": self.peer.variant, "peer_median_ms": self.peer.stats.median_ms,
            "ratio_of_medians": self.ratio_of_medians, "paired": asdict(self.paired) if self.paired else None,
        }  # fmt: skip


def _btdeploy_default(name: str) -> bool:
    """A btdeploy variant as users get it: not a peer, not an opt-out that trades accuracy for speed."""
    return not is_peer(name) and not VARIANTS[name].opt_out


def peer_comparisons(run: BenchRun) -> list[PeerComparison]:
    """Per case and precision class: btdeploy's fastest variant against the fastest peer (by median)."""
    found = []
    for cases in _cases_by_shape(run):
        for kind in dict.fromkeys(precision_class(c.variant) for c in cases):
            ours = [c for c in cases if precision_class(c.variant) == kind and _btdeploy_default(c.variant)]
            peers = [c for c in cases if precision_class(c.variant) == kind and is_peer(c.variant)]
            if ours and peers:
                best = min(ours, key=lambda c: c.stats.median_ms)
                peer = min(peers, key=lambda c: c.stats.median_ms)
                found.append(
                    PeerComparison(best.head, best.batch, best.text_length, kind, best, peer, _paired(best, peer))
                )
    return found


def _against_peers(run: BenchRun) -> list[str]:
    rows = []
    for item in peer_comparisons(run):
        paired = item.paired
        per_round = (
            f"{paired.median:.2f}x ({paired.low:.2f}-{paired.high:.2f}) | {paired.ahead} of {paired.rounds}"
            if paired
            else "- | -"
        )
        rows.append(
            f"| {item.head} | {item.batch} | {item.text_length} | {item.precision} "
            f"| {item.ours.variant} {item.ours.stats.median_ms:.1f} ms | {item.peer.variant} "
            f"{item.peer.stats.median_ms:.1f} ms | **{item.ratio_of_medians:.2f}x** | {per_round} |"
        )
    unmatched = _peers_alone(run) + _opt_outs(run)
    if not rows and not unmatched:
        return []
    lines = ["", "## btdeploy against the peers (same run, same precision class)", ""]
    if rows:
        lines += [
            "Per round: the peer's time over btdeploy's in each interleaved round, median (middle half of the "
            "rounds); the two ran seconds apart, so both sides of a ratio met the same minute of the machine.",
            "",
            "| head | batch | length | precision | btdeploy's fastest | fastest peer | peer median / btdeploy median "
            "| per round | rounds btdeploy ahead |",
            "|---|---:|---:|---|---|---|---:|---:|---:|",
            *rows,
        ]
    return lines + unmatched


def _peers_alone(run: BenchRun) -> list[str]:
    """A precision class only peers ran in is named, with the variants that would compare, rather
    than left out of the table without a word."""
    ran = {name: is_peer(name) for name in dict.fromkeys(c.variant for c in run.cases)}
    ours = {precision_class(name) for name in ran if _btdeploy_default(name)}
    lines = []
    for kind in dict.fromkeys(precision_class(name) for name, peer in ran.items() if peer):
        if kind in ours:
            continue
        peers = ", ".join(name for name, peer in ran.items() if peer and precision_class(name) == kind)
        candidates = ", ".join(n for n in VARIANTS if _btdeploy_default(n) and precision_class(n) == kind)
        lines.append(f"- {kind}: only peers ran ({peers}); add {candidates or 'a btdeploy variant'} to compare")
    return ["", *lines] if lines else []


def _opt_outs(run: BenchRun) -> list[str]:
    """The variants kept off btdeploy's side of the table, each with what running it gives up; only
    in a precision class a peer ran in (elsewhere there is no comparison to keep them out of)."""
    ran = dict.fromkeys(c.variant for c in run.cases)
    compared = {precision_class(n) for n in ran if is_peer(n)}
    kept_out = [n for n in ran if VARIANTS[n].opt_out and precision_class(n) in compared]
    lines = [f"- not on btdeploy's side (an opt-out, not its default): {n}, {VARIANTS[n].opt_out}" for n in kept_out]
    return ["", *lines] if lines else []


def _rounds_run(run: BenchRun) -> str:
    """Where the builds rounded the rounds up (a whole number per build), how many ran."""
    done = max((len(case.samples_s) for case in run.cases), default=0)
    return f" asked, {done} run (a whole number per build)" if done > (run.settings.iters or 0) else ""


def write_reports(run: BenchRun, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    data = {
        "command": run.command,
        "machine": run.machine,
        "matmul_peak_gflops": run.matmul_peak_gflops,
        "settings": asdict(run.settings),
        "interrupted": run.interrupted,
        "skips": [asdict(s) for s in run.skips],
        "round_speedups": [item.as_record() for item in round_speedups(run)],
        "against_peers": [item.as_record() for item in peer_comparisons(run)],
        "cases": [
            {**asdict(c), "gflops_per_s": c.gflops_per_s, "pct_matmul_peak": _percent_record(run, c)} for c in run.cases
        ],
    }
    write_json(out / "results.json", data)
    written.append(out / "results.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(csv_rows(run))
    write_text(out / "results.csv", buffer.getvalue())
    write_text(out / "results.md", markdown(run))
    written += [out / "results.csv", out / "results.md"]
    for head in dict.fromkeys(c.head for c in run.cases):
        if plot(run, out / f"latency_{head}.png", head):
            written.append(out / f"latency_{head}.png")
    return written
