"""Keep the residual stream and the normalisations out of INT8 (run on quantized graphs).

A quantizer puts one Q/DQ pair on a tensor and hands the dequantized copy to every consumer,
so the LayerNorm output that feeds the Q/K/V MatMuls also reaches the next residual Add and
LayerNorm rounded to 8 bits. This pass reconnects those consumers to the unquantized tensor:
only the MatMuls read the rounded copy.
"""

from __future__ import annotations

from btdeploy.optimize.graph import Graph
from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
from btdeploy.optimize.passes.base import GraphPass, PassResult

# Consumers that must read full precision: FULL_PRECISION_OPS, and the residual Add that
# feeds a LayerNormalization (the trt flavour's un-fused add+LN).


def _feeds_layernorm(graph: Graph, name: str) -> bool:
    """True when `name` reaches a LayerNormalization directly or through Casts (FP16 graphs
    cast the residual sum back to FP32 before the normalisation)."""
    user = graph.only_consumer(name)
    while user is not None and user.op_type == "Cast":
        user = graph.only_consumer(user.output[0])
    return user is not None and user.op_type == "LayerNormalization"


def _needs_full_precision(graph: Graph, node_op: str, outputs: list[str]) -> bool:
    if node_op in FULL_PRECISION_OPS:
        return True
    return node_op == "Add" and any(_feeds_layernorm(graph, name) for name in outputs)


def keep_full_precision_inputs(graph: Graph) -> PassResult:
    result = PassResult("full-precision residuals")
    details = {"inputs_restored": 0}
    for node in list(graph.graph.node):
        if not _needs_full_precision(graph, node.op_type, list(node.output)):
            continue
        for index, name in enumerate(node.input):
            dequantize = graph.producer.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = graph.producer.get(dequantize.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue  # a stored int8 weight has no full-precision original
            node.input[index] = quantize.input[0]
            details["inputs_restored"] += 1
    graph.refresh()
    result.fused = details["inputs_restored"]
    result.details = details
    return result


QDQ_ISLANDS = GraphPass.every_flavour("full_precision_inputs", keep_full_precision_inputs)
