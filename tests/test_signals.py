"""How a command stops: SIGTERM unwinds like Ctrl-C (exit 143, staged files removed), and a stop
signal inside `interrupts_deferred` waits for the block to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_STAGED_THEN_TERMINATED = """
import os, signal, sys, time
from pathlib import Path
from btdeploy.artifacts.files import staged_directory
from btdeploy.cli import reporting_failures

def write_slowly():
    with staged_directory(Path(sys.argv[1]) / "graphs") as staging:
        (staging / "model.onnx").write_bytes(b"half a graph")
        os.kill(os.getpid(), signal.SIGTERM)  # a CI job cancelled mid-write
        time.sleep(30)
    return 0

sys.exit(reporting_failures(write_slowly, "btdeploy"))
"""

_DEFERRED = """
import os, signal, sys
from btdeploy.signals import Terminated, interrupts_deferred, sigterm_raises

signal.signal(signal.SIGINT, {sigint_handler})  # Ctrl-C's own, or ignored as under nohup
steps = []
with sigterm_raises():
    try:
        with interrupts_deferred() as held:
            os.kill(os.getpid(), signal.{signal})
            steps.append("the rest of the block ran")
            if held.requested:
                steps.append("held")
        steps.append("after the block")
    except KeyboardInterrupt as stop:
        steps.append(type(stop).__name__)
print(steps)
"""


def _python(code: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=120)


def test_sigterm_removes_the_staged_folder_and_exits_143(tmp_path: Path) -> None:
    done = _python(_STAGED_THEN_TERMINATED, str(tmp_path))
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.strip() == "btdeploy: terminated"
    assert list(tmp_path.iterdir()) == []  # neither the staged folder nor a final one


def _deferred(stop: str, sigint_handler: str = "signal.default_int_handler") -> str:
    return _DEFERRED.replace("{signal}", stop).replace("{sigint_handler}", sigint_handler)


def test_a_stop_signal_inside_a_deferred_block_is_raised_when_the_block_ends() -> None:
    for name, raised in [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")]:
        done = _python(_deferred(name))
        assert done.stdout.strip() == str(["the rest of the block ran", "held", raised]), (name, done.stderr[-2000:])


def test_a_stop_signal_the_process_ignores_is_not_held_by_a_deferred_block() -> None:
    # under `nohup` or a script's `&` SIGINT is ignored: a TensorRT build must not be cancelled by it
    done = _python(_deferred("SIGINT", sigint_handler="signal.SIG_IGN"))
    assert done.stdout.strip() == str(["the rest of the block ran", "after the block"]), done.stderr[-2000:]


_SIGTERM_IGNORED = """
import os, signal
from btdeploy.signals import sigterm_raises

signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a parent that wants the command to outlive its stop
with sigterm_raises():
    inside = signal.getsignal(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
print(inside is signal.SIG_IGN, "ran on")
"""


def test_sigterm_the_process_ignores_stays_ignored() -> None:
    done = _python(_SIGTERM_IGNORED)
    assert done.returncode == 0 and done.stdout.strip() == "True ran on", done.stderr[-2000:]


def test_signal_stack_kept_puts_back_the_threads_signal_stack() -> None:
    """What a library sets as this thread's signal stack inside the block is undone on the way out."""
    import ctypes

    from btdeploy.signals import _SignalStack, signal_stack_kept

    sigaltstack = ctypes.CDLL(None).sigaltstack

    def current() -> tuple[int | None, int, int]:
        stack = _SignalStack()
        assert sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.ss_sp, stack.ss_flags, stack.ss_size

    before = current()
    memory = ctypes.create_string_buffer(1 << 16)
    theirs = _SignalStack(ctypes.cast(memory, ctypes.c_void_p), 0, len(memory))
    with signal_stack_kept():
        assert sigaltstack(ctypes.byref(theirs), None) == 0
        assert current() == (theirs.ss_sp, 0, len(memory))
    assert current() == before
