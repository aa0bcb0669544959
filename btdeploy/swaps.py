"""Attributes of other libraries' modules and classes swapped for the duration of one call.

The export puts btdeploy's canonical forms in transformers' BridgeTower classes (export/patches.py);
the quantize steps put btdeploy's streamed reads and weightless copies where Model Optimizer and
ONNX Runtime's quantizers read and write whole models (quantize/fp16.py, int8_dynamic.py,
modelopt_env.py). Every such swap goes through `replaced`, so each is undone on every way out,
an error or Ctrl-C included, and in one order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
