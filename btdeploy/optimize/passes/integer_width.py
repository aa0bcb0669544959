"""ONNX Runtime's integer GEMMs only at output widths that are a multiple of 16 (run on the ort
flavour's INT8 and int8-dynamic graphs).

ONNX Runtime 1.24's u8 x s8 GEMM on CPUs with AMX (Intel Xeon 4th generation and later) returns
wrong sums when the rows exceed 32 and a thread's share of the output columns ends in a partial
16-column tile: on a 2-core Xeon, MatMulInteger of 33 x 200 by 200 x 77 was off by up to 6.6e5,
while every width that is a multiple of 16 came out exact (btdeploy's own probe; ONNX Runtime
issue 26324 reports wrong INT8 outputs on that CPU class since 1.23). BridgeTower's masked-LM
decoder (50265 words) is such a GEMM: the mlm head's INT8 logits failed parity there.

For the ort flavour this pass pads each integer GEMM's weight with zero columns up to the next
multiple of 16 and slices the output back: the same numbers, on any CPU. `unpad_integer_widths`
takes the padding off again where the static INT8 graph is raised to Q/DQ for the trt flavours.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import GraphPass, PassResult

TILE = 16
PADDED = "_padded16"  # suffix of the padded copies, so that the trt flavours can take the padding off


def _padded_width(columns: int) -> int:
    return -(-columns // TILE) * TILE


def _pad_columns(graph: Graph, name: str, width: int, fill: float) -> str:
    """A copy of the initializer `name`, its last axis padded with `fill` up to `width`."""
    value = numpy_helper.to_array(graph.initializers[name])
    if value.ndim == 0:  # one scale or zero point for the whole matrix
        return name
    if f"{name}{PADDED}" not in graph.initializers:  # a weight two GEMMs read is padded once
        padding = [(0, 0)] * (value.ndim - 1) + [(0, width - value.shape[-1])]
        graph.add_initializer(f"{name}{PADDED}", np.pad(value, padding, constant_values=fill), exact_name=True)
    return f"{name}{PADDED}"


def _slice_to(graph: Graph, tensor: str, output: str, columns: int) -> onnx.NodeProto:
    starts = graph.add_initializer("slice_starts", np.array([0], np.int64))
    ends = graph.add_initializer("slice_ends", np.array([columns], np.int64))
    axes = graph.add_initializer("slice_axes", np.array([-1], np.int64))
    return graph.make_node("Slice", [tensor, starts, ends, axes], [output], name=f"{tensor}_unpad")


def _after_scaling(graph: Graph, integer: onnx.NodeProto) -> onnx.NodeProto:
    """Where the padded columns are cut off: after MatMulInteger -> Cast -> Mul(scale), the
    pattern ONNX Runtime fuses into one kernel, before the bias Add (the bias has N columns)."""
    cast = graph.only_consumer(integer.output[0])
    if cast is not None and cast.op_type == "Cast":
        scaled = graph.only_consumer(cast.output[0])
        if scaled is not None and scaled.op_type == "Mul":
            return scaled
    return integer


def pad_integer_widths(graph: Graph) -> PassResult:
    result = PassResult("integer widths")
    details = {"gemms_padded": 0, "columns_added": 0}
    # (op, weight input, per-column inputs and their fill)
    kinds = {"MatMulIntegerToFloat": (1, ((3, 1.0), (5, 0), (6, 0))), "MatMulInteger": (1, ((3, 0),))}
    for node in graph.each_once(lambda n: n.op_type in kinds):
        weight_index, per_column = kinds[node.op_type]
        weight = graph.initializers.get(node.input[weight_index])
        if weight is None or len(weight.dims) != 2 or weight.name.endswith(PADDED):
            continue
        columns = int(weight.dims[1])
        width = _padded_width(columns)
        if width == columns:
            continue
        node.input[weight_index] = _pad_columns(graph, weight.name, width, 0)
        for index, fill in per_column:
            if index < len(node.input) and node.input[index] in graph.initializers:
                node.input[index] = _pad_columns(graph, node.input[index], width, fill)
        last = node if node.op_type == "MatMulIntegerToFloat" else _after_scaling(graph, node)
        output = last.output[0]
        last.output[0] = graph.unique(f"{output}_padded")
        graph.graph.node.append(_slice_to(graph, last.output[0], output, columns))
        graph.refresh()
        details["gemms_padded"] += 1
        details["columns_added"] += width - columns
    if details["gemms_padded"]:  # a graph with nothing to pad is left as it came
        graph.toposort()  # each Slice after its GEMM (remove_dead reads the nodes in order)
        graph.remove_dead()  # the unpadded weights nothing reads now
    result.fused = details["gemms_padded"]
    result.details = details
    return result


def unpad_integer_widths(graph: Graph) -> PassResult:
    """The padded MatMulIntegerToFloat of an ort graph back to its own width, the Slice gone."""
    result = PassResult("integer widths")
    details = {"gemms_unpadded": 0}
    for node in graph.each_once(lambda n: n.op_type == "MatMulIntegerToFloat" and n.input[1].endswith(PADDED)):
        cut = graph.only_consumer(node.output[0])
        if cut is None or cut.op_type != "Slice":
            result.unmatched.append(f"{node.name}: a padded weight without its Slice")
            continue
        columns = int(graph.constant(cut.input[2]).reshape(()))  # type: ignore[union-attr]
        for index, name in enumerate(node.input):
            if name.endswith(PADDED):
                value = numpy_helper.to_array(graph.initializers[name])[..., :columns]
                original = name[: -len(PADDED)]
                if original not in graph.initializers:
                    graph.add_initializer(original, np.ascontiguousarray(value), exact_name=True)
                graph.set_input(node, index, original)
        output = cut.output[0]
        graph.replace([cut], [])
        graph.set_output(node, 0, output)
        details["gemms_unpadded"] += 1
    if details["gemms_unpadded"]:
        graph.remove_dead()  # the padded copies
    result.fused = details["gemms_unpadded"]
    result.details = details
    return result


# The int8-dynamic graph is the ort flavour's only: the padding is never taken off there. The
# static INT8 graph pads and unpads as part of passes/integer_matmul.py.
INTEGER_WIDTHS = GraphPass("integer_widths", {Flavour.ORT: pad_integer_widths})
