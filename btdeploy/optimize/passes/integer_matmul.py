"""Each flavour's form of an INT8 weight MatMul (run on quantized graphs).

ONNX Runtime turns DequantizeLinear -> MatMul into its integer GEMM (com.microsoft
MatMulIntegerToFloat) when it loads a Q/DQ graph, but leaves the bias Add after it, a separate
pass over every output (252 Adds a run on base itm). For the ort flavour this pass writes
MatMulIntegerToFloat itself, with the bias in its optional last input: base itm ran 1.04-1.15x
faster with the same outputs on a 2-core Xeon, each graph alone in its own process
(benchmarks/integer_matmul_bias.py).

TensorRT reads Q/DQ only: for the trt flavours the pass raises each MatMulIntegerToFloat back to
DequantizeLinear -> MatMul -> Add (the trt INT8 graph is made from the ort one: quantize/int8.py).
Either way the values are the same: the kernel computes (A - a_zero) x (B - b_zero) x a_scale x
b_scale + bias, which is what the Q/DQ graph says. Output widths that are not a multiple of 16
are padded in the ort form and unpadded in the Q/DQ one (passes/integer_width.py).
"""

from __future__ import annotations

from typing import Any

import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import MS_DOMAIN, GraphPass, PassResult, bias_after
from btdeploy.optimize.passes.integer_width import pad_integer_widths, unpad_integer_widths

INTEGER_MATMUL = "MatMulIntegerToFloat"


def _dequantized(graph: Graph, name: str) -> onnx.NodeProto | None:
    node = graph.producer.get(name)
    return node if node is not None and node.op_type == "DequantizeLinear" and len(node.input) == 3 else None


def lower_to_integer_matmuls(graph: Graph) -> PassResult:
    """DequantizeLinear(activation) x DequantizeLinear(int8 weight) [+ bias] -> MatMulIntegerToFloat."""
    result = PassResult("integer matmuls")
    details = {"integer_matmuls": 0, "biases_folded": 0}
    for matmul in graph.each_once(lambda n: n.op_type == "MatMul"):
        activation, weight = _dequantized(graph, matmul.input[0]), _dequantized(graph, matmul.input[1])
        if activation is None or weight is None:
            result.unmatched.append(f"{matmul.name}: an input is not dequantized")
            continue
        stored = graph.initializers.get(weight.input[0])
        quantize = graph.producer.get(activation.input[0])
        if stored is None or stored.data_type != onnx.TensorProto.INT8 or len(stored.dims) != 2:
            result.unmatched.append(f"{matmul.name}: the weight is not a stored 2-D int8 matrix")
            continue
        if quantize is None or quantize.op_type != "QuantizeLinear":
            result.unmatched.append(f"{matmul.name}: the activation is not quantized in the graph")
            continue
        inputs = [activation.input[0], weight.input[0], activation.input[1], weight.input[1],
                  activation.input[2], weight.input[2]]  # fmt: skip
        remove, output = [matmul], matmul.output[0]
        bias = bias_after(graph, matmul, int(stored.dims[1]))
        if bias is not None:
            add, bias_name = bias
            inputs.append(bias_name)
            remove.append(add)
            output = add.output[0]
            details["biases_folded"] += 1
        # The MatMul's own name: the raised graph gets it back (its Q/DQ names the MatMuls).
        fused = onnx.helper.make_node(INTEGER_MATMUL, inputs, [output], name=matmul.name, domain=MS_DOMAIN)
        graph.replace(remove, [fused])
        details["integer_matmuls"] += 1
    if details["integer_matmuls"]:  # a graph with nothing to lower is left as it came
        graph.remove_dead()  # the DequantizeLinears only those MatMuls read
        graph.set_opset(MS_DOMAIN, 1)
    details.update(pad_integer_widths(graph).details)  # widths ONNX Runtime's AMX kernel gets right
    result.fused = details["integer_matmuls"]
    result.details = details
    return result


def raise_to_qdq(graph: Graph) -> PassResult:
    """MatMulIntegerToFloat -> DequantizeLinear x DequantizeLinear -> MatMul [-> Add bias], one
    DequantizeLinear per quantized tensor, shared by every MatMul that reads it."""
    result = PassResult("integer matmuls")
    details = {"matmuls_raised": 0, "biases_unfolded": 0, **unpad_integer_widths(graph).details}
    dequantized: dict[str, str] = {}
    for fused in graph.each_once(lambda n: n.op_type == INTEGER_MATMUL and n.domain == MS_DOMAIN):
        added: list[onnx.NodeProto] = []
        operands = []
        for tensor, scale, zero, axis in ((fused.input[0], fused.input[2], fused.input[4], None),
                                          (fused.input[1], fused.input[3], fused.input[5], 1)):  # fmt: skip
            if tensor not in dequantized:
                extra: dict[str, Any] = {} if axis is None else {"axis": axis}
                node = graph.make_node("DequantizeLinear", [tensor, scale, zero], [f"{tensor}_DequantizeLinear_Output"],
                                       name=f"{tensor}_DequantizeLinear", **extra)  # fmt: skip
                added.append(node)
                dequantized[tensor] = node.output[0]
            operands.append(dequantized[tensor])
        has_bias = len(fused.input) > 6 and fused.input[6] != ""
        product = graph.unique(f"{fused.name}_product") if has_bias else fused.output[0]
        added.append(onnx.helper.make_node("MatMul", operands, [product], name=fused.name))
        if has_bias:
            # Bias first, as torch exports a Linear: ONNX Runtime's fusions of the Q/DQ graph match it.
            bias_add = graph.make_node("Add", [fused.input[6], product], [fused.output[0]], name=f"{fused.name}_bias")
            added.append(bias_add)
            details["biases_unfolded"] += 1
        graph.replace([fused], added)
        details["matmuls_raised"] += 1
    if details["matmuls_raised"]:
        graph.toposort()  # a shared DequantizeLinear stands where its first reader stood
    result.fused = details["matmuls_raised"]
    result.details = details
    return result


INTEGER_MATMULS = GraphPass(
    "integer_matmuls",
    {Flavour.ORT: lower_to_integer_matmuls, Flavour.TRT: raise_to_qdq, Flavour.TRT_COMPAT: raise_to_qdq},
)
