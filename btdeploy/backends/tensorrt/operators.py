"""Which ONNX operators TensorRT's parser takes (10.14 through 11.x), and a check of a graph against it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import onnx


@cache
def support_table() -> dict[str, Any]:
    return json.loads(resources.files("btdeploy").joinpath("data/tensorrt_onnx_ops.json").read_text())


@dataclass
class OpCheck:
    unsupported: list[str]  # "domain::op (count)"
    opset: int

    @property
    def passed(self) -> bool:
        return not self.unsupported


def check_tensorrt_ops(model: onnx.ModelProto) -> OpCheck:
    """Every node must be a standard ONNX operator in TensorRT's list (no com.microsoft ops),
    and the default-domain opset within the parser's range."""
    table = support_table()
    supported = set(table["operators"])
    bad: dict[str, int] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx") or node.op_type not in supported:
            key = f"{domain + '::' if domain else ''}{node.op_type}"
            bad[key] = bad.get(key, 0) + 1
    opset = next((o.version for o in model.opset_import if (o.domain or "") in ("", "ai.onnx")), 0)
    low, high = table["opset_range"]
    problems = [f"{name} ({count})" for name, count in sorted(bad.items())]
    if not low <= opset <= high:
        problems.append(f"opset {opset} outside {low}..{high}")
    return OpCheck(problems, opset)
