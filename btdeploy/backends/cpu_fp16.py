"""FP16 operators ONNX Runtime's CPU provider runs unlike TensorRT, run in FP32 instead.

- `QuantizeLinear` with an FP16 input: ONNX Runtime 1.24's CPU kernel truncates x / scale toward
  zero (0.7 -> 0, 1.6 -> 1) instead of rounding to nearest even as ONNX and TensorRT do, which
  shrinks every INT8 activation by half a step on average; over large's 24 + 24 layers that
  took the itm logits of the trt int8 graph to cosine 0.977 against 0.9988 with the rounding
  done in FP32. The input and scale are widened (exactly); the int8 output is the same type.
- `Attention` with FP16 inputs, below.

ONNX Runtime's CPU kernel for an FP16 `Attention` node is a reference loop: on base (325 image
tokens) one block takes about 0.8 s against 2 ms in FP32, so a TensorRT-dialect INT8 graph (FP16
outside its Q/DQ) took minutes to check on a CPU. ONNX Runtime already runs an FP16 Attention in
FP32 when its neighbours are FP32 (its rule for isolated FP16 nodes), which is why the FP16 graphs
check fast; next to FP16 DequantizeLinear nodes it does not. This rewrite does the same for every
FP16 Attention, for CPU sessions only: its FP16 inputs are widened, the core runs in FP32, its
outputs are rounded back to FP16. That is what TensorRT's fused FP16 attention computes too
(FP32 accumulation and softmax, FP16 output), and the graph on disk is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx
from onnx import TensorProto, helper


def _known_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for node in graph.node:  # a Cast says its output type even where value_info does not
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                types.setdefault(node.output[0], to)
    return types


def attention_in_fp32(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place so that every standard `Attention` node whose query is FP16 runs in
    FP32 between Casts; returns how many were rewritten."""
    return _rewrite(model, _attention)


def quantize_in_fp32(model: onnx.ModelProto) -> int:
    """Rewrite `model` in place so that every standard `QuantizeLinear` with an FP16 input quantizes
    from FP32 (input and scale widened, which is exact); returns how many were rewritten."""
    return _rewrite(model, _quantize)


# (node, known tensor types, the rewritten node list to append to) -> whether the node was rewritten
NodeRewrite = Callable[[onnx.NodeProto, dict[str, int], list[onnx.NodeProto]], bool]


def _rewrite(model: onnx.ModelProto, rewrite: NodeRewrite) -> int:
    graph = model.graph
    types = _known_types(graph)
    rewritten: list[onnx.NodeProto] = []
    count = sum(rewrite(node, types, rewritten) for node in graph.node)
    if count:
        del graph.node[:]
        graph.node.extend(rewritten)
    return count


def _fp16_standard(node: onnx.NodeProto, op_type: str, types: dict[str, int]) -> bool:
    return (
        node.op_type == op_type and node.domain in ("", "ai.onnx") and types.get(node.input[0]) == TensorProto.FLOAT16
    )


def _widen_inputs(
    node: onnx.NodeProto, indices: Iterable[int], types: dict[str, int], out: list[onnx.NodeProto]
) -> None:
    """A Cast to FP32 before each FP16 input of `node` at `indices`, appended to `out`."""
    prefix = node.name or node.output[0]
    for index in indices:
        name = node.input[index]
        if name and types.get(name) == TensorProto.FLOAT16:
            widened = f"{prefix}/fp32_in{index}"
            out.append(helper.make_node("Cast", [name], [widened], to=TensorProto.FLOAT, name=widened))
            node.input[index] = widened


def _attention(node: onnx.NodeProto, types: dict[str, int], out: list[onnx.NodeProto]) -> bool:
    if not _fp16_standard(node, "Attention", types):
        out.append(node)
        return False
    _widen_inputs(node, range(len(node.input)), types, out)
    prefix = node.name or node.output[0]
    narrowings = []
    for index, name in enumerate(node.output):
        if name:
            wide = f"{prefix}/fp32_out{index}"
            node.output[index] = wide
            narrowings.append(helper.make_node("Cast", [wide], [name], to=TensorProto.FLOAT16, name=f"{wide}/fp16"))
    out.extend([node, *narrowings])
    return True


def _quantize(node: onnx.NodeProto, types: dict[str, int], out: list[onnx.NodeProto]) -> bool:
    fp16 = _fp16_standard(node, "QuantizeLinear", types)
    if fp16:
        _widen_inputs(node, (0, 1), types, out)  # x and its scale; the int8 zero point stays
    out.append(node)
    return fp16
