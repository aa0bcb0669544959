"""Calibration rows as the quantizers read them: in order, a few at a time.

Rows held in memory (`ArrayRows`), or made from other rows a chunk at a time and spooled to files
(`SpooledRows`: the fusion graph's inputs, the towers' text and image states, several times the
size of the pixels), so that a split head's calibration holds one chunk of states, and the towers
that make them are gone before the calibration session opens.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

Feeds = dict[str, np.ndarray]


class CalibrationRows(Protocol):
    def __len__(self) -> int: ...

    def take(self, start: int, stop: int) -> Feeds:
        """Rows start..stop-1 of every input, each array [stop - start, ...]."""
        ...


@dataclass(frozen=True)
class ArrayRows:
    arrays: Feeds

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    def take(self, start: int, stop: int) -> Feeds:
        return {name: values[start:stop] for name, values in self.arrays.items()}


class SpooledRows:
    """`make` applied to `source`'s rows `chunk` at a time, each chunk written to a file in a
    temporary folder under `beside` when the rows are first asked for (so nothing is made for a
    graph that is not calibrated); `make` is then dropped with whatever it holds. Reading holds
    one chunk. `close()` removes the files."""

    def __init__(self, source: CalibrationRows, make: Callable[[Feeds], Feeds], chunk: int, beside: Path) -> None:
        self.source, self.chunk, self.beside = source, chunk, beside
        self._make: Callable[[Feeds], Feeds] | None = make
        self._folder: Path | None = None
        self._index = -1
        self._loaded: Feeds = {}

    def __len__(self) -> int:
        return len(self.source)  # known without making the rows: a progress line asks before any are read

    def take(self, start: int, stop: int) -> Feeds:
        self._spool()
        parts = []
        for index in range(start // self.chunk, (stop - 1) // self.chunk + 1):
            first = index * self.chunk
            rows = self._chunk(index)
            parts.append({name: values[max(start, first) - first : stop - first] for name, values in rows.items()})
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._folder, self._make, self._loaded = None, None, {}

    def _spool(self) -> None:
        if self._make is None:
            return
        # A `.partial` name: a step killed midway leaves it for the next step on the head to remove.
        self._folder = Path(tempfile.mkdtemp(prefix=".calibration-rows.", suffix=".partial", dir=self.beside))
        for index, start in enumerate(range(0, len(self.source), self.chunk)):
            made = self._make(self.source.take(start, start + self.chunk))
            np.savez(self._folder / f"{index}.npz", **made)  # type: ignore[arg-type]
        self._make = None  # and with it the towers that made the rows

    def _chunk(self, index: int) -> Feeds:
        if index != self._index:
            assert self._folder is not None
            with np.load(self._folder / f"{index}.npz") as stored:
                self._index, self._loaded = index, {name: stored[name] for name in stored.files}
        return self._loaded
