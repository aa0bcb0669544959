"""The benchmark loop: every available variant of a head, interleaved, per (batch, text length)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest
from btdeploy.backends.base import Backend
from btdeploy.bench.flops import forward_flops
from btdeploy.bench.memory import current_rss_mb, gpu_peak_mb_and_reset
from btdeploy.bench.stats import LatencyStats, summarize
from btdeploy.bench.variants import BASELINES, VARIANTS, BenchEnv, Variant
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.model.inputs import sample_inputs
from btdeploy.progress import Countdown, say
from btdeploy.signals import Terminated
from btdeploy.verify.parity import default_lengths_within, parse_shapes

T = TypeVar("T")


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


DEFAULT_TEXT_LENGTHS = (16, 40, 128)


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    text_lengths: tuple[int, ...] | None = None  # None: DEFAULT_TEXT_LENGTHS, each at most the model's length
    warmup: int = 2
    iters: int | None = 10
    seconds: float | None = None  # per variant and case, instead of a fixed count
    threads: int = 0  # 0: all cores
    device: str = "cpu"
    # Build every variant once in each position of the build order (see `build_orders`); False:
    # build each once, in the order given (faster; the variant built first may be disadvantaged).
    rotate_builds: bool = True
    # The variants every speedup in the reports is against, each timed in the same rounds (a peer
    # such as openvino-int8 sets every variant against it). None: BASELINES, where the run times them.
    baselines: tuple[str, ...] | None = None

    @property
    def speedups_against(self) -> tuple[str, ...]:
        return self.baselines or BASELINES


@dataclass
class BenchRun:
    settings: BenchSettings
    cases: list[CaseResult] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    exit_code: int = 0  # 130 after Ctrl-C, 143 after SIGTERM: the finished cases are still reported
    machine: dict[str, Any] = field(default_factory=dict)
    matmul_peak_gflops: float = 0.0
    command: str = ""

    @property
    def interrupted(self) -> bool:
        return self.exit_code != 0

    def percent_of_peak(self, case: CaseResult) -> float:
        return 100.0 * case.gflops_per_s / self.matmul_peak_gflops if self.matmul_peak_gflops else float("nan")


def interleaved_order(variants: list[T], round_index: int) -> list[T]:
    """A B C, then B C A, ...: each variant takes every position in turn, so slow drift of the
    machine (thermal, other load) spreads over all variants instead of biasing one."""
    if not variants:
        return []
    shift = round_index % len(variants)
    return variants[shift:] + variants[:shift]


def build_orders(variants: list[str], rotate: bool) -> list[list[str]]:
    """The orders in which the variants are built, one set of backends per order.

    Where a variant was built in the process matters on its own: of identical ONNX Runtime
    sessions built one after another, the first ran 2-11 % slower than the second in each of 12
    interleaved runs on a 2-core Xeon VM, and a peer bench gave btdeploy/OpenVINO 0.96x built
    ours first against 1.03x built theirs first (benchmarks/build_order.py). The cause was not the
    first session in the process, its warm-up order, malloc's mmap threshold or thread placement;
    so instead of guessing it, every variant is built once in every position (the rotations of
    the given order) and the rounds are split evenly between the builds."""
    if not rotate or len(variants) < 2:
        return [list(variants)]
    return [interleaved_order(variants, shift) for shift in range(len(variants))]


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


def one_text_length(given: int | None, config: Any) -> int:
    """The one text length of the rank and serve workloads: the first of --seq-lens, or the first
    default within the model's length."""
    return given if given is not None else default_lengths_within(DEFAULT_TEXT_LENGTHS[:1], config)[0]


def _shapes(settings: BenchSettings, config: Any) -> list[tuple[int, int]]:
    lengths = settings.text_lengths or default_lengths_within(DEFAULT_TEXT_LENGTHS, config)
    return parse_shapes(settings.batch_sizes, lengths, config)


def resolve_variants(names: list[str] | None, option: str = "--variants") -> list[Variant]:
    if not names:
        return list(VARIANTS.values())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise BtDeployError(f"{option}: unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in names]


def check_baselines(baselines: tuple[str, ...], variants: list[Variant]) -> None:
    """Each baseline a variant that this run times: a ratio needs both sides from the same rounds."""
    resolve_variants(list(baselines), "--baselines")
    timed = [variant.name for variant in variants]
    missing = [name for name in baselines if name not in timed]
    if missing:
        raise BtDeployError(
            f"--baselines {', '.join(missing)}: not among the variants this run times ({', '.join(timed)}); "
            "add it to --variants: a speedup is measured against a baseline timed in the same rounds"
        )


def run_bench(
    root: Path, heads: list[str] | None, variant_names: list[str] | None, settings: BenchSettings
) -> BenchRun:
    from btdeploy.bench.machine import torch_threads

    with torch_threads(settings.threads):
        return _run_bench(root, heads, variant_names, settings)


def _run_bench(
    root: Path, heads: list[str] | None, variant_names: list[str] | None, settings: BenchSettings
) -> BenchRun:
    from btdeploy.bench.machine import machine_description, matmul_peak_gflops

    variants = resolve_variants(variant_names)
    if settings.baselines is not None:
        check_baselines(settings.baselines, variants)
    folders = head_folders(Path(root), heads)
    for folder in folders:  # every head's shapes refused before the peak is measured, not after
        _shapes(settings, read_manifest(folder).config)
    if settings.device == "cuda":
        from btdeploy.backends.tensorrt.environment import gpu

        if gpu() is None:  # every variant would be skipped, after minutes of building the CPU ones
            raise BtDeployError("--device cuda: torch sees no NVIDIA GPU here; bench on the CPU with --device cpu")
    env = BenchEnv(threads=settings.threads, device=settings.device)
    run = BenchRun(settings, machine=machine_description(settings.threads))
    if settings.device == "cpu":  # a GPU's peak depends on the precision and the tensor cores: no one ceiling
        rates = matmul_peak_gflops(settings.threads)
        run.machine["matmul_gflops"] = rates
        run.matmul_peak_gflops = max(rates.values())
        say(
            f"bench: FP32 matmul peak at {settings.threads} thread(s): {run.matmul_peak_gflops:.1f} GFLOP/s ("
            + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
            + ")"
        )
    plans = [_plan_head(run, read_manifest(folder), variants, env, settings) for folder in folders]
    plans = [plan for plan in plans if plan.runnable]
    costs = [cost for plan in plans for cost in _part_costs(plan, settings)]
    if costs:
        say(
            f"bench: {len(costs)} part(s) to time ("
            + "; ".join(f"{p.head.name}: {len(p.runnable)} variant(s) x {len(p.cases)} shape(s) in {len(p.orders)} "
                        "build order(s)" for p in plans)
            + "); --variants, --batch-sizes, --seq-lens, --iters or --build-once make it shorter"
        )  # fmt: skip
    countdown = Countdown("bench", costs)
    try:
        for plan in plans:
            _bench_head(run, plan, env, settings, countdown)
    except KeyboardInterrupt as stop:
        run.exit_code = 143 if isinstance(stop, Terminated) else 130
        say(f"{'terminated' if run.exit_code == 143 else 'interrupted'}: keeping the {len(run.cases)} finished case(s)")
    return run


@dataclass
class _CaseSamples:
    """One case's samples gathered over every build order."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    gpu_peak: float | None = None

    def add(self, samples: dict[str, list[float]], rss: dict[str, float], first: dict[str, float]) -> None:
        for name, values in samples.items():
            self.samples.setdefault(name, []).extend(values)  # round i of every variant stays paired
            self.rss[name] = max(self.rss.get(name, 0.0), rss[name])
        for name, seconds in first.items():
            self.first.setdefault(name, seconds)  # the first build's: torch-compile compiles from scratch there


@dataclass
class _HeadPlan:
    """What the bench will time for one head: its shapes, the variants that run here, the build orders."""

    manifest: Manifest
    head: HeadSpec
    cases: list[tuple[int, int]]
    runnable: dict[str, Variant]
    orders: list[list[str]]


def _plan_head(
    run: BenchRun, manifest: Manifest, variants: list[Variant], env: BenchEnv, settings: BenchSettings
) -> _HeadPlan:
    """Every head is planned before any is timed: the skips are said at once, and the countdown
    knows the whole run."""
    head = get_head(manifest.head)
    runnable: dict[str, Variant] = {}
    for variant in variants:
        reason = variant.unavailable(manifest, env)
        if reason:
            run.skips.append(Skip(variant.name, head.name, reason))
            say(f"bench {head.name}: skipping {variant.name}: {reason}")
        else:
            runnable[variant.name] = variant
    cases = _shapes(settings, manifest.config)
    return _HeadPlan(manifest, head, cases, runnable, build_orders(list(runnable), settings.rotate_builds))


# The countdown's guess of one run's seconds, before anything is measured: only each part's share of
# the whole matters (the countdown scales it by the measured pace). Small shapes pay a fixed cost per
# run (a few ms on the tiny preset), large ones their FLOPs.
_GUESSED_FLOP_RATE = 200e9
_GUESSED_RUN_OVERHEAD_S = 0.005


def _part_costs(plan: _HeadPlan, settings: BenchSettings) -> list[float]:
    """A guessed cost of each (build order, shape) part of a head, in the order they run."""
    costs = []
    for _order in plan.orders:
        for batch, length in plan.cases:
            run_s = forward_flops(plan.manifest.config, plan.head, batch, length) / _GUESSED_FLOP_RATE
            run_s += _GUESSED_RUN_OVERHEAD_S
            if settings.seconds is not None:
                timed = max(settings.seconds / len(plan.orders), 3 * run_s)
            else:
                timed = _rounds_per_build(plan, settings) * run_s
            costs.append(len(plan.runnable) * (settings.warmup * run_s + timed))
    return costs


def _rounds_per_build(plan: _HeadPlan, settings: BenchSettings) -> int:
    assert settings.iters is not None
    return -(-settings.iters // len(plan.orders))  # at least iters in all


def _one_off_seconds(
    samples: dict[str, list[float]], first: dict[str, float], names: Collection[str] | None = None
) -> float:
    """The part of the first warm-up calls that will not recur (torch-compile compiling, OpenVINO
    finishing its plan): beyond twice the variant's median. Of every variant, or of `names`."""
    return sum(
        max(0.0, first[name] - 2 * statistics.median(samples[name]))
        for name in first
        if (names is None or name in names) and samples.get(name)
    )


def _specialized_kind(batch: int, length: int) -> tuple[bool, bool]:
    """Shapes torch.compile's dynamic graphs tell apart: a size of 1 is specialized, so each kind
    compiles once (batch 1 then batch 4 compiled twice; minutes on base)."""
    return batch == 1, length == 1


def _bench_head(run: BenchRun, plan: _HeadPlan, env: BenchEnv, settings: BenchSettings, countdown: Countdown) -> None:
    manifest, head, cases, runnable, orders = plan.manifest, plan.head, plan.cases, plan.runnable, plan.orders
    rounds = None if settings.iters is None else _rounds_per_build(plan, settings)
    seconds = None if settings.seconds is None else settings.seconds / len(orders)
    gathered = {case: _CaseSamples() for case in cases}
    load_rss: dict[str, float] = {}
    try:
        for order_index, order in enumerate(orders, 1):
            where = f" (build order {order_index}/{len(orders)})" if len(orders) > 1 else ""
            listed = f" (build order {order_index}/{len(orders)}: {', '.join(order)})" if where else ""
            backends: dict[str, Backend] = {}
            say(f"bench {head.name}: building {len(order)} variant(s){listed}")
            building = time.perf_counter()
            for name in order:
                before = current_rss_mb()
                backends[name] = runnable[name].build(manifest, env)
                load_rss.setdefault(name, current_rss_mb() - before)
            # The first build loads the model and the engines' libraries; later builds are quick.
            one_off = time.perf_counter() - building if order_index == 1 else 0.0
            compiled_s = 0.0  # what the variants that compile per kind of shape took at the first shape
            kinds_seen: set[tuple[bool, bool]] = set()
            for index, (batch, length) in enumerate(cases, 1):
                feeds = sample_inputs(manifest.config, batch, length, seed=index, pad=False)
                gpu_peak_mb_and_reset()
                samples, rss, first = time_case(backends, feeds, settings.warmup, rounds, seconds)
                gpu_peak = gpu_peak_mb_and_reset()
                case = gathered[(batch, length)]
                case.add(samples, rss, first)
                if gpu_peak is not None:
                    case.gpu_peak = max(case.gpu_peak or 0.0, gpu_peak)
                medians = ", ".join(f"{n} {1e3 * statistics.median(v):.1f} ms" for n, v in samples.items())
                kinds_seen.add(_specialized_kind(batch, length))
                if order_index == 1 and index == 1:
                    # What each new kind of shape ahead will cost again: the countdown would
                    # otherwise promise seconds where minutes are left.
                    recompiling = [n for n, b in backends.items() if getattr(b, "compiles_per_size_one_kind", False)]
                    compiled_s = _one_off_seconds(samples, first, recompiling)
                # Later build orders reuse the compiled code (they ran in seconds).
                kinds_ahead = {_specialized_kind(*c) for c in cases[index:]} - kinds_seen if order_index == 1 else set()
                countdown.advance(f"{head.name} batch {batch} length {length}{where}: {medians}",
                                  one_off_s=one_off + _one_off_seconds(samples, first),
                                  one_off_ahead_s=len(kinds_ahead) * compiled_s)  # fmt: skip
                one_off = 0.0
            del backends
    finally:  # an interrupt keeps every case that has samples
        flops_of = {case: forward_flops(manifest.config, head, *case) for case in cases if gathered[case].samples}
        for (batch, length), flops in flops_of.items():
            case = gathered[(batch, length)]
            rounds_done = min(len(values) for values in case.samples.values())
            results = {
                name: CaseResult(
                    name,
                    head.name,
                    batch,
                    length,
                    values[:rounds_done],  # whole rounds only, so that every round pairs
                    summarize(values[:rounds_done], batch),
                    flops,
                    case.rss[name],
                    load_rss[name],
                    case.gpu_peak,
                    first_call_ms=case.first[name] * 1e3 if name in case.first else None,
                )
                for name, values in case.samples.items()
            }
            for result in results.values():
                # The CSV's two columns read the default baselines, the reports the chosen ones.
                for baseline in dict.fromkeys((*BASELINES, *settings.speedups_against)):
                    if baseline in results:
                        result.speedups[baseline] = results[baseline].stats.median_ms / result.stats.median_ms
            run.cases.extend(results.values())
