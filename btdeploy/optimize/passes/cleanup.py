"""Shape and constant cleanup: drop what the fusions left without a user.

The fused operators take the head count as an attribute, so the Shape -> Gather -> Concat
chains that computed each head reshape, and the split-off weights, are dead afterwards.

The exporter also reads a weight shared by several calls (the cross-modal transforms run once
per bridge) through Identity copies. Quantizers only quantize MatMuls whose weight is a
constant, so those MatMuls stayed FP32; they now read the initializer itself.
"""

from __future__ import annotations

from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import GraphPass, PassResult


def cleanup(graph: Graph) -> PassResult:
    result = PassResult("shape/constant cleanup")
    initializers_before = len(graph.graph.initializer)
    identities = _read_initializers_directly(graph)
    result.fused = graph.remove_dead()
    result.details = {
        "nodes_removed": result.fused,
        "weight_identities_bypassed": identities,
        "initializers_removed": initializers_before - len(graph.graph.initializer),
    }
    return result


CLEANUP = GraphPass.every_flavour("cleanup", cleanup)


def _read_initializers_directly(graph: Graph) -> int:
    """Point every reader of Identity(initializer) at the initializer; returns the Identities bypassed."""
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
    return len(aliases)
