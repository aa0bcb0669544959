"""Models loaded before a fork: what a forked child (gunicorn --preload, multiprocessing's fork start
method) can still do with the model it inherited.

A child inherits the engine's memory but none of its threads. What that means, measured with base
itm on a 2-core machine (`tests/runtime/test_runtime.py` holds the tiny model to it):

- ONNX Runtime and OpenVINO run the inherited model on the calling thread alone (2 x 40: 1.48 s
  against the parent's 0.80 s, 1.43 against 0.73). A model loaded in the child runs on both cores
  with ONNX Runtime (0.78 s); with OpenVINO it too runs on one (1.38 s) once the parent had compiled
  any model (0.67 s where the parent had only imported openvino): TBB's pool is the process's.
- Freeing the inherited model never returns: ONNX Runtime's session waits in
  `pthread_cond_destroy` for the parent's workers, OpenVINO's compiled model spins on a core in
  TBB's observer list. A worker that ends normally frees it at exit, so it hung on its way out
  (tiny itm, whether or not the parent had run it). So such a backend is held for the life of
  every child (`LoadedProcess(..., kept=True)`): never freed there.
- torch's OpenMP pool hangs a child that runs on more than one thread, the inherited model and one
  loaded in the child alike (tiny itm, the parent having run on two threads): the torch backend
  drops to one thread in a child of a process that had loaded a torch model.
- A model freed in the child that loaded it ends as usual (tiny itm, ONNX Runtime and OpenVINO).
- A fork while a pool's worker holds one of the pool's locks leaves that lock held in the child for
  good, and the child's run waits on it forever: ONNX Runtime in `pthread_mutex_lock` (tiny itm,
  forked right after a run: 6 of 200 children), OpenVINO in `tbb::spawn` (3 in 12,300). The workers
  run for about 0.1 ms (ONNX Runtime) and 1 ms (TBB) after a run ends, on their way to sleep, and
  sleep without the pool's locks. So before each fork a process that has started a CPU pool waits
  until its other threads sleep (`wait_for_sleeping_threads`): 0 of 1000 and 0 of 6000 hung
  (benchmarks/fork_stress.py; benchmarks/results/forked-workers/).
- A CUDA context does not survive a fork at all: a GPU model in a child is refused with the way out.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.progress import say

# Backends every child holds for good -> what to renew in the child (see LoadedProcess's `kept`).
_KEPT: weakref.WeakKeyDictionary[Any, Callable[[Any], None] | None] = weakref.WeakKeyDictionary()
_NOTICES_SAID: set[str] = set()  # what this process said once: a pool's one-thread notice, the busy fork's
_POOLS_STARTED: dict[str, int] = {}  # a CPU pool -> the process a model of it was first loaded in
# How long a fork waits for the process's other threads to sleep: far above a pool's settling
# (1 ms), short enough not to hold up a server that forks while a thread of its own keeps working.
SETTLE_LIMIT_S = 0.5
_BUSY_FORK = "a fork while threads run"  # its notice's key in _NOTICES_SAID


def running_threads_besides_this_one() -> int | None:
    """How many of this process's other threads the kernel has running or ready to run (state R), or
    None where /proc cannot say (not Linux)."""
    me = threading.get_native_id()
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    running = 0
    for thread in threads:
        if int(thread) == me:
            continue
        try:
            with open(f"/proc/self/task/{thread}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # the name in brackets may hold spaces
        except OSError:
            continue  # it ended meanwhile
        running += fields[0] == b"R"
    return running


def wait_for_sleeping_threads(limit_s: float) -> bool:
    """Wait until every other thread of this process sleeps, seen twice in a row, for at most
    `limit_s`. A pool's worker holds its locks only while it runs, so a fork made then leaves
    none of them held in the child. False where they were still running at the limit."""
    deadline = time.monotonic() + limit_s
    calm = 0
    while calm < 2:
        running = running_threads_besides_this_one()
        if running is None:
            return True  # nothing to look at: fork as Python would
        calm = calm + 1 if running == 0 else 0
        if calm < 2:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
    return True


def _before_fork() -> None:
    if not _POOLS_STARTED or wait_for_sleeping_threads(SETTLE_LIMIT_S):
        return
    if _BUSY_FORK not in _NOTICES_SAID:
        _NOTICES_SAID.add(_BUSY_FORK)
        say(
            f"btdeploy: this process forks while some of its threads still run after {SETTLE_LIMIT_S} s "
            "of waiting: a thread-pool lock one of them holds stays locked in the child, whose runs could "
            "hang there; fork while no model runs, or start the workers with spawn"
        )


def _after_fork_in_child() -> None:
    _NOTICES_SAID.clear()
    for backend, renew in list(_KEPT.items()):
        # One reference this process never gives back: no collection, not even at exit, frees it.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(backend))
        if renew is not None:
            renew(backend)


# os.register_at_fork calls the before-hooks in reverse order of registration: this one, registered
# on btdeploy's import, runs after those registered later, nearest the fork.
os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


class LoadedProcess:
    """The process `backend` was loaded in, and what its run in another one (a forked child) does.

    `pool` names the engine's threads in the notice ("ONNX Runtime's thread pool"); a model
    `on_gpu` is refused in a child. `kept`: every child forked from now on holds the backend for
    its whole life (its native pool's destructor never returns there), which the notice says;
    `renew(backend)` runs in the child right after the fork to replace what a parent's thread may
    have held at that moment (a lock). `process_wide`: the pool is the process's, not the model's
    (OpenVINO's TBB, torch's OpenMP), so a model loaded in a child whose parent had loaded one runs
    on one thread too (torch's had hung there), and the notice's remedy says to load none before
    the fork."""

    def __init__(
        self,
        backend: Any,
        pool: str,
        on_gpu: bool = False,
        kept: bool = False,
        renew: Callable[[Any], None] | None = None,
        process_wide: bool = False,
    ) -> None:
        self.loaded_pid = os.getpid()
        self.checked_in: int | None = None  # the process whose first run was looked at
        self.backend_name, self.pool, self.on_gpu, self.kept = backend.name, pool, on_gpu, kept
        self.process_wide = process_wide and not on_gpu
        if kept:
            _KEPT[backend] = renew
        if not on_gpu:  # loading may start the pool already (OpenVINO's compile does)
            _POOLS_STARTED.setdefault(pool, self.loaded_pid)

    def first_run_in_child(self) -> bool:
        """True once per process, on the first run in a child that inherited this model or, for a
        process-wide pool, the pool a parent's model started. Raises for a model
        loaded on a GPU before the fork, whose CUDA context the child does not have."""
        here = os.getpid()
        if self.checked_in == here:
            return False
        if self.on_gpu and self.loaded_pid != here:
            raise BtDeployError(
                f"{self.backend_name} backend: this process was forked after the model was loaded on a GPU, "
                "and a CUDA context does not survive fork: load the model in each worker, or start the "
                "workers with spawn"
            )
        self.checked_in = here
        # A child inherits the record of the process that started the pool, so it reads another pid.
        return self.loaded_pid != here or (self.process_wide and _POOLS_STARTED[self.pool] != here)

    def say_one_thread(self) -> None:
        """The child's notice, once per pool and process (split towers hold three models)."""
        if self.pool in _NOTICES_SAID:
            return
        _NOTICES_SAID.add(self.pool)
        inherited = self.loaded_pid != os.getpid()
        what = "the model was loaded" if inherited else "its parent had loaded a model"
        kept = ", and stays in memory until the process ends" if self.kept and inherited else ""
        where = " and none before the fork" if self.process_wide else ""
        say(
            f"{self.backend_name} backend: this process was forked after {what}, and {self.pool} does not "
            f"survive fork: it runs on one thread here{kept} (load the model in each worker{where}, or start "
            "them with spawn, for every core)"
        )
