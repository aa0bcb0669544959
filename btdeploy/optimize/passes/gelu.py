"""GELU, its tanh approximation and QuickGELU, found by what they compute, with the preceding
dense layer's bias folded in (ort flavour).

A GELU exports as element-wise operators arranged as the model's code wrote it:
x * (1 + Erf(x / sqrt 2)) * 0.5 (`gelu`), x * 0.5 * (1 + Erf(...)) (`gelu_python`),
0.5 x (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3))) with Pow or with x * x * x (`gelu_new`,
`gelu_pytorch_tanh`, `gelu_fast`), x * Sigmoid(1.702 x) (CLIP's QuickGELU), or as one ONNX Gelu
(exports at opset 20). Matching one arrangement missed the others, so the pass takes the
element-wise island around each Erf, Tanh and Sigmoid (scalar constants only), evaluates it on a
range of inputs and names the function it computes; anything else (a pooler's Tanh) stays.

- ort: GELU -> com.microsoft.BiasGelu (bias folded) or Gelu; tanh GELU -> com.microsoft.FastGelu
  (bias as its second input); x * Sigmoid(a x) -> com.microsoft.QuickGelu(alpha=a).
- trt: ONNX Gelu (opset 20), approximate="tanh" for the tanh form; QuickGELU stays Sigmoid * x,
  which TensorRT fuses as a pointwise block on its own.
- trt-compat: every form stays as exported (counted only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph, attribute
from btdeploy.optimize.passes.base import MS_DOMAIN, GraphPass, PassResult, scalar_constant, split_bias_add

GELU_KINDS = ("gelu", "gelu_tanh", "quick_gelu")

_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Erf": np.vectorize(math.erf),
    "Tanh": np.tanh,
    "Sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "Neg": np.negative,
}
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Pow": np.power,
}
_ANCHORS = {"Erf", "Tanh", "Sigmoid"}  # every GELU form holds exactly one
_MAX_NODES = 16  # the longest form, tanh GELU with x * x * x, is 9 nodes

# Inputs the island is evaluated on: where the erf and tanh forms differ most (|x| near 2, by up
# to 4.7e-4) and where they saturate.
_PROBE = np.linspace(-6.0, 6.0, 241)


def _reference(kind: str, x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    if kind == "gelu":
        return 0.5 * x * (1.0 + _UNARY["Erf"](x / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return x / (1.0 + np.exp(-alpha * x))


# The two GELU forms on `_PROBE`, once: every node of every island is held to them.
_FIXED_FORMS = {kind: _reference(kind, _PROBE) for kind in ("gelu", "gelu_tanh")}


def _matches(values: np.ndarray, reference: np.ndarray) -> bool:
    # Constants stored in float32 move the result by about 1e-7; the erf and tanh forms differ by 4.7e-4.
    return bool(np.all(np.isfinite(values))) and bool(np.allclose(values, reference, rtol=1e-5, atol=1e-6))


def _classify(values: np.ndarray) -> tuple[str, float] | None:
    """The GELU form these outputs on `_PROBE` are, with QuickGELU's alpha; None for anything else."""
    for kind, reference in _FIXED_FORMS.items():
        if _matches(values, reference):
            return kind, 1.0
    at_one = float(values[np.argmin(np.abs(_PROBE - 1.0))])  # sigmoid(alpha) for x * sigmoid(alpha x)
    if 0.0 < at_one < 1.0:
        alpha = math.log(at_one / (1.0 - at_one))
        if alpha > 0 and _matches(values, _reference("quick_gelu", _PROBE, alpha)):
            return "quick_gelu", alpha
    return None


@dataclass
class Activation:
    """One GELU in a graph: its input, the nodes that compute it, its output."""

    kind: str  # one of GELU_KINDS
    x: str
    nodes: list[onnx.NodeProto]
    output: str
    alpha: float = 1.0  # QuickGELU's


def _elementwise(graph: Graph, node: onnx.NodeProto) -> bool:
    """An operator the island may hold: element-wise, every constant input a scalar."""
    if node.op_type not in _UNARY and node.op_type not in _BINARY:
        return False
    constants = [graph.constant(name) for name in node.input]
    return all(value is None or value.size == 1 for value in constants) and len(node.output) == 1


def _sources(graph: Graph, anchor: onnx.NodeProto) -> list[str]:
    """The tensors `anchor` reads through element-wise nodes, nearest first: the candidates for x."""
    found: list[str] = []
    queue = [anchor.input[0]]
    while queue and len(found) < _MAX_NODES:
        name = queue.pop(0)
        if name in found or scalar_constant(graph, name) is not None:
            continue
        found.append(name)
        node = graph.producer.get(name)
        if node is not None and _elementwise(graph, node):
            queue.extend(node.input)
    return found


def _island(graph: Graph, x: str) -> list[onnx.NodeProto]:
    """The element-wise nodes computed from `x` and scalar constants alone, in order of evaluation."""
    inside, frontier = {x}, [x]
    nodes: list[onnx.NodeProto] = []
    taken: set[int] = set()
    while frontier and len(nodes) < _MAX_NODES:
        for user in graph.consumers.get(frontier.pop(0), []):
            ready = all(name in inside or scalar_constant(graph, name) is not None for name in user.input)
            if id(user) not in taken and _elementwise(graph, user) and ready:
                taken.add(id(user))
                nodes.append(user)
                inside.add(user.output[0])
                frontier.append(user.output[0])
    return nodes


def _cone(graph: Graph, nodes: list[onnx.NodeProto], output: str) -> list[onnx.NodeProto] | None:
    """The nodes of the island that `output` depends on, if nothing outside reads their results."""
    producer = {node.output[0]: node for node in nodes}
    wanted: set[int] = set()
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in wanted:
            wanted.add(id(node))
            stack.extend(node.input)
    cone = [node for node in nodes if id(node) in wanted]
    for node in cone:
        if node.output[0] == output:
            continue
        if node.output[0] in graph.output_names:
            return None
        if any(id(user) not in wanted for user in graph.consumers.get(node.output[0], [])):
            return None
    return cone


def _evaluate(graph: Graph, x: str, nodes: list[onnx.NodeProto]) -> Iterator[tuple[str, np.ndarray]]:
    """Each node's output on `_PROBE` as x, in order."""
    values = {x: _PROBE}
    with np.errstate(all="ignore"):
        for node in nodes:
            args = [values.get(name, np.full_like(_PROBE, scalar_constant(graph, name) or 0.0)) for name in node.input]
            if node.op_type in _UNARY:
                result = _UNARY[node.op_type](args[0])
            else:
                result = _BINARY[node.op_type](args[0], args[1])
            values[node.output[0]] = np.asarray(result, np.float64)
            yield node.output[0], values[node.output[0]]


def _at_anchor(graph: Graph, anchor: onnx.NodeProto) -> Activation | None:
    """The GELU that `anchor` is part of, if it is one."""
    for x in _sources(graph, anchor):
        nodes = _island(graph, x)
        for output, values in _evaluate(graph, x, nodes):
            found = _classify(values)
            cone = _cone(graph, nodes, output) if found is not None else None
            if found is not None and cone is not None and any(node is anchor for node in cone):
                return Activation(found[0], x, cone, output, found[1])
    return None


def _onnx_gelu(node: onnx.NodeProto) -> Activation:
    kind = "gelu_tanh" if attribute(node, "approximate", b"none") in (b"tanh", "tanh") else "gelu"
    return Activation(kind, node.input[0], [node], node.output[0])


def activations(graph: Graph) -> Iterator[Activation]:
    """Each GELU of the graph as exported (any arrangement, or ONNX Gelu) once, while the caller
    rewrites it (never one the caller made)."""
    present = {node.name for node in graph.graph.node}

    def wanted(node: onnx.NodeProto) -> bool:
        return node.name in present and (node.op_type in _ANCHORS or (node.op_type == "Gelu" and not node.domain))

    for node in graph.each_once(wanted):
        found = _onnx_gelu(node) if node.op_type == "Gelu" else _at_anchor(graph, node)
        if found is not None:
            yield found


# ONNX Runtime's fused GELUs (ort graphs): input 0 is the activation (before its bias, where it takes one).
FUSED_GELUS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}


def every_gelu(graph: Graph) -> list[tuple[str, list[onnx.NodeProto], str]]:
    """Each GELU of any flavour's graph, fused or as exported: (input, nodes, output)."""
    found = [(a.x, a.nodes, a.output) for a in activations(graph)]
    fused = [n for n in graph.graph.node if n.domain == MS_DOMAIN and n.op_type in FUSED_GELUS]
    return found + [(n.input[0], [n], n.output[0]) for n in fused]


def _counts() -> dict[str, int]:
    return {**dict.fromkeys(GELU_KINDS, 0), "bias_folded": 0}


def _fuse_trt(graph: Graph) -> PassResult:
    """Both GELU forms become ONNX Gelu (opset 20); QuickGELU stays Sigmoid * x."""
    details = _counts()
    for found in activations(graph):
        if found.kind == "quick_gelu":
            continue
        if found.nodes[0].op_type != "Gelu":
            attrs = {"approximate": "tanh"} if found.kind == "gelu_tanh" else {}
            graph.replace(found.nodes, [graph.make_node("Gelu", [found.x], [found.output], name="Gelu", **attrs)])
            graph.set_opset("", 20)
        details[found.kind] += 1
    return PassResult("GELU/QuickGELU + bias", fused=details["gelu"] + details["gelu_tanh"], details=details)


def _fuse_ort(graph: Graph) -> PassResult:
    """com.microsoft.BiasGelu / FastGelu (bias folded) or Gelu, and com.microsoft.QuickGelu."""
    details = _counts()
    for found in activations(graph):
        if found.kind == "quick_gelu":
            node = graph.make_node(
                "QuickGelu", [found.x], [found.output], name="QuickGelu", domain=MS_DOMAIN, alpha=found.alpha
            )
            graph.replace(found.nodes, [node])
            details["quick_gelu"] += 1
            continue
        with_bias, plain = ("FastGelu", "FastGelu") if found.kind == "gelu_tanh" else ("BiasGelu", "Gelu")
        split = split_bias_add(graph, found.x)
        users = graph.consumers.get(found.x, [])
        if split is not None and all(any(u is n for n in found.nodes) for u in users):
            add, activation, bias = split
            name = graph.add_initializer("gelu_bias", bias.astype("float32"))
            fused = graph.make_node(with_bias, [activation, name], [found.output], name=with_bias, domain=MS_DOMAIN)
            graph.replace([*found.nodes, add], [fused])
            details["bias_folded"] += 1
        else:
            fused = graph.make_node(plain, [found.x], [found.output], name=plain, domain=MS_DOMAIN)
            graph.replace(found.nodes, [fused])
        details[found.kind] += 1
    graph.set_opset(MS_DOMAIN, 1)
    return PassResult("GELU/QuickGELU + bias", fused=sum(details[k] for k in GELU_KINDS), details=details)


def _count_compat(graph: Graph) -> PassResult:
    """trt-compat: every form stays (TensorRT fuses the chains as pointwise blocks; the ONNX Gelu
    operator needs opset 20, which not every parser this flavour serves takes); counted only."""
    details = _counts()
    for found in activations(graph):
        if found.kind != "quick_gelu":
            details[found.kind] += 1
    return PassResult("GELU/QuickGELU + bias", details=details)


GELU = GraphPass("gelu", {Flavour.ORT: _fuse_ort, Flavour.TRT: _fuse_trt, Flavour.TRT_COMPAT: _count_compat})
