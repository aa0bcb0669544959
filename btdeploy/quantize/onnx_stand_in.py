"""The onnx module as one quantizer module sees it while btdeploy stands in for it (swapped by
btdeploy/swaps.py for one conversion): AutoCast's read of its source (fp16) and ONNX Runtime's
save of its result (int8_dynamic)."""

from __future__ import annotations

from typing import Any

import onnx


class OnnxModuleSeenBy:
    """What a subclass defines is its own, everything else is onnx's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(onnx, name)
