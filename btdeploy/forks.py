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
- A CUDA context does not survive a fork at all: a GPU model in a child is refused with the way out.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable
from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.progress import say

# Backends every child holds for good -> what to renew in the child (see LoadedProcess's `kept`).
_KEPT: weakref.WeakKeyDictionary[Any, Callable[[Any], None] | None] = weakref.WeakKeyDictionary()
_NOTICES_SAID: set[str] = set()  # pools whose one-thread notice this process printed
_POOLS_STARTED: dict[str, int] = {}  # a process-wide pool -> the process a model of it was first loaded in


def _after_fork_in_child() -> None:
    _NOTICES_SAID.clear()
    for backend, renew in list(_KEPT.items()):
        # One reference this process never gives back: no collection, not even at exit, frees it.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(backend))
        if renew is not None:
            renew(backend)


os.register_at_fork(after_in_child=_after_fork_in_child)


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
        if self.process_wide:  # loading may start the pool already (OpenVINO's compile does)
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
