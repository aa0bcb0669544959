"""The benchmark loop: every available variant of a head, interleaved, per (batch, text length)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btdeploy.artifacts.manifest import head_folders, read_manifest
from btdeploy.backends.base import Backend
from btdeploy.bench.flops import forward_flops
from btdeploy.bench.memory import current_rss_mb, gpu_peak_mb_and_reset
from btdeploy.bench.stats import LatencyStats, summarize
from btdeploy.bench.variants import VARIANTS, BenchEnv, Variant
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.model.inputs import sample_inputs
from btdeploy.progress import say


@dataclass
class CaseResult:
    variant: str
    head: str
    batch: int
    text_length: int
    samples_s: list[float]
    stats: LatencyStats
    flops: int
    rss_peak_mb: float
    load_rss_mb: float  # how much the process grew when this variant was built
    gpu_peak_mb: float | None = None
    first_call_ms: float | None = None  # the first warm-up call of the case: compile time for torch-compile
    speedups: dict[str, float] = field(default_factory=dict)  # baseline name -> baseline median / this median

    @property
    def gflops_per_s(self) -> float:
        return self.flops / (self.stats.median_ms / 1e3) / 1e9


@dataclass
class Skip:
    variant: str
    head: str
    reason: str


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    text_lengths: tuple[int, ...] = (16, 40, 128)
    warmup: int = 2
    iters: int | None = 10
    seconds: float | None = None  # per variant and case, instead of a fixed count
    threads: int = 0  # 0: all cores
    device: str = "cpu"


@dataclass
class BenchRun:
    settings: BenchSettings
    cases: list[CaseResult] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    interrupted: bool = False
    machine: dict[str, Any] = field(default_factory=dict)
    matmul_peak_gflops: float = 0.0
    command: str = ""

    def percent_of_peak(self, case: CaseResult) -> float:
        return 100.0 * case.gflops_per_s / self.matmul_peak_gflops if self.matmul_peak_gflops else float("nan")


def interleaved_order(variants: list[str], round_index: int) -> list[str]:
    """A B C, then B C A, ...: each variant takes every position in turn, so slow drift of the
    machine (thermal, other load) spreads over all variants instead of biasing one."""
    if not variants:
        return []
    shift = round_index % len(variants)
    return variants[shift:] + variants[:shift]


def time_case(
    backends: dict[str, Backend], feeds: dict[str, Any], warmup: int, iters: int | None, seconds: float | None
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
    """Interleaved timing; returns the samples, the RSS peak (MB) seen after each variant's runs,
    and each variant's first warm-up call (seconds), kept apart from the samples."""
    names = list(backends)
    first: dict[str, float] = {}
    for _ in range(warmup):
        for name in names:
            started = time.perf_counter()
            backends[name].run(feeds)
            first.setdefault(name, time.perf_counter() - started)
    samples: dict[str, list[float]] = {name: [] for name in names}
    rss: dict[str, float] = dict.fromkeys(names, 0.0)
    spent: dict[str, float] = dict.fromkeys(names, 0.0)
    round_index = 0
    while True:
        for name in interleaved_order(names, round_index):
            started = time.perf_counter()
            backends[name].run(feeds)
            elapsed = time.perf_counter() - started
            samples[name].append(elapsed)
            spent[name] += elapsed
            rss[name] = max(rss[name], current_rss_mb())
        round_index += 1
        if iters is not None and round_index >= iters:
            break
        if seconds is not None and round_index >= 3 and min(spent.values()) >= seconds:
            break
    return samples, rss, first


def resolve_variants(names: list[str] | None) -> list[Variant]:
    if not names:
        return list(VARIANTS.values())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise BtDeployError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in names]


def run_bench(
    root: Path, heads: list[str] | None, variant_names: list[str] | None, settings: BenchSettings
) -> BenchRun:
    import torch

    from btdeploy.bench.machine import machine_description, matmul_peak_gflops
    from btdeploy.bench.variants import BASELINES

    variants = resolve_variants(variant_names)
    env = BenchEnv(threads=settings.threads, device=settings.device)
    torch.set_num_threads(settings.threads)
    run = BenchRun(settings, machine=machine_description(settings.threads))
    rates = matmul_peak_gflops(settings.threads)
    run.machine["matmul_gflops"] = rates
    run.matmul_peak_gflops = max(rates.values())
    say(
        f"bench: FP32 matmul peak at {settings.threads} thread(s): {run.matmul_peak_gflops:.1f} GFLOP/s ("
        + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
        + ")"
    )
    try:
        for folder in head_folders(Path(root), heads):
            manifest = read_manifest(folder)
            head = get_head(manifest.head)
            backends: dict[str, Backend] = {}
            load_rss: dict[str, float] = {}
            for variant in variants:
                reason = variant.unavailable(manifest, env)
                if reason:
                    run.skips.append(Skip(variant.name, head.name, reason))
                    say(f"bench {head.name}: skipping {variant.name}: {reason}")
                    continue
                before = current_rss_mb()
                backends[variant.name] = variant.build(manifest, env)
                load_rss[variant.name] = current_rss_mb() - before
            config = manifest.config
            cases = [(b, n) for b in settings.batch_sizes for n in settings.text_lengths]
            for index, (batch, length) in enumerate(cases, 1):
                feeds = sample_inputs(config, batch, length, seed=index, pad=False)
                gpu_peak_mb_and_reset()
                samples, rss, first = time_case(backends, feeds, settings.warmup, settings.iters, settings.seconds)
                gpu_peak = gpu_peak_mb_and_reset()
                flops = forward_flops(config, head, batch, length)
                results = {
                    name: CaseResult(
                        name,
                        head.name,
                        batch,
                        length,
                        values,
                        summarize(values, batch),
                        flops,
                        rss[name],
                        load_rss[name],
                        gpu_peak,
                        first_call_ms=first[name] * 1e3 if name in first else None,
                    )
                    for name, values in samples.items()
                }
                for result in results.values():
                    for baseline in BASELINES:
                        if baseline in results:
                            result.speedups[baseline] = results[baseline].stats.median_ms / result.stats.median_ms
                run.cases.extend(results.values())
                medians = ", ".join(f"{n} {r.stats.median_ms:.1f} ms" for n, r in results.items())
                say(f"bench {head.name} [{index}/{len(cases)}] batch {batch} length {length}: {medians}")
            del backends
    except KeyboardInterrupt:
        run.interrupted = True
        say(f"interrupted: keeping the {len(run.cases)} finished case(s)")
    return run
