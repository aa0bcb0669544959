"""Shared weights: every reader of Identity(initializer) reads the initializer itself.

The exporter hands a weight that several calls read (the cross-modal transforms run once per
bridge) out through Identity copies, and it does the same for weights that are merely equal: in
a checkpoint saved straight after initialisation every bias is zeros and every LayerNorm weight
ones, so nearly all of them become Identity copies of one tensor. The fusions find a projection's
weight and bias only where they are constants, and quantizers only quantize MatMuls whose weight
is one, so this pass runs first; the cleanup pass drops the Identity nodes it leaves unread.
"""

from __future__ import annotations

from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import GraphPass, PassResult


def read_shared_weights_directly(graph: Graph) -> PassResult:
    result = PassResult("shared weights")
    outputs = graph.output_names
    aliases = {
        node.output[0]: node.input[0]
        for node in graph.graph.node
        if node.op_type == "Identity" and node.input[0] in graph.initializers and node.output[0] not in outputs
    }
    for node in graph.graph.node:
        for index, name in enumerate(node.input):
            if name in aliases:
                node.input[index] = aliases[name]
    graph.refresh()
    result.fused = len(aliases)
    result.details = {"weight_identities_bypassed": len(aliases)}
    return result


SHARED_WEIGHTS = GraphPass.every_flavour("shared weights", read_shared_weights_directly)
