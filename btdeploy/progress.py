"""Progress lines on stderr for long work (export, checks, pipelines)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_START = time.monotonic()


def say(message: str) -> None:
    """Print one progress line, stamped with the seconds since the process started."""
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A loud warning: framed so it is not lost among progress lines."""
    bar = "!" * 78
    print(f"{bar}\nWARNING: {message}\n{bar}", file=sys.stderr, flush=True)


@contextmanager
def step(message: str) -> Iterator[None]:
    """Announce a step, then report how long it took."""
    say(f"{message} ...")
    started = time.monotonic()
    yield
    say(f"{message}: done in {time.monotonic() - started:.1f}s")
