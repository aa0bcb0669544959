"""Progress lines on stderr for long work (export, checks, pipelines), with each step's time and peak memory."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_START = time.monotonic()
# Peak resident memory (MB) of each step still open, innermost last: an inner step resets the
# kernel's high-water mark, so it folds the mark into every open step first.
_OPEN_PEAKS: list[float] = []


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


def _fold_peak() -> None:
    mark = peak_rss_mb()
    _OPEN_PEAKS[:] = [max(peak, mark) for peak in _OPEN_PEAKS]


@contextmanager
def step(message: str) -> Iterator[None]:
    """Announce a step, then report how long it took and the most memory it held."""
    say(f"{message} ...")
    started = time.monotonic()
    _fold_peak()
    own = _reset_peak()
    _OPEN_PEAKS.append(0.0)
    try:
        yield
        _fold_peak()
    finally:
        peak = _OPEN_PEAKS.pop()
    memory = f"peak RSS {peak / 1024:.2f} GB" if own else f"process peak RSS {peak / 1024:.2f} GB"
    say(f"{message}: done in {time.monotonic() - started:.1f}s, {memory}")
