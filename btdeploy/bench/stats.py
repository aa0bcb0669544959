"""Latency statistics of one benchmark case."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    samples: int
    median_ms: float
    mean_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    std_ms: float
    throughput: float  # samples (batch rows) per second at the median latency


def summarize(seconds: list[float], batch: int) -> LatencyStats:
    if not seconds:
        raise ValueError("no timing samples")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    median = float(np.median(ms))
    return LatencyStats(
        samples=len(ms),
        median_ms=median,
        mean_ms=float(ms.mean()),
        p90_ms=float(np.percentile(ms, 90)),
        p95_ms=float(np.percentile(ms, 95)),
        p99_ms=float(np.percentile(ms, 99)),
        min_ms=float(np.min(ms)),
        std_ms=float(ms.std()),
        throughput=batch / (median / 1e3),
    )


@dataclass(frozen=True)
class PairedRatio:
    """`theirs / ours` round by round. Interleaved variants run seconds apart within a round, so
    both sides of each ratio meet the same minute of the machine (a shared VM's host has slow and
    fast ones); a ratio of the two medians can instead set one variant's slow minutes against the
    other's fast ones."""

    rounds: int
    median: float
    low: float  # 25th percentile of the per-round ratios
    high: float  # 75th percentile
    ahead: int  # rounds in which `ours` was the faster


def paired_ratio(ours_s: list[float], theirs_s: list[float]) -> PairedRatio:
    """Both lists in round order, one sample per round (what the interleaved loop records)."""
    if len(ours_s) != len(theirs_s) or not ours_s:
        raise ValueError(f"paired samples need one per round on both sides ({len(ours_s)} against {len(theirs_s)})")
    ratios = np.asarray(theirs_s, dtype=np.float64) / np.asarray(ours_s, dtype=np.float64)
    return PairedRatio(
        rounds=len(ratios),
        median=float(np.median(ratios)),
        low=float(np.percentile(ratios, 25)),
        high=float(np.percentile(ratios, 75)),
        ahead=int((ratios > 1.0).sum()),
    )
