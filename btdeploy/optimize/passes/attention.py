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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph, attribute
from btdeploy.optimize.passes.base import GraphPass, PassResult, scalar_operand, split_bias_add

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
    nodes = [*block.q.nodes, *block.k.nodes, *block.v.nodes]
    inputs = [block.q.biased, block.k.biased, block.v.biased]
    if block.mask is not None:
        mask, mask_nodes = masks.bool_for(block.q.biased)
        nodes += mask_nodes
        inputs.append(mask)
    nodes.append(graph.make_node("Attention", inputs, [block.output], name="Attention",
                                 q_num_heads=block.heads, kv_num_heads=block.heads, scale=block.scale))  # fmt: skip
    return nodes


def fuse_attention(graph: Graph) -> PassResult:
    result = PassResult("attention")
    masks = _MaskCache(graph)
    details = {"self": 0, "cross": 0}
    for softmax in graph.each_once(lambda n: n.op_type == "Softmax"):
        block = match(graph, softmax)
        if isinstance(block, NoMatch):
            result.unmatched.append(f"{softmax.name}: {block.reason}")
            continue
        fused = _fused(graph, block, masks)
        graph.replace(block.nodes + block.q.nodes + block.k.nodes + block.v.nodes, fused)
        details["self" if block.q.source == block.k.source else "cross"] += 1
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
    {Flavour.ORT: fuse_attention, Flavour.TRT: fuse_attention, Flavour.TRT_COMPAT: count_canonical_attention},
)
