"""Model Optimizer's `remove_redundant_casts` in linear time, for AutoCast's last pass.

Its own asks for a tensor's consumers and producers by scanning every node, once or more per Cast,
and removes each dropped Cast with a list search that compares messages: quadratic in the graph,
30 % of AutoCast's time on the unfused trt-compat graph of base (py-spy) and more on large. This one
keeps an index of who reads and writes each tensor, updated with every rewiring, answers the
same questions from it in the same order, and drops the Casts in one rebuild of the node list.
The decisions and the rewiring are Model Optimizer's (its predicates' rules, its constant
folding); the graph is the same, byte for byte (tests compare it on every pattern and on the
real graphs).
"""

from __future__ import annotations

from collections import defaultdict

import onnx

# Model Optimizer's order: a cast up then down (or to the same place) is redundant, down then up is not.
_PRECISION_ORDER = (
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
)


class _TensorIndex:
    """Which nodes (by position) read and write each tensor, kept true while Casts are bypassed."""

    def __init__(self, nodes: list[onnx.NodeProto]) -> None:
        self.nodes = nodes
        self.readers: dict[str, set[int]] = defaultdict(set)
        self.writers: dict[str, set[int]] = defaultdict(set)
        for position, node in enumerate(nodes):
            for name in node.input:
                self.readers[name].add(position)
            for name in node.output:
                self.writers[name].add(position)

    def consumers(self, tensor: str) -> list[int]:
        return sorted(self.readers.get(tensor, ()))  # graph order, as a scan of the nodes gives

    def producers(self, tensor: str) -> list[int]:
        return sorted(self.writers.get(tensor, ()))

    def rename_input(self, position: int, old: str, new: str) -> None:
        node = self.nodes[position]
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        self.readers[old].discard(position)
        self.readers[new].add(position)

    def rename_output(self, position: int, index: int, new: str) -> None:
        node = self.nodes[position]
        self.writers[node.output[index]].discard(position)
        node.output[index] = new
        self.writers[new].add(position)


def remove_redundant_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """modelopt.onnx.utils.remove_redundant_casts, with the same result."""
    from modelopt.onnx import utils as modelopt_utils

    graph = model.graph
    nodes = list(graph.node)
    index = _TensorIndex(nodes)
    type_map = modelopt_utils._build_tensor_type_map(model)
    graph_outputs = {output.name for output in graph.output}
    dropped: set[int] = set()
    for position, node in enumerate(nodes):
        if node.op_type != "Cast":
            continue
        if modelopt_utils._is_same_type_cast(model, node, type_map) or _is_sequential_cast(index, node):
            dropped.add(position)
            _bypass(index, position, graph_outputs)
            continue
        constant = _foldable_constant(index, node)
        if constant is not None:
            dropped.add(position)
            modelopt_utils._convert_constant_values(model, nodes[constant], node)
            _bypass(index, position, graph_outputs)
    if dropped:
        kept = [node for position, node in enumerate(nodes) if position not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
    return model


def _is_sequential_cast(index: _TensorIndex, node: onnx.NodeProto) -> bool:
    """A Cast whose only reader is a Cast to the same or a lower precision: the first one does nothing."""
    from modelopt.onnx.utils import get_cast_to_type

    first = get_cast_to_type(node)
    readers = [p for p in index.consumers(node.output[0]) if index.nodes[p].op_type == "Cast"]
    if len(readers) != 1:
        return False
    second = get_cast_to_type(index.nodes[readers[0]])
    return (
        first in _PRECISION_ORDER
        and second in _PRECISION_ORDER
        and _PRECISION_ORDER.index(first) <= _PRECISION_ORDER.index(second)
    )


def _foldable_constant(index: _TensorIndex, node: onnx.NodeProto) -> int | None:
    """The position of the Constant this Cast alone reads, which can take the cast type instead."""
    producers = index.producers(node.input[0])
    if len(producers) == 1 and index.nodes[producers[0]].op_type == "Constant":
        if len(index.consumers(index.nodes[producers[0]].output[0])) == 1:
            return producers[0]
    return None


def _bypass(index: _TensorIndex, position: int, graph_outputs: set[str]) -> None:
    """Model Optimizer's _bypass_cast_node: readers of the Cast's output read its input instead;
    where the output is a network output, the input's producer writes that name instead."""
    node = index.nodes[position]
    source, target = node.input[0], node.output[0]
    if target in graph_outputs:
        for producer in index.producers(source):
            for i, name in enumerate(index.nodes[producer].output):
                if name == source:
                    index.rename_output(producer, i, target)
                    readers = index.consumers(source)
                    if len(readers) > 1:
                        for reader in readers:
                            index.rename_input(reader, source, target)
    else:
        for reader in index.consumers(target):
            index.rename_input(reader, target, source)
