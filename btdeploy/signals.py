"""How btdeploy stops: SIGTERM raised like Ctrl-C, so staged files are removed on the way out, and
both held back where an interrupt would abort the process instead."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `kill`, a container stopping): everything that cleans up after
    Ctrl-C (staged folders, the bench's finished cases) does the same for it."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` for the duration of the block. Without it Python dies at once,
    leaving a half-written graph's staged folder (gigabytes on base) beside the artifacts."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held until the block ends, then delivered. For imports of native
    extensions that cannot take an exception mid-way: Model Optimizer imports `lief`, a nanobind
    extension, and a KeyboardInterrupt raised while it initializes ends the process in C++
    `terminate` (a core dump, a page of import frames and no cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler set outside Python; Python's own defaults stand in for it
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, default if handler is None else handler)
    if caught:
        signal.raise_signal(caught[0])  # the restored handler raises (or ends the process) as it would have
