"""Calibration rows as the quantizers read them: in order, a few at a time.

Rows held in memory (`ArrayRows`) or made from other rows a chunk at a time (`DerivedRows`: the
fusion graph's inputs, the text and image states of the towers, several times the size of the
pixels), so that a split head's calibration holds one chunk of states, not every row's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


class DerivedRows:
    """`make` applied to `source`'s rows, `chunk` rows at a time; the last chunk made is kept, so
    reading the rows in order makes each chunk once."""

    def __init__(self, source: CalibrationRows, make: Callable[[Feeds], Feeds], chunk: int) -> None:
        self.source, self.make, self.chunk = source, make, chunk
        self._start, self._stop = 0, 0
        self._made: Feeds = {}

    def __len__(self) -> int:
        return len(self.source)

    def take(self, start: int, stop: int) -> Feeds:
        if not self._start <= start < stop <= self._stop:
            end = min(len(self), max(stop, start + self.chunk))
            self._made, self._start, self._stop = self.make(self.source.take(start, end)), start, end
        return {name: values[start - self._start : stop - self._start] for name, values in self._made.items()}
