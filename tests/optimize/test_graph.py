"""The passes' graph view: its indexes stay what indexing the graph afresh gives, edit after edit."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from btdeploy.optimize.graph import Graph


def _indexes(graph: Graph) -> tuple[dict[str, str], dict[str, list[str]]]:
    producer = {name: node.name for name, node in graph.producer.items()}
    consumers = {name: sorted(n.name for n in users) for name, users in graph.consumers.items() if users}
    return producer, consumers


def _fresh(graph: Graph) -> tuple[dict[str, str], dict[str, list[str]]]:
    return _indexes(Graph(graph.model))


def _chain() -> Graph:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("Add", ["a", "b"], ["c"], name="add"),
        helper.make_node("Abs", ["c"], ["y"], name="abs"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g", [value("x", onnx.TensorProto.FLOAT, [2])], [value("y", onnx.TensorProto.FLOAT, [2])]
    )
    return Graph(helper.make_model(graph))


def test_replace_and_rewiring_keep_the_indexes_true() -> None:
    graph = _chain()
    neg, add = (n for n in graph.graph.node if n.name in ("neg", "add"))
    # Two nodes become one, where the first stood; its output takes over the old one's name.
    graph.replace([neg, add], [graph.make_node("Sub", ["a", "a"], ["c"], name="sub")])
    assert [n.op_type for n in graph.graph.node] == ["Relu", "Sub", "Abs"]
    assert _indexes(graph) == _fresh(graph)
    assert graph.producer["c"].op_type == "Sub" and "b" not in graph.producer
    assert [n.op_type for n in graph.consumers["a"]] == ["Sub", "Sub"]
    # The nodes left keep their objects: a pass may hold one across a rewrite.
    relu, sub, last = graph.graph.node
    assert graph.producer["a"] is relu and graph.only_consumer("c") is last
    graph.set_input(sub, 1, "x")
    graph.set_output(relu, 0, "r")
    graph.set_input(sub, 0, "r")
    assert _indexes(graph) == _fresh(graph)
    assert graph.only_consumer("r") is sub and "a" not in graph.producer
    # Nodes added without removing any go to the end; removing without adding leaves a gap.
    graph.replace([], [graph.make_node("Identity", ["y"], ["z"], name="tail")])
    assert last is not None
    graph.replace([last], [])
    assert [n.op_type for n in graph.graph.node] == ["Relu", "Sub", "Identity"]
    assert _indexes(graph) == _fresh(graph) and "y" not in graph.producer


def test_remove_dead_keeps_a_producer_listed_after_its_consumer() -> None:
    """Nodes a pass adds go to the end, and the graph is sorted only after the last pass: the
    [CLS] rows' Slice came after the Add + LayerNorm that read it, and a sweep in list order
    dropped it (a text tower with tanh GELU, whose unfused GELUs left the list that way)."""
    graph = _chain()
    relu, neg, add, last = graph.graph.node
    graph.replace([], [graph.make_node("Identity", ["a"], ["late"], name="late")])
    graph.set_input(add, 1, "late")  # add now reads the node listed last; neg is dead
    graph.replace([], [graph.make_node("Sigmoid", ["x"], ["unused"], name="unused")])
    assert graph.remove_dead() == 2
    assert [n.op_type for n in graph.graph.node] == ["Relu", "Add", "Abs", "Identity"]
    graph.toposort()
    assert [n.op_type for n in graph.graph.node] == ["Relu", "Identity", "Add", "Abs"]


def test_an_added_initializer_is_indexed_as_the_graphs_own() -> None:
    """The index held the copy `append` had been handed, not the graph's: the weight twice in memory,
    and an edit made through the index lost to the model."""
    graph = _chain()
    name = graph.add_initializer("w", np.arange(4, dtype=np.float32))
    graph.initializers[name].CopyFrom(numpy_helper.from_array(np.full(4, 7.0, np.float32), name))
    stored = [t for t in graph.graph.initializer if t.name == name]
    assert len(stored) == 1
    np.testing.assert_array_equal(numpy_helper.to_array(stored[0]), np.full(4, 7.0, np.float32))
