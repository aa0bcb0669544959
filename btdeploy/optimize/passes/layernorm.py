"""Add + LayerNormalization fusions: the bridge (link tower) layers and the residual post-LN.

Both are LayerNormalization(Add(a, b)) over the last axis. In the `ort` flavour they become
com.microsoft.SkipLayerNormalization(a, b, gamma, beta[, bias]): one kernel instead of two,
a dense layer's bias folded in, and, where the sum itself is used again (the vision tower's
pre-LN residual), the sum taken from SkipLayerNormalization's fourth output.
In the `trt` and `trt-compat` flavours the pair is already what TensorRT fuses (Add -> native LayerNormalization,
FP32); the pass checks that form and counts it, rewriting nothing. `split_skip_layernorm` writes a
SkipLayerNormalization back as its pair (the trt INT8 graphs' form in passes/quantized_layernorm.py).

The bridge layers are told apart from the residual ones by the exporter's module scope in
the node name (`..._link_tower.N/LayerNorm`), which the TorchScript exporter always writes.
"""

from __future__ import annotations

import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph import Graph, attribute
from btdeploy.optimize.passes.base import MS_DOMAIN, GraphPass, PassResult, split_bias_add

BRIDGE_SCOPE = "link_tower"


def _is_bridge(node: onnx.NodeProto) -> bool:
    return BRIDGE_SCOPE in node.name


def is_add_layernorm(graph: Graph, node: onnx.NodeProto, bridges: bool | None = None) -> bool:
    """LayerNormalization(Add(a, b)) over the last axis, in the bridge scope or outside it (None: either)."""
    if node.op_type != "LayerNormalization" or (bridges is not None and _is_bridge(node) != bridges):
        return False
    if attribute(node, "axis", -1) != -1 or len(node.input) < 3:
        return False
    add = graph.parent(node, 0, "Add")
    # A sum with a constant (token-type embedding) is not a skip connection.
    return add is not None and all(graph.constant(name) is None for name in add.input)


def fuse_add_layernorm(graph: Graph, layer_norm: onnx.NodeProto, fold_bias: bool = True) -> bool:
    """One com.microsoft.SkipLayerNormalization for the pair (`is_add_layernorm`)."""
    add = graph.parent(layer_norm, 0, "Add")
    assert add is not None
    first, second = add.input[0], add.input[1]
    bias_name = ""
    remove = [layer_norm, add]
    # Fold a dense layer's bias into the fused kernel when that Add feeds only this sum.
    for index, name in enumerate((first, second) if fold_bias else ()):
        split = split_bias_add(graph, name)
        if split is not None and graph.only_consumer(name) is add:
            bias_add, activation, bias = split
            bias_name = graph.add_initializer("skip_ln_bias", bias.astype("float32"))
            remove.append(bias_add)
            first, second = (activation, second) if index == 0 else (first, activation)
            break
    outputs = [layer_norm.output[0], "", ""]
    sum_users = [u for u in graph.consumers.get(add.output[0], []) if u is not layer_norm]
    if sum_users or add.output[0] in graph.output_names:
        outputs.append(add.output[0])  # input + skip + bias, for the later residual
    inputs = [first, second, layer_norm.input[1], layer_norm.input[2]] + ([bias_name] if bias_name else [])
    fused = graph.make_node(
        "SkipLayerNormalization", inputs, outputs, name="SkipLayerNormalization", domain=MS_DOMAIN,
        epsilon=float(attribute(layer_norm, "epsilon", 1e-5)),
    )  # fmt: skip
    graph.replace(remove, [fused])
    return True


def is_skip_layernorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "SkipLayerNormalization" and node.domain == MS_DOMAIN


def split_skip_layernorm(graph: Graph, fused: onnx.NodeProto) -> None:
    """The inverse of `fuse_add_layernorm`: one SkipLayerNormalization back as Add (then the Add of
    its folded bias, where it has one) -> LayerNormalization, its sum output from the last Add.
    A node whose mean or inverse deviation is read is refused: LayerNormalization has no such outputs."""
    if any(fused.output[1:3]):
        raise BtDeployError(f"{fused.name} writes its mean or inverse deviation, which LayerNormalization "
                            "keeps to itself: give a graph btdeploy optimized")  # fmt: skip
    first, second, gamma, beta, *rest = fused.input
    bias = rest[0] if rest else ""
    summed = fused.output[3] if len(fused.output) > 3 and fused.output[3] else graph.unique("residual_sum")
    nodes = []
    if bias:
        partial = graph.unique("residual_partial_sum")
        nodes.append(graph.make_node("Add", [first, second], [partial], name="Add"))
        first, second = partial, bias
    nodes.append(graph.make_node("Add", [first, second], [summed], name="Add"))
    nodes.append(graph.make_node(
        "LayerNormalization", [summed, gamma, beta], [fused.output[0]], name="LayerNormalization",
        axis=-1, epsilon=float(attribute(fused, "epsilon", 1e-12)),  # the contrib operator's default
    ))  # fmt: skip
    graph.replace([fused], nodes)


def _fuse(graph: Graph, bridges: bool, name: str) -> PassResult:
    """ort: one com.microsoft.SkipLayerNormalization per pair."""
    result = PassResult(name)
    for node in graph.each_once(lambda n: is_add_layernorm(graph, n, bridges)):
        result.fused += int(fuse_add_layernorm(graph, node))
    graph.set_opset(MS_DOMAIN, 1)
    return result


def _verify(graph: Graph, bridges: bool, name: str) -> PassResult:
    """trt: Add -> LayerNormalization is already what TensorRT fuses; count the pairs in that form."""
    result = PassResult(name)
    result.fused = sum(is_add_layernorm(graph, n, bridges) for n in graph.graph.node)
    return result


def _pass(bridges: bool, name: str) -> GraphPass:
    return GraphPass(
        name,
        {
            Flavour.ORT: lambda graph: _fuse(graph, bridges, name),
            Flavour.TRT: lambda graph: _verify(graph, bridges, name),
            Flavour.TRT_COMPAT: lambda graph: _verify(graph, bridges, name),
        },
    )


BRIDGE_LAYERNORM = _pass(bridges=True, name="bridge add+LayerNorm")
RESIDUAL_LAYERNORM = _pass(bridges=False, name="residual add+LayerNorm")
