"""Fuse every attention block: MatMul -> (mask Add) -> Softmax -> MatMul and its projections.

The export-time patch (btdeploy.patches) gives every block, text, vision and both cross-modal
stacks, the same shape:

    q = Reshape(Mul(Add(MatMul(x, Wq), bq), scale), [B, S, N, d]) -> Transpose(0, 2, 1, 3)
    k = Reshape(Add(MatMul(m, Wk), bk)) -> Transpose(0, 2, 3, 1)
    v = Reshape(Add(MatMul(m, Wv), bv)) -> Transpose(0, 2, 1, 3)
    y = Reshape(Transpose(MatMul(Softmax(MatMul(q, k) [+ text mask]), v), (0, 2, 1, 3)), [B, S, W])

x == m is self-attention, otherwise cross-attention (K/V from the other modality).
Both flavours fuse it into the ONNX Attention operator (opset 23) on the biased Q, K, V, with
the scale as an attribute and a boolean mask [B, 1, S, L] built once from `attention_mask`:
standard operators only, cross-attention included, which TensorRT's parser takes (10.14+).
The `ort` flavour uses it too because it was the faster one on ONNX Runtime's CPU provider:
on base ITM, batch 4, length 40, com.microsoft.Attention (packed QKV) + MultiHeadAttention
cost 3.10 s of kernel time per run against 3.01 s for separate Q/K/V MatMuls + ONNX Attention
(benchmarks/profile_ort.py).

A block whose query is one row (the [CLS] row the cls_rows pass leaves in the last cross-modal
layers) is fused in the `ort` flavour with its key and value projections absorbed: for one query
q, q . (x Wk_h + bk_h) = (q Wk_h^T) . x + a constant the softmax ignores, and p . (x Wv_h + bv_h)
= (p . x) Wv_h + bv_h since p sums to 1. So the Attention operator reads the source x itself as
a single key/value head of the full width (multi-query attention), and the per-head weights move
to two small products on the one row: the K and V projections of every key (on base, 325 image
tokens x 768 x 768 each) are not computed. The trt flavour keeps one K/V projection per head:
TensorRT's parsing of kv_num_heads < q_num_heads at head size 768 has not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph, attribute
from btdeploy.optimize.passes.base import (
    GraphPass,
    PassResult,
    bias_after,
    row_wise,
    scalar_operand,
    split_bias_add,
)

TEXT_MASK_INPUT = "attention_mask"


@dataclass
class Projection:
    source: str  # the tensor projected (x or m)
    matmul_out: str
    biased: str  # MatMul + bias
    weight: np.ndarray  # [in, out]
    bias: np.ndarray
    nodes: list[onnx.NodeProto]


@dataclass
class AttentionBlock:
    q: Projection
    k: Projection
    v: Projection
    scale: float
    heads: int
    mask: str | None  # the additive mask tensor, derived from the attention_mask input
    output: str  # the block's [B, S, W] result
    nodes: list[onnx.NodeProto]  # everything between the projections and the output


def _projection(graph: Graph, name: str) -> Projection | None:
    split = split_bias_add(graph, name)
    if split is None:
        return None
    add, activation, bias = split
    matmul = graph.producer.get(activation)
    if matmul is None or matmul.op_type != "MatMul":
        return None
    weight = graph.constant(matmul.input[1])
    if weight is None or weight.ndim != 2:
        return None
    return Projection(matmul.input[0], activation, name, weight, bias, [matmul, add])


def _heads_from_reshape(graph: Graph, reshape: onnx.NodeProto) -> int | None:
    """The head count: the third entry of the [B, S, N, d] shape (constant, thanks to the patch)."""
    shape = graph.constant(reshape.input[1])
    if shape is not None and shape.size == 4 and shape[2] > 0:
        return int(shape[2])
    concat = graph.parent(reshape, 1, "Concat")
    if concat is None or len(concat.input) != 4:
        return None
    value = graph.constant(concat.input[2])
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _transposed(graph: Graph, name: str, perm: list[int]) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    transpose = graph.producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or list(attribute(transpose, "perm", [])) != perm:
        return None
    reshape = graph.parent(transpose, 0, "Reshape")
    return (transpose, reshape) if reshape is not None else None


def _derives_from_mask_input(graph: Graph, name: str) -> bool:
    """True when `name` is computed from the attention_mask graph input and constants only."""
    graph_inputs = {i.name for i in graph.graph.input}
    seen, stack, reached = set(), [name], False
    while stack:
        current = stack.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        if current in graph_inputs:
            if current != TEXT_MASK_INPUT:
                return False
            reached = True
            continue
        node = graph.producer.get(current)
        if node is not None:
            stack.extend(node.input)
    return reached


@dataclass
class NoMatch:
    """Why a Softmax is not the centre of a fusable attention block."""

    reason: str


def match(graph: Graph, softmax: onnx.NodeProto) -> AttentionBlock | NoMatch:
    """The attention block around `softmax`, or why there is none."""
    if attribute(softmax, "axis", -1) not in (-1, 3):
        return NoMatch("the Softmax is not over the last axis")
    scores = graph.producer.get(softmax.input[0])
    mask = None
    if scores is not None and scores.op_type == "Add":
        first, second = (graph.producer.get(i) for i in scores.input)
        if first is not None and first.op_type == "MatMul" and _derives_from_mask_input(graph, scores.input[1]):
            mask, mask_add, scores = scores.input[1], scores, first
        elif second is not None and second.op_type == "MatMul" and _derives_from_mask_input(graph, scores.input[0]):
            mask, mask_add, scores = scores.input[0], scores, second
        else:
            return NoMatch(f"the scores Add {scores.name} adds something not derived from {TEXT_MASK_INPUT}")
    if scores is None or scores.op_type != "MatMul":
        return NoMatch("the Softmax does not read a Q.K^T MatMul (or MatMul + mask)")
    q_side = _transposed(graph, scores.input[0], [0, 2, 1, 3])
    k_side = _transposed(graph, scores.input[1], [0, 2, 3, 1])
    if q_side is None or k_side is None:
        return NoMatch("Q or K is not a head Reshape + Transpose (0,2,1,3 for Q, 0,2,3,1 for K)")
    probs_user = graph.only_consumer(softmax.output[0])
    if probs_user is None or probs_user.op_type != "MatMul":
        return NoMatch("the probabilities do not feed exactly one MatMul")
    v_side = _transposed(graph, probs_user.input[1], [0, 2, 1, 3])
    merge = graph.only_consumer(probs_user.output[0])
    if v_side is None:
        return NoMatch("V is not a head Reshape + Transpose (0,2,1,3)")
    if merge is None or merge.op_type != "Transpose" or list(attribute(merge, "perm", [])) != [0, 2, 1, 3]:
        return NoMatch("the context is not merged by one Transpose (0,2,1,3)")
    flatten = graph.only_consumer(merge.output[0])
    if flatten is None or flatten.op_type != "Reshape":
        return NoMatch("the merged heads are not flattened by one Reshape")
    scale_mul = graph.producer.get(q_side[1].input[0])
    scaled = scalar_operand(graph, scale_mul) if scale_mul is not None and scale_mul.op_type == "Mul" else None
    if scale_mul is None or scaled is None:
        return NoMatch("the query is not scaled by a constant Mul before Q.K^T (export with btdeploy's patches)")
    scale, q_biased = scaled
    q = _projection(graph, q_biased)
    k = _projection(graph, k_side[1].input[0])
    v = _projection(graph, v_side[1].input[0])
    if q is None or k is None or v is None:
        return NoMatch("Q, K or V is not MatMul(x, constant 2-D weight) + constant 1-D bias")
    heads = _heads_from_reshape(graph, q_side[1])
    if heads is None:
        return NoMatch("the head count is not a constant in the query's head Reshape")
    if k.source != v.source:
        return NoMatch("K and V project different tensors")
    internal = [scale_mul, *q_side[::-1], *k_side[::-1], *v_side[::-1], scores, softmax, probs_user, merge, flatten]
    if mask is not None:
        internal.append(mask_add)
    # Every intermediate must feed only this block, or removing it would break another user.
    members = internal + q.nodes + k.nodes + v.nodes
    member_ids = {id(n) for n in members}
    for node in members:
        if node is flatten:
            continue
        for out in node.output:
            if out in graph.output_names or any(id(u) not in member_ids for u in graph.consumers.get(out, [])):
                return NoMatch(f"{out} (inside the block) is also read outside it")
    return AttentionBlock(q, k, v, scale, heads, mask, flatten.output[0], internal)


class _MaskCache:
    """Mask tensors built once per graph from the attention_mask input."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self._bool4: str | None = None

    def bool_for(self, query: str) -> tuple[str, list[onnx.NodeProto]]:
        """[B, 1, S, L] boolean mask for a query tensor of S tokens (ONNX Runtime wants S explicit)."""
        g = self.graph
        if self._bool4 is None:
            cast = g.make_node("Cast", [TEXT_MASK_INPUT], name="attention_mask_bool", to=onnx.TensorProto.BOOL)
            axes = g.add_initializer("mask_axes", np.array([1, 2], dtype=np.int64))
            unsqueeze = g.make_node("Unsqueeze", [cast.output[0], axes], name="attention_mask_b11l")
            self.nodes += [cast, unsqueeze]
            self._bool4 = unsqueeze.output[0]
        shape = g.make_node("Shape", [query], name="query_shape", start=1, end=2)
        ones = g.add_initializer("ones2", np.array([1, 1], dtype=np.int64))
        one = g.add_initializer("one", np.array([1], dtype=np.int64))
        target = g.make_node("Concat", [ones, shape.output[0], one], name="mask_target", axis=0)
        expand = g.make_node("Expand", [self._bool4, target.output[0]], name="attention_mask_b1sl")
        return expand.output[0], [shape, target, expand]


def _fused(graph: Graph, block: AttentionBlock, masks: _MaskCache) -> list[onnx.NodeProto]:
    # K and V enter without their biases (see _value_bias and the module docstring).
    nodes = [*block.q.nodes, block.k.nodes[0], block.v.nodes[0]]
    inputs = [block.q.biased, block.k.matmul_out, block.v.matmul_out]
    if block.mask is not None:
        mask, mask_nodes = masks.bool_for(block.q.biased)
        nodes += mask_nodes
        inputs.append(mask)
    context, value_bias = _value_bias(graph, block)
    nodes.append(graph.make_node("Attention", inputs, [context], name="Attention",
                                 q_num_heads=block.heads, kv_num_heads=block.heads, scale=block.scale))  # fmt: skip
    return nodes + value_bias


def _absorbed(graph: Graph, block: AttentionBlock, masks: _MaskCache) -> list[onnx.NodeProto]:
    """A one-row block with its K/V projections folded into the query and the context (see the
    module docstring): Attention over the unprojected source, one key/value head of its width."""
    source, width = block.k.source, block.q.weight.shape[1]
    head_size = width // block.heads
    # [in, N*d] -> per head: Wk_h^T as [N, d, in], Wv_h as [N, in, d]
    per_head = block.k.weight.reshape(-1, block.heads, head_size)
    k_heads = graph.add_initializer("absorbed_wk", np.ascontiguousarray(per_head.transpose(1, 2, 0)))
    v_heads = graph.add_initializer(
        "absorbed_wv", np.ascontiguousarray(block.v.weight.reshape(-1, block.heads, head_size).transpose(1, 0, 2))
    )
    split_heads = graph.add_initializer("absorbed_heads", np.array([0, -1, block.heads, head_size], np.int64))
    merged = graph.add_initializer("absorbed_merged", np.array([0, -1, width], np.int64))
    axis1 = graph.add_initializer("absorbed_axis1", np.array([1], np.int64))
    q = graph.make_node("Reshape", [block.q.biased, split_heads], name="absorbed_q_heads")
    q_t = graph.make_node("Transpose", q.output, name="absorbed_q_bnsd", perm=[0, 2, 1, 3])
    query = graph.make_node("MatMul", [q_t.output[0], k_heads], name="absorbed_query")
    kv = graph.make_node("Unsqueeze", [source, axis1], name="absorbed_kv")
    nodes = [*block.q.nodes, q, q_t, query, kv]
    inputs = [query.output[0], kv.output[0], kv.output[0]]
    if block.mask is not None:
        mask, mask_nodes = masks.bool_for(block.q.biased)
        nodes += mask_nodes
        inputs.append(mask)
    attention = graph.make_node("Attention", inputs, name="Attention", scale=block.scale)
    context = graph.make_node("MatMul", [attention.output[0], v_heads], name="absorbed_context")
    context_t = graph.make_node("Transpose", context.output, name="absorbed_context_bsnd", perm=[0, 2, 1, 3])
    output, value_bias = _value_bias(graph, block)
    flat = graph.make_node("Reshape", [context_t.output[0], merged], [output], name="absorbed_context_flat")
    return [*nodes, attention, context, context_t, flat, *value_bias]


def _value_bias(graph: Graph, block: AttentionBlock) -> tuple[str, list[onnx.NodeProto]]:
    """Where the block's context (without the value bias) goes, and the nodes that add that bias.

    The key bias is dropped: it adds q . bk to every score of a query alike, which the softmax
    ignores. The value bias adds bv to every context row (the probabilities sum to 1), so where
    the output projection MatMul(., Wo) + bo is the block's only reader it joins that bias as
    bo + bv Wo and no Add over the keys or the context remains; otherwise one Add on the context."""
    projection = graph.only_consumer(block.output)
    weight = graph.constant(projection.input[1]) if projection is not None and projection.op_type == "MatMul" else None
    after = None
    if projection is not None and weight is not None and weight.ndim == 2:
        after = bias_after(graph, projection, weight.shape[1])
    output_bias = graph.constant(after[1]) if after is not None else None
    if weight is None or after is None or output_bias is None:
        context = graph.unique("attention_context")
        bias = graph.add_initializer("value_bias", block.v.bias.astype(np.float32))
        return context, [graph.make_node("Add", [context, bias], [block.output], name="value_bias")]
    folded = output_bias.astype(np.float64) + block.v.bias.astype(np.float64) @ weight.astype(np.float64)
    add, bias_name = after
    graph.set_input(
        add,
        list(add.input).index(bias_name),
        graph.add_initializer("output_bias_with_value_bias", folded.astype(np.float32)),
    )
    return block.output, []


def _is_slice_of_row0(graph: Graph, node: onnx.NodeProto) -> bool:
    """Slice(x, [0], [1], [1]): row 0 of the token axis, as the cls_rows pass writes it."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return False
    values = [graph.constant(name) for name in node.input[1:4]]
    if any(v is None or v.size != 1 for v in values):
        return False
    start, end, axis = (int(v.reshape(())) for v in values if v is not None)
    return (start, end, axis) == (0, 1, 1)


class _OneRow:
    """Which tensors hold one token row: a row-0 Slice, what row-wise operators make from one, and
    an attention block's output when its query is one row."""

    def __init__(self, graph: Graph, blocks: dict[str, AttentionBlock]) -> None:
        self.graph, self.blocks = graph, blocks
        self.memo: dict[str, bool] = {}

    def __call__(self, tensor: str) -> bool:
        if tensor not in self.memo:
            self.memo[tensor] = False  # a cycle cannot be one row; the graph is acyclic anyway
            self.memo[tensor] = self._decide(tensor)
        return self.memo[tensor]

    def _decide(self, tensor: str) -> bool:
        if tensor in self.blocks:
            return self(self.blocks[tensor].q.source)
        node = self.graph.producer.get(tensor)
        if node is None:
            return False
        if _is_slice_of_row0(self.graph, node):
            return True
        activations = [name for name in node.input if name and self.graph.constant(name) is None]
        return bool(activations) and all(row_wise(self.graph, node, name) and self(name) for name in activations)


def fuse_attention(graph: Graph) -> PassResult:
    return _fuse_attention(graph, absorb_one_row=False)


def fuse_attention_absorbing_one_row(graph: Graph) -> PassResult:
    return _fuse_attention(graph, absorb_one_row=True)


def _one_row_blocks(graph: Graph) -> set[str]:
    """The outputs of the blocks whose query is one row. Decided on the unfused graph (fusing a
    block replaces the nodes the decision walks); the fusion then matches each block again, since
    every rewrite copies the graph's node objects."""
    blocks = {}
    for softmax in graph.graph.node:
        block = match(graph, softmax) if softmax.op_type == "Softmax" else None
        if isinstance(block, AttentionBlock):
            blocks[block.output] = block
    one_row = _OneRow(graph, blocks)
    return {output for output, block in blocks.items() if one_row(block.q.source)}


def _fuse_attention(graph: Graph, absorb_one_row: bool) -> PassResult:
    result = PassResult("attention")
    masks = _MaskCache(graph)
    details = {"self": 0, "cross": 0, "one_row_absorbed": 0}
    absorbed = _one_row_blocks(graph) if absorb_one_row else set()
    for softmax in graph.each_once(lambda n: n.op_type == "Softmax"):
        block = match(graph, softmax)
        if isinstance(block, NoMatch):
            result.unmatched.append(f"{softmax.name}: {block.reason}")
            continue
        one_row_query = block.output in absorbed
        fused = _absorbed(graph, block, masks) if one_row_query else _fused(graph, block, masks)
        graph.replace(block.nodes + block.q.nodes + block.k.nodes + block.v.nodes, fused)
        details["self" if block.q.source == block.k.source else "cross"] += 1
        details["one_row_absorbed"] += one_row_query
    if masks.nodes:
        graph.graph.node.extend(masks.nodes)
    if details["self"] + details["cross"]:
        graph.set_opset("", 23)
    graph.toposort()
    result.fused = details["self"] + details["cross"]
    result.details = details
    return result


def count_canonical_attention(graph: Graph) -> PassResult:
    """trt-compat: keep every block as the canonical pattern TensorRT's own multi-head-attention
    fusion recognises (scale on Q, additive mask, MatMul -> Softmax -> MatMul); count the blocks
    in that form, and say why any other Softmax is not one."""
    result = PassResult("attention")
    details = {"self": 0, "cross": 0}
    for softmax in [n for n in graph.graph.node if n.op_type == "Softmax"]:
        block = match(graph, softmax)
        if isinstance(block, NoMatch):
            result.unmatched.append(f"{softmax.name}: {block.reason}")
            continue
        details["self" if block.q.source == block.k.source else "cross"] += 1
    result.fused = details["self"] + details["cross"]
    result.details = {**details, "kept_canonical": result.fused}
    return result


# The ONNX Attention operator is standard, so ort and trt take the same rewrite; trt-compat
# targets parsers without it (TensorRT before 10.14).
ATTENTION = GraphPass(
    "attention",
    {
        Flavour.ORT: fuse_attention_absorbing_one_row,
        Flavour.TRT: fuse_attention,
        Flavour.TRT_COMPAT: count_canonical_attention,
    },
)
