"""The lazy imports that are not safe across threads, made one thread at a time.

transformers resolves `from transformers import X` through a lazy module that is not safe across
threads: loading heads from a thread pool failed with `ImportError: cannot import name
'BridgeTowerConfig'`. OpenVINO is imported with its telemetry module hidden for the duration
(backends/openvino.py), which two threads at once would undo for each other. Every import of
transformers in btdeploy, and that one of OpenVINO, runs inside `serial_imports()`
(tests/test_architecture.py holds transformers to it); once a module is in, the lock costs next
to nothing. And what installs each optional extra (pyproject.toml), for every message that needs one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

INSTALL_SERVE = "pip install 'btdeploy[serve]'"  # Ray Serve and tritonclient: serve, triton-repo
INSTALL_PEERS = "pip install 'btdeploy[peers]'"  # OpenVINO: a backend, and a peer in bench
INSTALL_BENCH = "pip install 'btdeploy[bench]'"  # matplotlib: the plots


def onnxruntime_distribution(machine: str | None = None, system: str | None = None) -> str:
    """The ONNX Runtime package pyproject.toml installs on this platform, by the same markers:
    `onnxruntime` (CPU only) on aarch64 and macOS, where PyPI has no onnxruntime-gpu 1.24 and
    nvidia-modelopt takes the CPU package; `onnxruntime-gpu` elsewhere."""
    import platform

    machine = platform.machine() if machine is None else machine
    system = platform.system() if system is None else system
    return "onnxruntime" if machine == "aarch64" or system == "Darwin" else "onnxruntime-gpu"


_LOCK = threading.RLock()  # re-entrant: an import inside may reach another helper that takes it


def _new_lock_in_child() -> None:
    """A thread that held the lock at a fork is not in the child: its next import would wait for good.
    (A with-block of the forking thread itself releases the old lock it entered.)"""
    global _LOCK
    _LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)


@contextmanager
def serial_imports() -> Iterator[None]:
    with _LOCK:
        yield
