"""`btdeploy bench --workload rank`: one image against N captions, split towers against the whole head.

The whole head runs the image tower once per caption (a batch of N copies of the image); the
split graphs run it once, the text tower on the N captions, and the fusion graph on N pairs.
Both are timed interleaved, for each bench variant asked whose backend runs the split towers
(ONNX Runtime's graphs by default; OpenVINO's by name)."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from btdeploy.artifacts.files import write_json, write_text
from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest
from btdeploy.backends.base import Backend
from btdeploy.backends.split import SplitBackend
from btdeploy.backends.targets import (
    BenchVariant,
    RunOptions,
    Target,
    bench_skip_reason,
    bench_variants,
    with_machine,
)
from btdeploy.bench.figures import pyplot, save_png
from btdeploy.bench.machine import cpu_text, machine_description
from btdeploy.bench.runner import one_text_length, time_case
from btdeploy.bench.stats import summarize
from btdeploy.errors import BtDeployError
from btdeploy.model.inputs import sample_inputs
from btdeploy.progress import Countdown, RowProgress, say
from btdeploy.verify.parity import parse_shapes

# What a CPU user runs: the plain export, the ort flavour and each precision quantize makes of it.
DEFAULT_RANKED = ("ort", "ort-fused", "ort-fp16", "ort-int8", "ort-int8-dynamic")


class _WholeHead:
    """The monolithic graph on one image repeated once per caption."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = feeds["input_ids"].shape[0]
        pixels = np.repeat(feeds["pixel_values"][:1], captions, axis=0)
        return self.backend.run({**feeds, "pixel_values": pixels})


class _SplitTowers:
    """Vision tower once, text tower on the captions, fusion on every pair."""

    def __init__(self, backend: SplitBackend) -> None:
        self.backend = backend

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = feeds["input_ids"].shape[0]
        image = self.backend.vision({"pixel_values": feeds["pixel_values"][:1]})
        text = self.backend.text(feeds)
        pairs = {name: np.repeat(values, captions, axis=0) for name, values in image.items()}
        return self.backend.fusion(text, pairs)


class _Reported:
    """A runner whose runs count towards a progress line: one variant's timing takes minutes at
    large size (the whole head on 16 captions, ten rounds), and said nothing until it ended."""

    def __init__(self, runner: Any, progress: RowProgress) -> None:
        self.runner, self.progress = runner, progress

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = self.runner.run(feeds)
        self.progress.advance()
        return values


@dataclass
class RankCase:
    variant: str
    precision: str
    kind: str  # "monolithic" or "split"
    samples_s: list[float]
    median_ms: float


@dataclass(frozen=True)
class RankedVariant:
    """A bench variant whose backend runs the split towers, with the bench's machine options."""

    target: Target
    variant: BenchVariant
    options: RunOptions  # the whole head's, with the bench's threads; the split towers' add split=True

    @property
    def name(self) -> str:
        return self.variant.name

    def unavailable(self, manifest: Manifest) -> str | None:
        """Why the heads bench would leave it out, or why its split towers cannot run; or None."""
        return bench_skip_reason(self.target, self.variant, manifest, self.options) or self.target.missing(
            manifest, replace(self.options, split=True)
        )

    def build(self, manifest: Manifest) -> tuple[Backend, SplitBackend]:
        split = cast("SplitBackend", self.target.make(manifest, replace(self.options, split=True)))
        return self.target.make(manifest, self.options), split


def ranked_variants(names: list[str] | None, manifest: Manifest, threads: int) -> list[RankedVariant]:
    """The variants to time. Named ones that cannot run here are refused, every problem in one line,
    before any is timed; of the defaults, those whose graphs are missing are skipped and said so."""
    known = bench_variants()
    runs_split = ", ".join(name for name, (target, _) in known.items() if target.runs_split)
    problems: list[str] = []
    chosen: list[RankedVariant] = []
    for name in names or DEFAULT_RANKED:
        if name not in known:
            problems.append(f"unknown variant {name!r} (rank runs {runs_split})")
            continue
        target, variant = known[name]
        if not target.runs_split:
            problems.append(f"{name} runs on {target.name}, which has no split towers (rank runs {runs_split})")
            continue
        ranked = RankedVariant(target, variant, with_machine(target, variant.options, threads, "cpu"))
        reason = ranked.unavailable(manifest)
        if reason and names:
            problems.append(f"{name}: {reason}")
        elif reason:
            say(f"bench rank: skipping {name}: {reason}")
        else:
            chosen.append(ranked)
    if problems:
        raise BtDeployError("--workload rank: " + "; ".join(problems))
    if not chosen:
        raise BtDeployError(f"--workload rank: none of {', '.join(DEFAULT_RANKED)} can run here (said above)")
    return chosen


def feature_bytes(backend: SplitBackend, pixel_values: np.ndarray) -> int:
    """Bytes of one image's cached features as saved (npz of the vision tower's outputs)."""
    arrays = backend.vision({"pixel_values": pixel_values[:1]})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return len(buffer.getvalue())


def run_rank_bench(
    root: Path,
    captions: int,
    text_length: int | None,
    warmup: int,
    iters: int,
    threads: int,
    out: Path,
    variants: list[str] | None = None,
) -> list[RankCase]:
    if captions < 1:
        raise BtDeployError(f"--captions {captions} must be at least 1")
    manifest = read_manifest(head_folders(root, ["itm"])[0])
    if len(manifest.stems) == 1:
        raise BtDeployError(f"{manifest.folder} has no split graphs: export with btdeploy export --split")
    config = manifest.config
    text_length = one_text_length(text_length, config)
    parse_shapes([captions], [text_length], config)  # refuses a length past the model's
    chosen = ranked_variants(variants, manifest, threads)
    feeds = sample_inputs(config, captions, text_length, seed=11, pad=False)
    cases: list[RankCase] = []
    sizes: dict[str, int] = {}
    differences: dict[str, float] = {}  # the split towers' logits against the whole head's, max abs
    countdown = Countdown("bench rank", [1.0] * len(chosen))
    for variant in chosen:
        whole, split = variant.build(manifest)
        sizes[variant.name] = feature_bytes(split, feeds["pixel_values"])
        # Each way runs once for the check below, then warm-up and timed runs: a line every 10 s.
        progress = RowProgress(2 * (1 + warmup + iters), f"bench rank {variant.name}: runs")
        ways = {"monolithic": _WholeHead(whole), "split": _SplitTowers(split)}
        runners: dict[str, Any] = {kind: _Reported(way, progress) for kind, way in ways.items()}
        expected, got = runners["monolithic"].run(feeds), runners["split"].run(feeds)
        worst = differences[variant.name] = float(np.abs(expected["logits"] - got["logits"]).max())
        samples, _, _ = time_case(runners, feeds, warmup, iters, None)
        precision = str(variant.options.precision)
        for kind, values in samples.items():
            cases.append(RankCase(variant.name, precision, kind, values, summarize(values, captions).median_ms))
        mono, parts = (summarize(samples[k], captions).median_ms for k in ("monolithic", "split"))
        countdown.advance(f"{variant.name}: monolithic {mono:.1f} ms, split {parts:.1f} ms ({mono / parts:.2f}x); "
                          f"split vs whole logits max diff {worst:.1e}")  # fmt: skip
    _write(out, cases, sizes, differences, captions, text_length, threads)
    return cases


def _write(
    out: Path,
    cases: list[RankCase],
    sizes: dict[str, int],
    differences: dict[str, float],
    captions: int,
    length: int,
    threads: int,
) -> None:
    machine = machine_description(threads)
    lines = [
        "# Ranking one image against many captions: split towers vs the whole ITM head",
        "",
        f"- workload: 1 image x {captions} captions of length {length} (no padding), itm head",
        f"- CPU: {cpu_text(machine)}, {threads} thread(s); huge pages {machine['huge_pages']}; each variant's "
        "engine on the CPU (ort-*: ONNX Runtime's CPU provider, openvino-*: OpenVINO)",
        "- monolithic: the whole graph on a batch of the image repeated per caption; split: vision tower once, "
        "text tower on the captions, fusion graph on the pairs",
        "- timing interleaved (monolithic, split / split, monolithic ...); medians; split vs whole: the largest"
        " difference of the itm logits between the two, same inputs",
        "",
        "| variant | monolithic ms | split ms | speedup | one image's cached features | split vs whole, max abs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_variant: dict[str, dict[str, RankCase]] = {}
    for case in cases:
        by_variant.setdefault(case.variant, {})[case.kind] = case
    for name, kinds in by_variant.items():
        mono, split = kinds["monolithic"].median_ms, kinds["split"].median_ms
        size = f"{sizes[name] / 2**20:.2f} MiB"
        lines.append(f"| {name} | {mono:.1f} | {split:.1f} | {mono / split:.2f}x | {size} | {differences[name]:.1e} |")
    write_text(out / "rank.md", "\n".join(lines) + "\n")
    write_json(out / "rank.json", {"captions": captions, "text_length": length, "threads": threads,
                                   "feature_bytes": sizes, "split_vs_whole_max_abs": differences, "machine": machine,
                                   "cases": [case.__dict__ for case in cases]})  # fmt: skip
    _plot(out / "rank.png", by_variant, captions)


def _plot(path: Path, by_variant: dict[str, dict[str, RankCase]], captions: int) -> None:
    plt = pyplot("rank plot")
    if plt is None:
        return
    names = list(by_variant)
    x = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(7, 4))
    for offset, kind in ((-0.2, "monolithic"), (0.2, "split")):
        axis.bar(x + offset, [by_variant[n][kind].median_ms for n in names], width=0.4, label=kind)
    axis.set_xticks(x, names)
    axis.set_ylabel("median ms")
    axis.set_title(f"itm: 1 image x {captions} captions")
    axis.legend()
    save_png(figure, path)
