"""What every pass shares: its declaration (the flavours it serves), its result, and the helpers
to read constants and bias Adds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph, attribute

MS_DOMAIN = "com.microsoft"


@dataclass
class PassResult:
    name: str
    fused: int = 0  # patterns rewritten (or, for trt, verified in TensorRT's fusable form)
    details: dict[str, int] = field(default_factory=dict)  # per kind, e.g. self/cross attention
    nodes_before: int = 0
    nodes_after: int = 0
    unmatched: list[str] = field(default_factory=list)  # why each candidate that was not rewritten did not match


@dataclass(frozen=True)
class GraphPass:
    """One graph pass: a rewrite per flavour it serves. A flavour it does not declare is an error,
    never an implicit default."""

    name: str
    rewrites: dict[Flavour, Callable[[Graph], PassResult]]

    def run(self, graph: Graph, flavour: Flavour) -> PassResult:
        rewrite = self.rewrites.get(flavour)
        if rewrite is None:
            served = ", ".join(str(f) for f in self.rewrites)
            raise ValueError(f"the {self.name} pass serves flavours {served}, not {flavour}: declare a rewrite for it")
        before = len(graph.graph.node)
        result = rewrite(graph)
        result.nodes_before, result.nodes_after = before, len(graph.graph.node)
        return result

    @classmethod
    def every_flavour(cls, name: str, rewrite: Callable[[Graph], PassResult]) -> GraphPass:
        """A pass whose rewrite is the same in every flavour (standard operators only)."""
        return cls(name, dict.fromkeys(Flavour, rewrite))


def split_bias_add(graph: Graph, name: str) -> tuple[onnx.NodeProto, str, np.ndarray] | None:
    """If `name` is Add(activation, constant 1-D bias), return (the Add, the activation, the bias)."""
    node = graph.producer.get(name)
    if node is None or node.op_type != "Add":
        return None
    for index in (0, 1):
        value = graph.constant(node.input[index])
        if value is not None and value.ndim == 1:
            return node, node.input[1 - index], value
    return None


def bias_after(graph: Graph, matmul: onnx.NodeProto, columns: int) -> tuple[onnx.NodeProto, str] | None:
    """The Add(MatMul, 1-D bias of the output's width) that is the MatMul's only reader, if any."""
    add = graph.only_consumer(matmul.output[0])
    if add is None or add.op_type != "Add":
        return None
    found = split_bias_add(graph, add.output[0])
    if found is None or found[1] != matmul.output[0] or found[2].shape != (columns,):
        return None
    bias = next(name for name in add.input if name != matmul.output[0])
    return add, bias


def scalar_constant(graph: Graph, name: str) -> float | None:
    """The value of a one-element numeric constant, else None."""
    value = graph.constant(name)
    if value is None or value.size != 1 or value.dtype.kind not in "fiu":
        return None
    return float(value.reshape(()))


def scalar_operand(graph: Graph, node: onnx.NodeProto) -> tuple[float, str] | None:
    """For a binary node with one scalar constant operand: (that scalar, the other input)."""
    for index in (0, 1):
        value = scalar_constant(graph, node.input[index])
        if value is not None:
            return value, node.input[1 - index]
    return None


# Operators whose output row r (axis 1) reads only row r of an input (see row_wise).
# The element-wise ones include every activation a config's hidden_act exports as (Clip for
# relu6 and gelu_10, Softplus for mish, LeakyRelu): one missing stopped the [CLS]-only rows.
ROW_WISE = {
    *("LayerNormalization", "MatMul", "Add", "Mul", "Sub", "Div", "Pow", "Neg", "Max", "Min"),
    *("Erf", "Sigmoid", "Tanh", "Relu", "Gelu", "Clip", "LeakyRelu", "Softplus", "Exp", "Log", "Abs"),
    *("Sqrt", "Reciprocal", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Softsign", "Cast"),
}


def row_wise(graph: Graph, node: onnx.NodeProto, tensor: str) -> bool:
    """Row r of the output depends only on row r of `tensor` (for this input position)."""
    if node.op_type not in ROW_WISE:
        return False
    if node.op_type == "LayerNormalization":
        return attribute(node, "axis", -1) == -1 and node.input[0] == tensor
    if node.op_type == "MatMul":
        weight = graph.constant(node.input[1])
        return node.input[0] == tensor and weight is not None and weight.ndim == 2
    for name in node.input:
        value = graph.constant(name)
        if value is not None and value.ndim >= 2 and value.shape[-2] != 1:
            return False  # a constant with a row axis would need slicing too
    return True
