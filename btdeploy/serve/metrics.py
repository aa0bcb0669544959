"""Per-head serving statistics in the Prometheus text format: requests, batch sizes, latency.

Every replica reports each batch it ran to one collector (a Ray actor), so the numbers cover
all replicas; the gateway serves them at /metrics beside Ray's own metrics.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [
            f'{name}_bucket{{{labels},le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out += [f"{name}_sum{{{labels}}} {self.total:.6f}", f"{name}_count{{{labels}}} {self.count}"]
        return out


@dataclass
class HeadStats:
    requests: int = 0
    errors: int = 0
    batches: int = 0
    batch_requests: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    batch_rows: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    batch_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    sizes: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # exact requests-per-batch counts


class ServeStats:
    def __init__(self) -> None:
        self.heads: dict[str, HeadStats] = defaultdict(HeadStats)
        self.request_seconds: dict[tuple[str, str], Histogram] = {}
        self.responses: dict[tuple[str, int], int] = defaultdict(int)

    def record_batch(self, head: str, requests: int, rows: int, seconds: float, failed: bool = False) -> None:
        stats = self.heads[head]
        stats.requests += requests
        stats.batches += 1
        stats.errors += requests if failed else 0
        stats.batch_requests.observe(requests)
        stats.batch_rows.observe(rows)
        stats.batch_seconds.observe(seconds)
        stats.sizes[requests] += 1

    def record_request(self, route: str, status: int, seconds: float) -> None:
        """One answered HTTP request (gateway side): its route family, status and latency."""
        key = (route, "ok" if status < 400 else "error")
        self.request_seconds.setdefault(key, Histogram(LATENCY_BUCKETS)).observe(seconds)
        self.responses[(route, status)] += 1

    def batch_sizes(self) -> dict[str, dict[int, int]]:
        """Per head, how many batches of each request count the server formed."""
        return {head: dict(sorted(stats.sizes.items())) for head, stats in self.heads.items()}

    def prometheus(self) -> str:
        lines = [
            "# HELP btdeploy_head_requests_total Requests a head replica ran (all replicas).",
            "# TYPE btdeploy_head_requests_total counter",
        ]
        for head, stats in sorted(self.heads.items()):
            lines.append(f'btdeploy_head_requests_total{{head="{head}"}} {stats.requests}')
        lines += ["# TYPE btdeploy_head_batches_total counter"]
        lines += [f'btdeploy_head_batches_total{{head="{h}"}} {s.batches}' for h, s in sorted(self.heads.items())]
        lines += ["# TYPE btdeploy_head_failed_requests_total counter"]
        lines += [
            f'btdeploy_head_failed_requests_total{{head="{h}"}} {s.errors}' for h, s in sorted(self.heads.items())
        ]
        for metric, attribute, help_text in (
            ("btdeploy_batch_requests", "batch_requests", "Requests merged into one batch."),
            ("btdeploy_batch_rows", "batch_rows", "Rows (image-text pairs) in one batch."),
            ("btdeploy_batch_seconds", "batch_seconds", "Time to run one batch."),
        ):
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"]
            for head, stats in sorted(self.heads.items()):
                lines += getattr(stats, attribute).lines(metric, f'head="{head}"')
        lines += [
            "# HELP btdeploy_request_seconds HTTP request latency at the gateway.",
            "# TYPE btdeploy_request_seconds histogram",
        ]
        for (route, outcome), histogram in sorted(self.request_seconds.items()):
            lines += histogram.lines("btdeploy_request_seconds", f'route="{route}",outcome="{outcome}"')
        lines += ["# TYPE btdeploy_responses_total counter"]
        for (route, status), count in sorted(self.responses.items()):
            lines.append(f'btdeploy_responses_total{{route="{route}",status="{status}"}} {count}')
        return "\n".join(lines) + "\n"
