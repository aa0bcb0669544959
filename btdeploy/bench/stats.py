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
        min_ms=float(ms.min()),
        std_ms=float(ms.std()),
        throughput=batch / (median / 1e3),
    )
