"""Which ONNX operators TensorRT's parser takes, one list per TensorRT line (10.3, 10.14 and 11.x),
each with its source, and a check of a graph against the line it targets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import onnx

from btdeploy.artifacts.graph_names import Flavour


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


# The TensorRT line whose parser each flavour's graphs target, newest first: `build` takes the
# first one the installed TensorRT can parse (11.x parses what 10.14 does: the same list).
FLAVOUR_LINES = {Flavour.TRT: "10.14", Flavour.TRT_COMPAT: "10.3"}


def line_table(line: str) -> dict[str, Any]:
    lines = support_table()["lines"]
    if line not in lines:
        raise KeyError(f"no operator list for TensorRT {line}: the lists are {', '.join(lines)}")
    return dict(lines[line])


def check_tensorrt_ops(model: onnx.ModelProto, line: str = "10.14") -> OpCheck:
    """Every node must be a standard ONNX operator in the list of the TensorRT line the graph
    targets (no com.microsoft ops), and the default-domain opset within that parser's range."""
    table = line_table(line)
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
