"""Atomic writes and hashes: an artifact is either complete under its final name or absent."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from btdeploy.errors import BtDeployError


def default_mode(directory: bool) -> int:
    """The mode a plain open()/mkdir() would give under the current umask (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename it into place."""
    if path.is_dir():  # the rename would fail with the temporary file's name in the message
        raise BtDeployError(f"{path} is a folder: give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its parents that exists: where a folder not yet made would go
    (whose disk has the free space, whose permissions decide)."""
    return next(p for p in (path, *path.absolute().parents) if p.exists())


@contextmanager
def staged_directory(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on failure it is removed.
    With `keep_existing` (a folder whose content is fixed by its name, which another process may
    have written meanwhile), a `final` already there is kept and the staged copy dropped: replacing
    it would pull the files from under a process reading them.

    A folder rather than a file, because an ONNX model past 2 GB is several files
    (model + external data) that must appear together.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(staging, default_mode(directory=True))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_existing:
        try:
            os.rename(staging, final)  # fails where another process put `final` first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not final.is_dir():
                raise
        return
    retired = None
    if final.exists():
        retired = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, retired)
    os.replace(staging, final)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def sha256_of(path: Path, *more: Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, or of several files' bytes one after the other."""
    digest = hashlib.sha256()
    for part in (path, *more):
        with open(part, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def sha256_of_json(data: Any) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file under a folder, by relative name."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): sha256_of(p) for p in files}


def folder_sha256(folder: Path, hashes: dict[str, str] | None = None) -> str:
    """One hash of every file under a folder, by relative name and content (a checkpoint's identity)."""
    return sha256_of_json(file_hashes(folder) if hashes is None else hashes)
