"""Progress lines on stderr for long work (export, checks, pipelines), with each step's time and peak memory."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from btdeploy.heap import give_back_freed_heap

_START = time.monotonic()
# Peak resident memory (MB) of each step still open, innermost last: an inner step resets the
# kernel's high-water mark, so it folds the mark into every open step first.
_OPEN_PEAKS: list[float] = []
COLLECT_EVERY_S = 10.0  # the least time between two collections of reference cycles
_last_collection = _START


def say(message: str) -> None:
    """Print one progress line, stamped with the seconds since the process started."""
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A loud warning: framed so it is not lost among progress lines."""
    bar = "!" * 78
    print(f"{bar}\nWARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark (Linux VmHWM), or 0 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak() -> bool:
    """Restart the high-water mark from the current resident size (Linux clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _return_freed_memory(outermost: bool) -> None:
    """Hand the heap memory freed so far back to the system (glibc's malloc_trim). Without it a
    step's freed model copies stay resident, so the next step starts high and its peak, and the
    process's, carry memory nothing uses (on base, INT8 calibration after AutoCast: +4 GB).

    Before an outermost step, unreachable reference cycles are freed first. Model Optimizer's
    GraphSurgeon graphs are such cycles (nodes and tensors name each other) and hold the weights
    they read; with the hundreds of thousands of objects torch and transformers leave, CPython's
    own full collection comes rarely, and base itm's pipeline carried 1.36 GB of them from its
    first AutoCast step through the steps after it. A collection takes 0.1-0.3 s, so it is made
    at most every COLLECT_EVERY_S: a step that long pays a few percent at most, while many short
    steps (a tiny model's pipeline: 0.3 s each, 1.5x the time when each collected) skip it."""
    global _last_collection
    if outermost and time.monotonic() - _last_collection >= COLLECT_EVERY_S:
        gc.collect()
        _last_collection = time.monotonic()
    give_back_freed_heap()


def _fold_peak() -> None:
    mark = peak_rss_mb()
    _OPEN_PEAKS[:] = [max(peak, mark) for peak in _OPEN_PEAKS]


@dataclass
class StepRecord:
    """What a finished step cost: filled in when its block ends (manifests and reports record it)."""

    seconds: float = 0.0
    peak_rss_gb: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {"seconds": round(self.seconds, 1), "peak_rss_gb": round(self.peak_rss_gb, 2)}


@contextmanager
def step(message: str) -> Iterator[StepRecord]:
    """Announce a step, then report how long it took and the most memory it held."""
    say(f"{message} ...")
    started = time.monotonic()
    record = StepRecord()
    _fold_peak()
    _return_freed_memory(outermost=not _OPEN_PEAKS)
    own = _reset_peak()
    _OPEN_PEAKS.append(0.0)
    try:
        yield record
        _fold_peak()
    finally:
        peak = _OPEN_PEAKS.pop()
        record.seconds, record.peak_rss_gb = time.monotonic() - started, peak / 1024
    memory = f"peak RSS {record.peak_rss_gb:.2f} GB" if own else f"process peak RSS {record.peak_rss_gb:.2f} GB"
    say(f"{message}: done in {record.seconds:.1f}s, {memory}")


def clock(seconds: float) -> str:
    """12s, 3m05s, 1h02m: durations as people read them."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _time_text(elapsed: float, remaining: float, more: bool) -> str:
    return f"{clock(elapsed)} elapsed" + (f", about {clock(remaining)} left" if more else "")


class Countdown:
    """Elapsed and remaining time of work made of known parts with estimated costs: the estimate
    of what is left is scaled by how the finished parts' real time compared with their estimate."""

    def __init__(self, what: str, costs: list[float]) -> None:
        self.what = what
        self.costs = costs
        self.done = 0
        self.one_off = 0.0
        self.started = time.monotonic()

    def advance(self, label: str, skipped: bool = False, one_off_s: float = 0.0, one_off_ahead_s: float = 0.0) -> None:
        """One part finished: say so, with the time so far and an estimate of the time left. A
        skipped part (kept from an earlier run) cost next to nothing: it is taken out of the
        estimate instead of making the rest look quick. `one_off_s` of the part's time will not
        recur (a compilation): it counts as elapsed but not towards the pace of the rest.
        `one_off_ahead_s`: such time known to come in a later part (a compilation for a new shape),
        added to the estimate as it is."""
        if skipped and self.done < len(self.costs):
            self.costs[self.done] = 0.0
        self.done = min(self.done + 1, len(self.costs))
        self.one_off += one_off_s
        elapsed = time.monotonic() - self.started
        spent, left = sum(self.costs[: self.done]), sum(self.costs[self.done :])
        remaining = max(elapsed - self.one_off, 0.0) * left / spent if spent > 0 else 0.0
        remaining += one_off_ahead_s if left > 0 else 0.0
        say(f"{self.what} [{self.done}/{len(self.costs)}] {label}: {_time_text(elapsed, remaining, left > 0)}")


class RowProgress:
    """Progress inside one long step made of equal rows (calibration batches, checked shapes)."""

    def __init__(self, total: int, what: str, every_s: float = 10.0) -> None:
        self.total, self.what, self.every_s = total, what, every_s
        self.started = self.last = time.monotonic()
        self.done = 0

    def advance(self) -> None:
        """One row done; a line at most every `every_s` seconds, and one for the last row."""
        self.done += 1
        now = time.monotonic()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.started
        remaining = elapsed / self.done * (self.total - self.done)
        say(f"{self.what}: {self.done}/{self.total}, {_time_text(elapsed, remaining, self.done < self.total)}")
