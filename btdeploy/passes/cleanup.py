"""Shape and constant cleanup: drop what the fusions left without a user.

The fused operators take the head count as an attribute, so the Shape -> Gather -> Concat
chains that computed each head reshape, and the split-off weights, are dead afterwards.
"""

from __future__ import annotations

from ..graph import Graph
from .base import PassResult


def cleanup(graph: Graph, flavour: str) -> PassResult:
    result = PassResult("shape/constant cleanup", nodes_before=len(graph.graph.node))
    initializers_before = len(graph.graph.initializer)
    result.fused = graph.remove_dead()
    result.details = {
        "nodes_removed": result.fused,
        "initializers_removed": initializers_before - len(graph.graph.initializer),
    }
    result.nodes_after = len(graph.graph.node)
    return result
