"""Shape and constant cleanup: drop what the fusions left without a user.

The fused operators take the head count as an attribute, so the Shape -> Gather -> Concat
chains that computed each head reshape, the split-off weights and the Identity copies of shared
weights (passes/shared_weights.py) are dead afterwards.
"""

from __future__ import annotations

from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import GraphPass, PassResult


def cleanup(graph: Graph) -> PassResult:
    result = PassResult("shape/constant cleanup")
    initializers_before = len(graph.graph.initializer)
    result.fused = graph.remove_dead()
    result.details = {
        "nodes_removed": result.fused,
        "initializers_removed": initializers_before - len(graph.graph.initializer),
    }
    return result


CLEANUP = GraphPass.every_flavour("cleanup", cleanup)
