"""Weights behind layout operators: a Transpose, Slice, Reshape, Squeeze or Unsqueeze that reads only
constants becomes the initializer it computes.

torch's dynamo exporter (`btdeploy export --exporter dynamo`) folds constants only up to a size, so
the vision tower's packed in-projection reaches its Q, K and V MatMuls as Transpose(Slice(weight))
at run time. The fusions find a projection's weight only where it is a constant, and quantizers
only quantize MatMuls whose weight is one, so this pass runs first. The TorchScript exporter folds
them itself: there the pass finds nothing. The cleanup pass drops the weights left unread.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import GraphPass, PassResult

# Operators that move or select a weight's elements and compute nothing: folding them is exact.
LAYOUT_OPS = ("Transpose", "Slice", "Reshape", "Squeeze", "Unsqueeze")


def _detached(node: onnx.NodeProto) -> onnx.NodeProto:
    """A copy of `node` that holds none of its model's memory. A submessage keeps its whole model
    alive (protobuf's arena), and an evaluator lives in reference cycles until the cyclic collector
    runs: given the model's own node, it kept base's 1.4 GB graph resident through later steps."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def fold_weight_layouts(graph: Graph) -> PassResult:
    result = PassResult("weight layouts")
    folded: Counter[str] = Counter()
    outputs = graph.output_names
    computed: dict[str, np.ndarray] = {}  # folded outputs, made initializers only where still read
    for node in list(graph.graph.node):  # in graph order: a chain folds from its weight down
        if node.op_type not in LAYOUT_OPS or node.domain not in ("", "ai.onnx") or node.output[0] in outputs:
            continue
        # "": an optional input left out
        feeds = {name: computed[name] if name in computed else graph.constant(name) for name in node.input if name}
        if any(value is None for value in feeds.values()):
            continue
        (value,) = ReferenceEvaluator(_detached(node)).run(None, feeds)
        name, op_type = node.output[0], node.op_type  # read before the node leaves the graph
        graph.replace([node], [])
        computed[name] = np.asarray(value)
        folded[op_type] += 1
    for name, value in computed.items():
        # A chain's inner links (the packed weight's Slice before its Transpose) are never stored.
        if graph.consumers.get(name):
            graph.add_initializer(name, value, exact_name=True)
    result.fused = sum(folded.values())
    result.details = {f"{op.lower()}_folded": folded[op] for op in LAYOUT_OPS if folded[op]}
    return result


WEIGHT_LAYOUTS = GraphPass.every_flavour("weight layouts", fold_weight_layouts)
