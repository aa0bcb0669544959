"""A small editable view of an ONNX graph for the passes: who produces and who consumes each tensor."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self._ids = itertools.count()
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        for index, node in enumerate(self.graph.node):
            if not node.name:
                node.name = f"{node.op_type}_{index}"  # passes track nodes by name
        self.refresh()

    # --- indexes -----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Index the whole graph again: after nodes were edited in place (not through `replace`,
        `set_input` or `set_output`) or the node list was rebuilt."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            self._index(node)

    def parent(self, node: onnx.NodeProto, index: int, op_type: str | None = None) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        found = self.producer.get(node.input[index])
        if found is None or (op_type is not None and found.op_type != op_type):
            return None
        return found

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.output_names else None

    @property
    def output_names(self) -> set[str]:
        return {o.name for o in self.graph.output}

    # --- constants -----------------------------------------------------------------------------

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def add_initializer(self, base: str, value: np.ndarray, exact_name: bool = False) -> str:
        """A new initializer named after `base` (or `base` itself, which must be free); its name."""
        name = base if exact_name else self.unique(base)
        # Indexed as the graph's own element: `append` copies, and the index held the first copy,
        # the weight twice in memory (a dynamo export's 74 folded weights: 336 MB for 175).
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def unique(self, base: str) -> str:
        return f"{base}__bt{next(self._ids)}"

    # --- editing -----------------------------------------------------------------------------

    def make_node(
        self,
        op_type: str,
        inputs: list[str],
        outputs: list[str] | None = None,
        name: str = "",
        domain: str = "",
        **attrs: Any,
    ) -> onnx.NodeProto:
        """A new node (not yet in the graph); outputs get fresh names when not given."""
        node_name = self.unique(name or op_type)
        outs = outputs if outputs is not None else [f"{node_name}_out"]
        return helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None, **attrs)

    def replace(self, remove: list[onnx.NodeProto], add: list[onnx.NodeProto]) -> None:
        """Remove nodes and insert (copies of) new ones where the first removed node stood.

        In place, with the indexes updated for these nodes alone: the nodes left keep their
        objects, where rebuilding the node list copied every node and re-indexed the whole graph
        on each rewrite (quadratic: seconds per graph on base)."""
        nodes = self.graph.node
        remove_ids = {id(n) for n in remove}
        positions = [i for i, n in enumerate(nodes) if id(n) in remove_ids]
        for index in reversed(positions):
            self._unindex(nodes[index])
            del nodes[index]
        position = positions[0] if positions else len(nodes)
        for offset, node in enumerate(add):
            nodes.insert(position + offset, node)
            self._index(nodes[position + offset])  # the graph's copy, not `node`

    def set_input(self, node: onnx.NodeProto, index: int, name: str) -> None:
        """Point one input of a node in the graph at another tensor, the indexes kept true."""
        self._unindex(node)
        node.input[index] = name
        self._index(node)

    def set_output(self, node: onnx.NodeProto, index: int, name: str) -> None:
        self._unindex(node)
        node.output[index] = name
        self._index(node)

    def _index(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            self.producer[name] = node
        for name in node.input:
            if name:
                self.consumers[name].append(node)

    def _unindex(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]
        for name in node.input:
            if name:
                self.consumers[name] = [user for user in self.consumers[name] if user is not node]

    def each_once(self, wanted: Callable[[onnx.NodeProto], bool]) -> Iterator[onnx.NodeProto]:
        """Yield each node `wanted` accepts once, even while the caller rewrites the graph.

        Rewrites replace the graph's node objects, so the scan restarts after every yield and
        remembers the nodes it gave out by name.
        """
        seen: set[str] = set()
        while node := next((n for n in self.graph.node if n.name not in seen and wanted(n)), None):
            seen.add(node.name)
            yield node

    def toposort(self) -> None:
        """Order nodes so every input is produced before it is used (inserted nodes may break it)."""
        available = {i.name for i in self.graph.input} | set(self.initializers) | {""}
        pending = list(self.graph.node)
        ordered: list[onnx.NodeProto] = []
        while pending:
            still = []
            for node in pending:
                if all(name in available for name in node.input):
                    ordered.append(node)
                    available.update(node.output)
                else:
                    still.append(node)
            if len(still) == len(pending):
                raise ValueError(f"graph has a cycle or a dangling input near {still[0].name}")
            pending = still
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        self.refresh()

    def remove_dead(self) -> int:
        """Drop nodes whose outputs nothing uses, and unused initializers; returns nodes removed.

        Walks back from the graph outputs through producers, so it does not depend on the node
        list's order: the passes insert fused nodes where they like and sort only at the end (a
        sweep in list order had dropped a producer listed after its consumer)."""
        producer = {name: node for node in self.graph.node for name in node.output if name}
        needed = set(self.output_names)
        pending = list(needed)
        live: set[int] = set()
        while pending:
            node = producer.get(pending.pop())
            if node is None or id(node) in live:
                continue
            live.add(id(node))
            for name in node.input:
                if name and name not in needed:
                    needed.add(name)
                    pending.append(name)
        kept = [node for node in self.graph.node if id(node) in live]
        removed = len(self.graph.node) - len(kept)
        del self.graph.node[:]
        self.graph.node.extend(kept)
        unused = [t for t in self.graph.initializer if t.name not in needed]
        for tensor in unused:
            self.graph.initializer.remove(tensor)
            self.initializers.pop(tensor.name, None)
        self.refresh()
        return removed

    def count(self, op_type: str, domain: str = "") -> int:
        return sum(1 for n in self.graph.node if n.op_type == op_type and (n.domain or "") == domain)

    def set_opset(self, domain: str, version: int) -> None:
        for opset in self.model.opset_import:
            if (opset.domain or "") == domain:
                opset.version = max(opset.version, version)
                return
        self.model.opset_import.append(helper.make_opsetid(domain, version))


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default
