"""The one interface every backend implements: numpy feeds in, numpy outputs out, by name."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str  # "onnxruntime", "torch", ...
    description: str  # what exactly runs: file, providers, device

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Feeds are validated and in the graph's dtypes; returns every declared output.

        Callable from several threads at once, as a torch model is: a backend that runs through one
        request or execution context of its own serializes its runs."""
        ...


def torch_feed(array: np.ndarray) -> np.ndarray:
    """The array as torch.from_numpy takes it without a warning: contiguous, and writable (a
    read-only one, from np.frombuffer or a memory map, is copied; torch warned of undefined
    behaviour on it, though no backend writes to its inputs)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()
