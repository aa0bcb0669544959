"""How btdeploy stops: SIGTERM raised like Ctrl-C, so staged files are removed on the way out, and
both held back where an interrupt would abort the process instead."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, `kill`, a container stopping): everything that cleans up after
    Ctrl-C (staged folders, the bench's finished cases) does the same for it."""


def heeded_stops() -> list[signal.Signals]:
    """The stop signals this process heeds: one it ignores (`nohup`, a job a script starts with `&`
    ignores SIGINT) stays ignored wherever btdeploy takes over the stop signals for a while, so that
    a stop the user's shell asked it to ignore never cancels a build or a server's start."""
    return [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]


def stop_for(signum: int) -> KeyboardInterrupt:
    """What a stop signal raises where btdeploy raises it itself: Terminated for SIGTERM, else Ctrl-C's."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM's handler wherever btdeploy takes it: raise `Terminated`."""
    raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` for the duration of the block. Without it Python dies at once,
    leaving a half-written graph's staged folder (gigabytes on base) beside the artifacts."""
    if threading.current_thread() is not threading.main_thread() or signal.SIGTERM not in heeded_stops():
        yield  # signals reach the main thread only; an ignored SIGTERM stays ignored
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        restore_handler(signal.SIGTERM, previous)


def restore_handler(signum: int, handler: Any) -> None:
    # None: a handler set outside Python; Python's own defaults stand in for it
    default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    signal.signal(signum, default if handler is None else handler)


class HeldStops:
    """The stop signals held by `interrupts_deferred` so far: code that can end its work early
    (a TensorRT build, through its progress monitor) asks `requested`, from any thread. Python
    runs signal handlers on the main thread between bytecodes, which a thread blocked in native
    code never reaches; the interpreter's own C handler also writes each signal's number to the
    wakeup pipe at once, and `requested` reads it from there."""

    def __init__(self, wakeup: int | None = None) -> None:
        self.signals: list[int] = []
        self._wakeup = wakeup  # the read end of the wakeup pipe, non-blocking

    @property
    def requested(self) -> bool:
        if not self.signals and self._wakeup is not None:
            try:
                # the pipe has every signal Python handles; the stops are the ones asked about
                self.signals.extend(signum for signum in os.read(self._wakeup, 64) if signum in STOP_SIGNALS)
            except BlockingIOError:  # nothing there
                pass
        return bool(self.signals)

    def close(self) -> None:
        """Read what the pipe holds, then stop reading it (its descriptor number may be reused)."""
        if self._wakeup is not None:
            _ = self.requested
            self._wakeup = None


def _hold(_signum: int, _frame: FrameType | None) -> None:
    pass


@contextmanager
def interrupts_deferred() -> Iterator[HeldStops]:
    """Ctrl-C and SIGTERM held until the block ends, then delivered. For native code that cannot
    take an exception mid-way: Model Optimizer imports `lief`, a nanobind extension, and a
    KeyboardInterrupt raised while it initializes ends the process in C++ `terminate` (a core
    dump, a page of import frames and no cleanup); a TensorRT build calls back into Python, where
    an exception would cross its C++ frames, and ends early instead when its monitor sees the stop."""
    if threading.current_thread() is not threading.main_thread():
        yield HeldStops()  # signals reach the main thread only
        return
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)  # the C handler must never block
    held = HeldStops(read_end)
    # The pipe is set before the handlers change and unset after they are back, so that no stop
    # between the two is lost: `_hold` only keeps Python's default from raising, the pipe records it.
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous: dict[signal.Signals, Any] = {}
    try:
        for signum in heeded_stops():
            previous[signum] = signal.signal(signum, _hold)
        yield held
    finally:
        for stop, handler in previous.items():
            restore_handler(stop, handler)
        signal.set_wakeup_fd(previous_wakeup)
        held.close()
        os.close(read_end)
        os.close(write_end)
    if held.requested:
        signal.raise_signal(held.signals[0])  # the restored handler raises (or ends the process) as it would have


class _SignalStack(ctypes.Structure):
    """Linux's stack_t, the argument of sigaltstack(2)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def signal_stack_kept() -> Iterator[None]:
    """The calling thread's alternate signal stack (where Python's handlers run) as it was before the
    block. OpenVINO's compile_model sets one of its own on the thread and puts back what it found when
    that model is freed: models freed in another order than they were compiled (the three split graphs,
    a backend dropped before a later one) left the thread on freed memory, and the next Ctrl-C or
    SIGTERM handled there crashed the process (SIGSEGV, exit 139) instead of stopping it. Linux only
    (the layout of stack_t differs elsewhere; OpenVINO's CPU path is tested here on Linux)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    sigaltstack = ctypes.CDLL(None, use_errno=True).sigaltstack
    before = _SignalStack()
    sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        sigaltstack(ctypes.byref(before), None)
