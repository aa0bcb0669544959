"""Attributes of the quantizers' own modules swapped for one conversion and put back after it.

Model Optimizer and ONNX Runtime's quantizers read and write whole models at fixed points; the
quantize steps put btdeploy's streamed reads and weightless copies at those points for the duration
of one call (fp16, int8_dynamic, modelopt_env). Every swap goes through `replaced`, so each is
undone on every way out, an error or Ctrl-C included, and in one order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import onnx

_ABSENT = object()


@contextmanager
def replaced(*swaps: tuple[Any, str, Any]) -> Iterator[None]:
    """Each (owner, attribute, replacement) in place while the block runs. Afterwards every owner
    holds what it held before: its own value, or none where it only inherited the attribute from
    a base class (so the base class's stays the one it sees)."""
    originals = [(owner, name, vars(owner).get(name, _ABSENT)) for owner, name, _ in swaps]
    try:
        for owner, name, replacement in swaps:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in reversed(originals):
            if original is _ABSENT:
                if name in vars(owner):
                    delattr(owner, name)
            else:
                setattr(owner, name, original)


class OnnxModuleSeenBy:
    """The onnx module as one quantizer module sees it while a subclass stands in for it:
    what the subclass defines is its own, everything else is onnx's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(onnx, name)
