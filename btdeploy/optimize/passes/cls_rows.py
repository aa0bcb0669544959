"""Compute only the [CLS] row where only the [CLS] row is read.

The ITM and contrastive heads read the last cross-modal layer of each stack through its pooler,
`hidden_states[:, 0]`, yet the export computes every token of that layer: the query projection,
attention, output projection and FFN of hundreds of image tokens whose results are discarded.
This pass finds every tensor that is only ever read at row 0 (through row-wise operators, the
pooler's `Gather(axis=1, index 0)`, or as the query of an attention block whose result is itself
only read at row 0), and computes one row of it instead. Keys and values stay full (the attention
pass then spares their projections in the ort flavour); a tensor also needed in full elsewhere is
sliced, so nothing is computed twice.

It runs before the attention pass, on the canonical pattern, so the one-row attention blocks are
fused like the others (as cross-attention: their query and key/value sources differ).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from btdeploy.optimize.graph import Graph, attribute
from btdeploy.optimize.passes.attention import AttentionBlock, match
from btdeploy.optimize.passes.base import ROW_WISE, GraphPass, PassResult, row_wise


def _is_pooler(graph: Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Gather" or attribute(node, "axis", 0) != 1:
        return False
    index = graph.constant(node.input[1])
    return index is not None and index.size == 1 and int(index.reshape(())) == 0


class _RowZero:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.blocks: dict[str, AttentionBlock] = {}  # block output -> block
        self.query_of: dict[int, AttentionBlock] = {}  # id(Q MatMul) -> block
        for softmax in [n for n in graph.graph.node if n.op_type == "Softmax"]:
            block = match(graph, softmax)
            if isinstance(block, AttentionBlock):
                self.blocks[block.output] = block
                self.query_of[id(block.q.nodes[0])] = block
        self.only_row0 = self._mark()
        self.memo: dict[str, str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.attention_blocks = 0
        self.slices = 0  # tensors also read in full elsewhere, whose row 0 is sliced off

    def _mark(self) -> set[str]:
        """Tensors read only at row 0, found walking the graph backwards."""
        g, marked = self.graph, set[str]()
        for node in reversed(list(g.graph.node)):
            for tensor in node.output:
                users = g.consumers.get(tensor, [])
                if not users or tensor in g.output_names:
                    continue
                if all(self._reads_row0(user, tensor, marked) for user in users):
                    marked.add(tensor)
        return marked

    def _reads_row0(self, user: onnx.NodeProto, tensor: str, marked: set[str]) -> bool:
        if _is_pooler(self.graph, user) and user.input[0] == tensor:
            return True
        if user.op_type == "Shape":
            # Only the head reshapes of the blocks being rewritten read shapes here, and they
            # die with those blocks; if one survived, the full tensor would simply stay.
            return True
        block = self.query_of.get(id(user))
        if block is not None and user.input[0] == tensor:
            return block.output in marked
        return row_wise(self.graph, user, tensor) and all(out in marked for out in user.output)

    def _emit(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        node = self.graph.make_node(op_type, inputs, name=f"cls_{op_type}", **attrs)
        self.new_nodes.append(node)
        return node.output[0]

    def _const(self, base: str, value: np.ndarray) -> str:
        return self.graph.add_initializer(base, value)

    def row0(self, tensor: str) -> str:
        """A tensor equal to tensor[:, 0:1]."""
        if tensor in self.memo:
            return self.memo[tensor]
        g = self.graph
        node = g.producer.get(tensor)
        if tensor in self.blocks and tensor in self.only_row0:
            result = self._attention(self.blocks[tensor])
        elif node is not None and tensor in self.only_row0 and node.op_type in ROW_WISE:
            inputs = [
                self.row0(name) if name and g.constant(name) is None and row_wise(g, node, name) else name
                for name in node.input  # "" is an optional input left out (Clip without a min)
            ]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            result = self._emit(node.op_type, inputs, **attrs)
        else:
            zero, one = (
                self._const("cls_start", np.array([0], np.int64)),
                self._const("cls_end", np.array([1], np.int64)),
            )
            result = self._emit("Slice", [tensor, zero, one, one])
            self.slices += 1
        self.memo[tensor] = result
        return result

    def _attention(self, block: AttentionBlock) -> str:
        g = self.graph
        width = block.q.weight.shape[1]
        head_size = width // block.heads
        q = self._emit("MatMul", [self.row0(block.q.source), block.q.nodes[0].input[1]])
        q = self._emit("Add", [q, self._const("cls_q_bias", block.q.bias.astype(np.float32))])
        q = self._emit("Mul", [q, self._const("cls_scale", np.array(block.scale, dtype=np.float32))])
        q = self._emit("Reshape", [q, self._const("cls_shape", np.array([0, -1, block.heads, head_size], np.int64))])
        q = self._emit("Transpose", [q], perm=[0, 2, 1, 3])
        probs_matmul = next(n for n in block.nodes if n.op_type == "MatMul" and g.parent(n, 0, "Softmax") is not None)
        scores_matmul = next(n for n in block.nodes if n.op_type == "MatMul" and n is not probs_matmul)
        scores = self._emit("MatMul", [q, scores_matmul.input[1]])
        if block.mask is not None:
            scores = self._emit("Add", [scores, block.mask])
        probs = self._emit("Softmax", [scores], axis=-1)
        context = self._emit("MatMul", [probs, probs_matmul.input[1]])
        context = self._emit("Transpose", [context], perm=[0, 2, 1, 3])
        self.attention_blocks += 1
        return self._emit("Reshape", [context, self._const("cls_shape", np.array([0, -1, width], np.int64))])


def compute_cls_rows(graph: Graph) -> PassResult:
    result = PassResult("[CLS]-only rows")
    rows = _RowZero(graph)
    poolers = [n for n in graph.graph.node if _is_pooler(graph, n) and n.input[0] in rows.only_row0]
    for pooler in poolers:
        pooler.input[0] = rows.row0(pooler.input[0])
    if rows.new_nodes:
        graph.graph.node.extend(rows.new_nodes)
        graph.toposort()
        graph.remove_dead()
    result.fused = rows.attention_blocks
    result.details = {
        "poolers": len(poolers),
        "attention_blocks_one_row": rows.attention_blocks,
        "full_tensors_sliced": rows.slices,
    }
    return result


CLS_ROWS = GraphPass.every_flavour("cls_rows", compute_cls_rows)
