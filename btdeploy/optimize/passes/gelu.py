"""GELU and QuickGELU, with the preceding dense layer's bias folded in (ort flavour).

GELU exports as x * (1 + Erf(x / sqrt 2)) * 0.5. QuickGELU (CLIP's) as x * Sigmoid(1.702 x).
- ort: com.microsoft.BiasGelu(MatMul output, bias) where x = MatMul + bias, else Gelu;
  com.microsoft.QuickGelu(alpha) for QuickGELU.
- trt: ONNX Gelu (opset 20) for the Erf chain; QuickGELU stays Sigmoid * x, which TensorRT
  fuses as a pointwise block on its own.
- trt-compat: both stay as they are (counted only).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import MS_DOMAIN, GraphPass, PassResult, scalar_operand, split_bias_add


def _user(graph: Graph, name: str, op_type: str) -> onnx.NodeProto | None:
    node = graph.only_consumer(name)
    return node if node is not None and node.op_type == op_type else None


def _match_gelu(graph: Graph, erf: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto], str] | None:
    div = graph.parent(erf, 0, "Div")
    divisor = graph.constant(div.input[1]) if div is not None else None
    if div is None or divisor is None or divisor.size != 1:
        return None
    if not math.isclose(float(divisor.reshape(-1)[0]), math.sqrt(2), rel_tol=1e-4):
        return None
    x = div.input[0]
    plus_one = _user(graph, erf.output[0], "Add")
    times_x = _user(graph, plus_one.output[0], "Mul") if plus_one else None
    half = _user(graph, times_x.output[0], "Mul") if times_x else None
    if half is None or times_x is None or x not in times_x.input:
        return None
    one, half_value = scalar_operand(graph, plus_one), scalar_operand(graph, half)  # type: ignore[arg-type]
    if one is None or half_value is None or one[0] != 1.0 or half_value[0] != 0.5:
        return None
    return x, [div, erf, plus_one, times_x, half], half.output[0]  # type: ignore[list-item]


def _match_quick_gelu(graph: Graph, sigmoid: onnx.NodeProto) -> tuple[str, float, list[onnx.NodeProto], str] | None:
    scaled = graph.parent(sigmoid, 0, "Mul")
    if scaled is None:
        return None
    operand = scalar_operand(graph, scaled)
    gate = _user(graph, sigmoid.output[0], "Mul")
    if operand is None or gate is None or operand[1] not in gate.input:
        return None
    return operand[1], operand[0], [scaled, sigmoid, gate], gate.output[0]


def _gelus(graph: Graph) -> Iterator[tuple[str, list[onnx.NodeProto], str]]:
    """Each exported GELU (the Erf chain) once, while the caller rewrites it."""
    for erf in graph.each_once(lambda n: n.op_type == "Erf"):
        found = _match_gelu(graph, erf)
        if found is not None:
            yield found


def _quick_gelus(graph: Graph) -> Iterator[tuple[str, float, list[onnx.NodeProto], str]]:
    """Each exported QuickGELU (x * Sigmoid(alpha x)) once, while the caller rewrites it."""
    for sigmoid in graph.each_once(lambda n: n.op_type == "Sigmoid"):
        found = _match_quick_gelu(graph, sigmoid)
        if found is not None:
            yield found


# The GELU operators a fused graph holds (ONNX Gelu in trt, ONNX Runtime's in ort): input 0 is the activation.
FUSED_GELUS = {("Gelu", ""), ("Gelu", MS_DOMAIN), ("BiasGelu", MS_DOMAIN), ("QuickGelu", MS_DOMAIN)}


def every_gelu(graph: Graph) -> list[tuple[str, list[onnx.NodeProto], str]]:
    """Each GELU and QuickGELU of any flavour's graph, fused or as exported: (input, nodes, output).

    For BiasGelu the input is the activation before its bias.
    """
    found = list(_gelus(graph))
    found += [(n.input[0], [n], n.output[0]) for n in graph.graph.node if (n.op_type, n.domain or "") in FUSED_GELUS]
    found += [(x, nodes, output) for x, _, nodes, output in _quick_gelus(graph)]
    return found


def _fuse_trt(graph: Graph) -> PassResult:
    """The Erf chain becomes ONNX Gelu (opset 20); QuickGELU stays Sigmoid * x."""
    result = PassResult("GELU/QuickGELU + bias")
    details = {"gelu": 0, "quick_gelu": 0, "bias_folded": 0}
    for x, nodes, output in _gelus(graph):
        graph.replace(nodes, [graph.make_node("Gelu", [x], [output], name="Gelu")])
        graph.set_opset("", 20)
        details["gelu"] += 1
    result.fused, result.details = details["gelu"], details
    return result


def _fuse_ort(graph: Graph) -> PassResult:
    """com.microsoft.BiasGelu (bias folded) or Gelu, and com.microsoft.QuickGelu."""
    result = PassResult("GELU/QuickGELU + bias")
    details = {"gelu": 0, "quick_gelu": 0, "bias_folded": 0}
    for x, nodes, output in _gelus(graph):
        split = split_bias_add(graph, x)
        users = graph.consumers.get(x, [])
        if split is not None and all(u in nodes for u in users):
            add, activation, bias = split
            name = graph.add_initializer("gelu_bias", bias.astype("float32"))
            fused = graph.make_node("BiasGelu", [activation, name], [output], name="BiasGelu", domain=MS_DOMAIN)
            graph.replace([*nodes, add], [fused])
            details["bias_folded"] += 1
        else:
            graph.replace(nodes, [graph.make_node("Gelu", [x], [output], name="Gelu", domain=MS_DOMAIN)])
        details["gelu"] += 1
    for x, alpha, nodes, output in _quick_gelus(graph):
        fused = graph.make_node("QuickGelu", [x], [output], name="QuickGelu", domain=MS_DOMAIN, alpha=alpha)
        graph.replace(nodes, [fused])
        details["quick_gelu"] += 1
    graph.set_opset(MS_DOMAIN, 1)
    result.fused = details["gelu"] + details["quick_gelu"]
    result.details = details
    return result


def _count_compat(graph: Graph) -> PassResult:
    """trt-compat: the Erf chain stays (TensorRT fuses it as a pointwise block; the ONNX Gelu
    operator needs opset 20, which not every parser this flavour serves takes); counted only."""
    result = PassResult("GELU/QuickGELU + bias")
    result.details = {"gelu": sum(_match_gelu(graph, n) is not None for n in graph.graph.node if n.op_type == "Erf")}
    result.details.update(quick_gelu=0, bias_folded=0)
    return result


GELU = GraphPass("gelu", {Flavour.ORT: _fuse_ort, Flavour.TRT: _fuse_trt, Flavour.TRT_COMPAT: _count_compat})
