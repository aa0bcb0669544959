"""One step at a time per head folder, and no leftovers from a step that was killed.

Steps that write a head's graphs and manifest (export, optimize, quantize, build) hold an
exclusive lock on `.<head>.lock` beside the head folder. The lock is the kernel's (flock), so
a killed step releases it; its temporary files are removed by the next step that takes it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from btdeploy.errors import BtDeployError

# Head folders whose lock this process holds: a step reading its own sources is not "another step".
_HELD: set[Path] = set()


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def head_lock(folder: Path, step: str) -> Iterator[None]:
    """Hold the head folder's lock for one step; another step holding it is a clear error."""
    folder = Path(folder)
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held for the whole step)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BtDeployError(
                f"{folder} is being written by another btdeploy step ({holder}): wait for it to finish, then run "
                f"{step} again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{step}, pid {os.getpid()}")
        handle.flush()
        remove_leftovers(folder)
        _HELD.add(folder.resolve())
        try:
            yield
        finally:
            _HELD.discard(folder.resolve())  # only by the step that added it, not by a refused one
    finally:
        handle.close()  # releases the lock


def writer_of(folder: Path) -> str | None:
    """The step writing the head folder now (as its lock names it), or None. Readers take no lock;
    they ask this when a graph is not what the manifest records, since a step swaps its graphs in
    before it records them."""
    path = lock_path(Path(folder))
    if not path.is_file() or Path(folder).resolve() in _HELD:
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
    return None  # closing the file released the shared lock


def remove_leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders of steps that were killed: `.<name>.*.partial`, `.<name>.*.tmp`,
    and the staging folders of an export. Only called under the lock, so none is in use."""
    removed: list[Path] = []
    candidates = list(folder.glob(".*.partial")) + list(folder.glob(".*.tmp")) if folder.is_dir() else []
    candidates += list(folder.parent.glob(f".{folder.name}.*.partial")) + list(
        folder.parent.glob(f".{folder.name}.old-*")
    )
    for path in candidates:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
