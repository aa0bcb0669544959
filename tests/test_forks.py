"""forks.py: what a forked child keeps of the models its parent loaded, and what it says."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import threading
import weakref
from collections.abc import Callable

import pytest

from btdeploy.errors import BtDeployError
from btdeploy.forks import LoadedProcess


class _Pool:
    """Stands in for a backend holding a native pool."""

    def __init__(self, name: str = "onnxruntime") -> None:
        self.name = name
        self.lock = threading.Lock()
        self.loaded_in: LoadedProcess | None = None  # set as btdeploy's loaders set it


def _in_child(work: Callable[[], str]) -> str:
    """`work()` in a forked child of this process; what it returned (or raised) comes back as text."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - reports through the pipe
        try:
            try:
                answer = work()
            except Exception as error:
                answer = f"{type(error).__name__}: {error}"
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(child, 0)
    return answer


def test_a_kept_backend_outlives_its_last_reference_in_a_child_and_renews_its_lock() -> None:
    kept, dropped = _Pool(), _Pool()
    kept.lock.acquire()  # as a parent's thread may hold it at the fork
    kept.loaded_in = LoadedProcess(kept, "a pool", kept=True, renew=lambda b: setattr(b, "lock", threading.Lock()))
    refs = [weakref.ref(kept), weakref.ref(dropped)]

    def drop_both() -> str:
        nonlocal kept, dropped
        unlocked = kept.lock.acquire(timeout=1)
        del kept, dropped
        gc.collect()
        return f"{unlocked} {refs[0]() is not None} {refs[1]() is not None}"

    # the kept one is alive with a fresh lock, the other freed
    assert _in_child(drop_both) == "True True False"
    kept.lock.release()
    del kept
    gc.collect()
    assert refs[0]() is None  # in the parent it is freed as usual


def test_a_run_in_a_child_is_told_once_and_a_gpu_model_is_refused() -> None:
    cpu = LoadedProcess(_Pool("onnxruntime"), "ONNX Runtime's thread pool", kept=True)
    wide = LoadedProcess(_Pool("openvino"), "OpenVINO's thread pool (TBB)", process_wide=True)
    gpu = LoadedProcess(_Pool("tensorrt"), "TensorRT", on_gpu=True)
    assert not cpu.first_run_in_child() and not gpu.first_run_in_child()  # the parent runs as usual

    def runs() -> str:
        firsts = [cpu.first_run_in_child(), cpu.first_run_in_child()]
        wide.first_run_in_child()
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            for loaded in (cpu, cpu, wide):
                loaded.say_one_thread()
        try:
            gpu.first_run_in_child()
        except BtDeployError as error:
            return f"{firsts} | {error} | {said.getvalue()}"
        return f"{firsts} | not refused | {said.getvalue()}"

    firsts, refusal, said = _in_child(runs).split(" | ")
    assert firsts == "[True, False]"
    assert refusal == (
        "tensorrt backend: this process was forked after the model was loaded on a GPU, and a CUDA context "
        "does not survive fork: load the model in each worker, or start the workers with spawn"
    )
    notices = [line for line in said.splitlines() if "forked after" in line]
    assert len(notices) == 2, notices  # one per pool, though cpu said it twice
    ort, openvino = notices
    assert "ONNX Runtime's thread pool does not survive fork: it runs on one thread here, and stays in memory" in ort
    assert "(load the model in each worker, or start them with spawn, for every core)" in ort
    assert "load the model in each worker and none before the fork" in openvino and "in memory" not in openvino


def test_a_pool_that_is_the_whole_processs_runs_on_one_thread_in_a_child_for_a_model_loaded_there() -> None:
    LoadedProcess(_Pool("torch"), "torch's thread pool", process_wide=True)  # the parent's: the pool starts here
    assert not LoadedProcess(_Pool("torch"), "torch's thread pool", process_wide=True).first_run_in_child()

    def loaded_in_the_child() -> str:
        wide = LoadedProcess(_Pool("torch"), "torch's thread pool", process_wide=True)
        per_model = LoadedProcess(_Pool("onnxruntime"), "ONNX Runtime's thread pool", kept=True)
        # loaded here: its CUDA context is this process's
        gpu = LoadedProcess(_Pool("tensorrt"), "TensorRT", on_gpu=True)
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            firsts = [wide.first_run_in_child(), wide.first_run_in_child(), per_model.first_run_in_child()]
            wide.say_one_thread()
        return f"{firsts} {gpu.first_run_in_child()} | {said.getvalue()}"

    firsts, said = _in_child(loaded_in_the_child).split(" | ")
    assert firsts == "[True, False, False] False"
    assert "torch backend: this process was forked after its parent had loaded a model" in said
    assert "runs on one thread here (load the model in each worker and none before the fork" in said
    assert "in memory" not in said  # a model the child loaded itself is freed as usual


def test_a_fork_waits_for_the_other_threads_to_sleep_and_says_when_they_would_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pool's worker holds its locks only while it runs: forked then, the child would find a lock
    held by a thread it does not have. A thread hashing (without the GIL) stands in for a busy worker."""
    from btdeploy import forks

    busy = threading.Event()

    def work() -> None:
        busy.set()
        hashlib.sha512(bytes(512 << 20))  # 0.7 s of one core here, the GIL released (zero pages: no memory)

    worker = threading.Thread(target=work)
    worker.start()
    busy.wait()
    assert (forks.running_threads_besides_this_one() or 0) >= 1
    assert not forks.wait_for_sleeping_threads(limit_s=0.05)
    monkeypatch.setattr(forks, "_POOLS_STARTED", {"a pool": os.getpid()})  # as loading a CPU model records
    monkeypatch.setattr(forks, "SETTLE_LIMIT_S", 0.05)
    monkeypatch.setattr(forks, "_NOTICES_SAID", set())
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        assert _in_child(lambda: "forked") == "forked"  # the fork goes ahead after the limit, once told
    assert "this process forks while some of its threads still run after 0.05 s of waiting" in said.getvalue()
    assert "fork while no model runs, or start the workers with spawn" in said.getvalue()
    worker.join()
    assert forks.wait_for_sleeping_threads(limit_s=5)


def test_a_lock_held_by_another_thread_at_the_fork_is_free_in_the_child() -> None:
    """serial_imports' lock, held while another thread imports transformers, would stay held in the child."""
    from btdeploy import imports

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with imports.serial_imports():
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        assert _in_child(lambda: str(imports._LOCK.acquire(timeout=2))) == "True"
    finally:
        release.set()
        holder.join()
