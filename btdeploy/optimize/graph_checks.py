"""Checks on any graph btdeploy writes: FP16-unsafe constants, Q/DQ placement, FP32 islands."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from btdeploy.errors import BtDeployError

FP16_MAX = 65504.0
# Operators that compute in full precision in every reduced-precision graph and whose inputs are
# never quantized: normalisation and softmax need the full range of their inputs (a mean and
# variance, or an exponent, over them).
FULL_PRECISION_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax")
LAYERNORM_OPS = ("LayerNormalization", "SkipLayerNormalization")


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant by the name it is read under: initializers, Constant and ConstantOfShape values."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0] or node.name] = attribute.t
    return tensors


def _float_constants(model: onnx.ModelProto) -> Iterator[tuple[str, np.ndarray]]:
    """Every floating-point constant with its value."""
    for name, tensor in _constant_tensors(model).items():
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
                continue  # weights left on disk (a .data file, or a graph read without them): trained values, not masks
            yield name, numpy_helper.to_array(tensor)


def fp16_unsafe_constants(model: onnx.ModelProto) -> list[str]:
    """Constants that are infinite, NaN, or beyond FP16's range (they become +-inf once cast).

    A mask built from such a constant (finfo(float32).min, -inf) turns into -inf in FP16 and
    then NaN wherever a whole row is masked; btdeploy's graphs use a finite -10000 instead."""
    unsafe = []
    for name, values in _float_constants(model):
        if values.size == 0:
            continue
        if not np.isfinite(values).all() or float(np.abs(values).max()) > FP16_MAX:
            unsafe.append(name)
    return unsafe


def require_fp16_safe(model: onnx.ModelProto, what: str) -> None:
    unsafe = fp16_unsafe_constants(model)
    if unsafe:
        shown = ", ".join(unsafe[:5]) + (f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
        raise BtDeployError(
            f"{what} has constants that are infinite or overflow FP16 ({shown}): a mask must use a finite "
            "fill such as -10000; export again with btdeploy (its patches make the mask finite)"
        )


@dataclass
class QdqSummary:
    pairs: int = 0  # QuantizeLinear nodes (each read by its DequantizeLinear, or by integer MatMuls)
    dequantize_only: int = 0  # stored int8 weights read: behind a DequantizeLinear, or by an integer MatMul
    asymmetric: list[str] = field(default_factory=list)  # zero points off the code's midpoint
    wrong_type: list[str] = field(default_factory=list)  # weights not int8, activations not in the code
    quantized_no_qdq_ops: list[str] = field(default_factory=list)  # LayerNorm/Softmax fed by a DQ
    quantized_matmuls: int = 0  # both inputs dequantized
    unquantized_matmuls: list[str] = field(default_factory=list)  # left in high precision by the quantizer


def qdq_summary(
    model: onnx.ModelProto, activation_type: int = onnx.TensorProto.INT8, activation_zero_point: int = 0
) -> QdqSummary:
    """Count Q/DQ and check them: weights int8 with zero point 0 (what TensorRT requires, and ONNX
    Runtime's signed weights), activations in the flavour's code (int8 and 0 for TensorRT)."""
    summary = QdqSummary()
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = _constant_tensors(model)
    int8_weights: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "MatMul":
            fed = [producers[i].op_type if i in producers else "" for i in node.input]
            if fed == ["DequantizeLinear", "DequantizeLinear"]:
                summary.quantized_matmuls += 1
            else:
                summary.unquantized_matmuls.append(node.name)
        if node.op_type == "MatMulIntegerToFloat":  # the ort flavour's form (passes/integer_matmul.py)
            summary.quantized_matmuls += 1
            int8_weights.add(node.input[1])
            stored = constants.get(node.input[1])
            if stored is None or stored.data_type != onnx.TensorProto.INT8:
                summary.wrong_type.append(node.name)
            _check_zero_point(summary, node.name, constants.get(node.input[4]), activation_type, activation_zero_point)
            _check_zero_point(summary, node.name, constants.get(node.input[5]), onnx.TensorProto.INT8, 0)
            continue
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            if node.op_type in FULL_PRECISION_OPS:
                fed = [i for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]
                if fed:
                    summary.quantized_no_qdq_ops.append(node.name or node.op_type)
            continue
        weight = node.op_type == "DequantizeLinear" and node.input[0] not in producers
        if node.op_type == "QuantizeLinear":
            summary.pairs += 1
        elif weight:
            int8_weights.add(node.input[0])
        want_type, want_zero = (onnx.TensorProto.INT8, 0) if weight else (activation_type, activation_zero_point)
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        _check_zero_point(summary, node.name, zero_point, want_type, want_zero)
    summary.dequantize_only = len(int8_weights)
    return summary


def _check_zero_point(
    summary: QdqSummary, node: str, zero_point: onnx.TensorProto | None, want_type: int, want_zero: int
) -> None:
    """A zero point of the wanted type and value, or the node listed under what is wrong."""
    if zero_point is None:
        summary.wrong_type.append(node)  # no zero point means uint8 and 0
        return
    if zero_point.data_type != want_type:
        summary.wrong_type.append(node)
    if np.any(numpy_helper.to_array(zero_point).astype(np.int64) != want_zero):
        summary.asymmetric.append(node)


def layernorm_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of each LayerNorm's scale: the type the whole normalisation computes in."""
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    types: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in LAYERNORM_OPS:
            scale = node.input[2] if node.op_type == "SkipLayerNormalization" else node.input[1]
            types[node.name] = initializers.get(scale, onnx.TensorProto.UNDEFINED)
    return types
