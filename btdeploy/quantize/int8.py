"""int8: explicit, symmetric QuantizeLinear/DequantizeLinear on the activation input of every weight
MatMul, with per-channel INT8 weights stored as int8 behind a DequantizeLinear; calibrated by entropy,
one row at a time (btdeploy/quantize/tensor_ranges.py). Activations are stored in the flavour's code
(`ACTIVATION_CODE`): int8 with zero point 0 for TensorRT, uint8 with zero point 128 for ONNX Runtime,
the same values either way.

It writes the graph Model Optimizer's INT8 quantizer writes with the options btdeploy used to give it
(MatMul only, entropy calibration, the attention core and LayerNorm/Softmax left out, weights as
int8: tests/quantize/test_int8_static.py compares the two), but holds one copy of the graph instead of
about ten: on base, 17.6 GB and three minutes for one head became a few GB and well under a minute.
Only MatMuls read the rounded copy of an activation; the residual stream and the normalisations
read full precision (btdeploy/optimize/passes/qdq_islands.py checks it again)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.onnx_files import load_graph
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
from btdeploy.optimize.passes.base import PassResult
from btdeploy.optimize.passes.integer_matmul import INTEGER_MATMULS
from btdeploy.optimize.passes.qdq_islands import QDQ_ISLANDS
from btdeploy.optimize.passes.quantized_layernorm import QUANTIZED_LAYERNORMS
from btdeploy.quantize.modelopt_env import lean_conversion, require_modelopt
from btdeploy.quantize.rows import CalibrationRows
from btdeploy.quantize.tensor_ranges import entropy_ranges

# What is not INT8: TensorRT runs it in FP16; ONNX Runtime's CPU provider wants FP32.
HIGH_PRECISION = {Flavour.TRT: "fp16", Flavour.TRT_COMPAT: "fp16", Flavour.ORT: "fp32"}


@dataclass(frozen=True)
class ActivationCode:
    """How a flavour stores a rounded activation. Every code holds the same values, [-128, 127] steps
    of the scale: only the integer type and the zero point's offset differ (uint8 = int8 + 128)."""

    data_type: int  # onnx.TensorProto element type
    zero_point: int

    def zero(self, name: str) -> onnx.TensorProto:
        """The zero point as the initializer `name`."""
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.data_type)
        return numpy_helper.from_array(np.array(self.zero_point, dtype=dtype), name)

    def describe(self) -> str:
        return f"{onnx.helper.tensor_dtype_to_np_dtype(self.data_type)}, zero point {self.zero_point}"


SIGNED = ActivationCode(onnx.TensorProto.INT8, 0)
# TensorRT takes int8 with zero point 0 only. ONNX Runtime's x86 integer GEMMs read unsigned
# activations (U8S8): it re-codes a signed pair itself only where one MatMul reads it, so the
# Q/K/V projections, which share one rounded input, ran as DequantizeLinear + FP32 MatMul (135 of
# 276 MatMuls on base itm; signed inputs allowed instead, its S8S8 fallback took 1.8 s a run).
ACTIVATION_CODE = {
    Flavour.TRT: SIGNED,
    Flavour.TRT_COMPAT: SIGNED,
    Flavour.ORT: ActivationCode(onnx.TensorProto.UINT8, 128),
}
# Model Optimizer's rule for TensorRT: a MatMul with M or N of 1 (a GEMV), or K or N under 16,
# gains nothing from INT8 tensor cores and runs slower with Q/DQ around it.
MIN_GEMM_DIM = 16
INT8_LIMIT = 127  # symmetric: [-127, 127], zero point 0


@dataclass
class QuantizedMatMul:
    node: onnx.NodeProto
    activation: str  # the tensor that gets a Q/DQ pair
    weight: str  # the initializer stored as int8 behind a DequantizeLinear


@dataclass
class Int8Plan:
    matmuls: list[QuantizedMatMul] = field(default_factory=list)
    attention_matmuls: int = 0  # activation x activation: the attention core stays in high precision
    left_out: Counter[str] = field(default_factory=Counter)  # why -> how many weight MatMuls


def calibrated_int8(
    source: Path, feeds: CalibrationRows, workdir: Path, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    calibrated = entropy_ranges(source, _activations, feeds, source.stem)
    model = load_graph(source, "optimize the head again")  # the session is gone: the one copy of the weights held
    plan = _plan(model)
    _leave_out_small_gemms(plan, calibrated.shapes, model)
    code = ACTIVATION_CODE[flavour]
    counts = _insert_qdq(model, plan, calibrated.ranges, code)
    graph = Graph(model)
    restored = QDQ_ISLANDS.run(graph, flavour)
    options: dict[str, Any] = {
        "tool": "btdeploy int8 (entropy calibration by ONNX Runtime's histogram collector, one row at a time)",
        "op_types_quantized": ["MatMul"],
        "full_precision_inputs_restored": restored.fused,
        "mode": "int8 explicit Q/DQ, symmetric",
        "calibration_method": "entropy",
        "calibration_rows": len(feeds),
        "attention_matmuls_excluded": plan.attention_matmuls,
        "matmuls_left_out": dict(plan.left_out),
        **counts,
        "high_precision": "fp32",
        "activations": code.describe(),
    }
    # FP32 around the Q/DQ, as the ort flavour has it; the twin conversion gives the graph this
    # flavour's high precision (its activation code is already this flavour's).
    model, changed = int8_from_twin(graph.model, Flavour.ORT, flavour)
    return model, {**options, **changed}


def _activations(model: onnx.ModelProto) -> list[str]:
    """The tensors calibration measures: the activation input of every MatMul that gets INT8."""
    return sorted({m.activation for m in _plan(model).matmuls})


def _plan(model: onnx.ModelProto) -> Int8Plan:
    """The MatMuls that get INT8: those whose second operand is a stored FP32 matrix."""
    weights = {t.name: t for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    plan = Int8Plan()
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = weights.get(node.input[1])
        if weight is None:
            if node.input[1] in constants:
                plan.left_out["weight in a Constant node"] += 1
            else:
                plan.attention_matmuls += 1
            continue
        if weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2:
            plan.left_out["weight not a 2-D FP32 matrix"] += 1
            continue
        plan.matmuls.append(QuantizedMatMul(node, node.input[0], node.input[1]))
    return plan


def _leave_out_small_gemms(plan: Int8Plan, shapes: dict[str, tuple[int, ...]], model: onnx.ModelProto) -> None:
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    kept = []
    for matmul in plan.matmuls:
        rows = shapes[matmul.activation]  # [..., M, K]; the output is [..., M, N]
        k, n = dims[matmul.weight]
        output = (*rows[:-1], n)
        if len(output) < 3 and 1 in output:
            why = "GEMV (M or N is 1)"
        elif n < MIN_GEMM_DIM or k < MIN_GEMM_DIM:
            why = f"K or N under {MIN_GEMM_DIM}"
        else:
            kept.append(matmul)
            continue
        plan.left_out[why] += 1
    plan.matmuls = kept


def _insert_qdq(
    model: onnx.ModelProto, plan: Int8Plan, ranges: dict[str, tuple[np.ndarray, np.ndarray]], code: ActivationCode
) -> dict[str, int]:
    """One Q/DQ pair per activation tensor, shared by the MatMuls that read it; one DequantizeLinear
    per weight, whose initializer becomes int8 in place (the FP32 bytes are released one by one)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    quantized_readers = Counter(matmul.weight for matmul in plan.matmuls)
    added: dict[str, list[onnx.NodeProto]] = {}  # tensor -> the Q/DQ nodes to place right after its producer
    dequantized: dict[str, str] = {}
    for matmul in plan.matmuls:
        if matmul.activation not in dequantized:
            dequantized[matmul.activation] = _activation_qdq(graph, matmul.activation, ranges, code, added)
        if matmul.weight not in dequantized:
            shared = readers[matmul.weight] > quantized_readers[matmul.weight]
            dequantized[matmul.weight] = _weight_dq(graph, initializers[matmul.weight], shared, added)
        matmul.node.input[0] = dequantized[matmul.activation]
        matmul.node.input[1] = dequantized[matmul.weight]
    _place(graph, added)
    return {
        "matmuls_quantized": len(plan.matmuls),
        "activation_qdq_pairs": len({m.activation for m in plan.matmuls}),
        "weights_int8": len({m.weight for m in plan.matmuls}),
    }


def _activation_qdq(
    graph: onnx.GraphProto, tensor: str, ranges: dict[str, tuple[np.ndarray, np.ndarray]], code: ActivationCode,
    added: dict[str, list[onnx.NodeProto]],
) -> str:  # fmt: skip
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    if tensor not in ranges:
        raise BtDeployError(f"calibration gave no range for {tensor}: its graph output was not produced")
    lowest, highest = ranges[tensor]
    # The scale of the signed grid; every code holds that grid, at its own zero point.
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.INT8, symmetric=True)
    _, scale = compute_scale_zp(lowest, highest, qmin, qmax, symmetric=True)
    scale_name, zero_name = f"{tensor}_scale", f"{tensor}_zero_point"
    graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, dtype=np.float32), scale_name),
                              code.zero(zero_name)])  # fmt: skip
    quantized, output = f"{tensor}_QuantizeLinear_Output", f"{tensor}_DequantizeLinear_Output"
    added.setdefault(tensor, []).extend([
        onnx.helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [quantized],
                              f"{tensor}_QuantizeLinear"),
        onnx.helper.make_node("DequantizeLinear", [quantized, scale_name, zero_name], [output],
                              f"{tensor}_DequantizeLinear"),
    ])  # fmt: skip
    return output


def _weight_dq(
    graph: onnx.GraphProto, weight: onnx.TensorProto, shared: bool, added: dict[str, list[onnx.NodeProto]]
) -> str:
    values, scale = quantize_weight(numpy_helper.to_array(weight))
    # A weight that something else reads in FP32 keeps its FP32 copy; the int8 one gets its own name.
    name = f"{weight.name}_quantized" if shared else weight.name
    stored = numpy_helper.from_array(values, name)
    if shared:
        graph.initializer.append(stored)
    else:
        weight.CopyFrom(stored)
    scale_name, zero_name = f"{weight.name}_scale", f"{weight.name}_zero_point"
    graph.initializer.extend([
        numpy_helper.from_array(scale, scale_name),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), zero_name),
    ])  # fmt: skip
    output = f"{weight.name}_DequantizeLinear_Output"
    added.setdefault("", []).append(
        onnx.helper.make_node("DequantizeLinear", [name, scale_name, zero_name], [output],
                              f"{weight.name}_DequantizeLinear", axis=1)
    )  # fmt: skip
    return output


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (axis 1 of a [K, N] MatMul weight), symmetric over [-127, 127]: the scale as
    ONNX Runtime computes it (twice the channel's absolute maximum over 254, in float64, stored as
    float32; 1 for an all-zero channel) and the values as Model Optimizer rounds them (float32
    division, round half to even)."""
    low = np.minimum(weight.min(axis=0), np.float32(0))
    high = np.maximum(weight.max(axis=0), np.float32(0))
    absmax = np.maximum(np.abs(low), np.abs(high))
    span = (absmax - (-absmax)).astype(np.float64)
    scale = (span / np.float64(2 * INT8_LIMIT)).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = np.float32(1.0)
    values = np.clip(np.round(weight / scale[np.newaxis, :]), -128, 127).astype(np.int8)
    return values, scale


def _place(graph: onnx.GraphProto, added: dict[str, list[onnx.NodeProto]]) -> None:
    """The new nodes into the node list in topological order: weight DequantizeLinears and the
    pairs on graph inputs first, every other pair right after the node that makes its tensor."""
    inputs = {i.name for i in graph.input}
    first = list(added.get("", [])) + [n for name, nodes in added.items() if name in inputs for n in nodes]
    ordered = list(first)
    for node in graph.node:
        ordered.append(node)
        for name in node.output:
            ordered.extend(added.get(name, []))
    del graph.node[:]
    graph.node.extend(ordered)


def int8_twin_converts(made_for: Flavour, flavour: Flavour) -> bool:
    """Whether `flavour`'s INT8 graph can be made from the one calibrated for `made_for`: the same
    high precision outside the Q/DQ, or FP32 to FP16 (never back)."""
    have, want = HIGH_PRECISION[made_for], HIGH_PRECISION[flavour]
    return have == want or (have, want) == ("fp32", "fp16")


def int8_flavour_form(graph: Graph, flavour: Flavour) -> dict[str, PassResult]:
    """The flavour's form of an INT8 graph, in place: for ort, ONNX Runtime's integer GEMM with its
    bias and SkipLayerNormalization for the Add + LayerNorm pairs; for the trt flavours, Q/DQ and
    Add -> LayerNormalization (written back from an ort twin)."""
    integer_matmuls = INTEGER_MATMULS.run(graph, flavour)
    return {"integer_matmuls": integer_matmuls, "skip_layernorms": QUANTIZED_LAYERNORMS.run(graph, flavour)}


def int8_from_twin(
    model: onnx.ModelProto, made_for: Flavour, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The INT8 graph of `flavour` from the one calibrated for `made_for` on the same source graph:
    the same Q/DQ in `flavour`'s activation code, with the high-precision part converted the way
    Model Optimizer converts it after calibrating (its convert_to_f16, the full-precision operators
    kept in FP32). Only where `int8_twin_converts`."""
    have, want = HIGH_PRECISION[made_for], HIGH_PRECISION[flavour]
    if have != want and not int8_twin_converts(made_for, flavour):
        raise ValueError(f"an int8 graph with {have} outside the Q/DQ cannot become one with {want}")
    integer = Graph(model)
    forms = int8_flavour_form(integer, flavour)
    model = integer.model
    recoded = encode_activations(model, flavour)
    changed: dict[str, Any] = {"activations": ACTIVATION_CODE[flavour].describe()} if recoded else {}
    changed.update({key: {"form": form.name, **form.details} for key, form in forms.items() if form.fused})
    if have == want:
        return model, changed
    require_modelopt()
    from modelopt.onnx.autocast.convert import convert_to_f16

    with lean_conversion():
        converted = convert_to_f16(
            model, low_precision_type="fp16", keep_io_types=True, op_block_list=list(FULL_PRECISION_OPS)
        )
    graph = Graph(converted)
    restored = QDQ_ISLANDS.run(graph, flavour)
    # The residual inputs were restored in the twin (its record's count stands); the conversion adds none.
    return graph.model, {
        **changed,
        "high_precision": want,
        "converted_from": f"{made_for} int8",
        "restored_after_conversion": restored.fused,
    }


def encode_activations(model: onnx.ModelProto, flavour: Flavour) -> int:
    """Every activation Q/DQ pair in `flavour`'s code, in place; how many zero points changed. The
    pair shares its zero point, so the stored values change with it and the dequantized ones stay."""
    want = ACTIVATION_CODE[flavour]
    codes = {code.data_type: code for code in ACTIVATION_CODE.values()}
    names = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    changed = 0
    for tensor in model.graph.initializer:
        if tensor.name not in names or tensor.data_type == want.data_type:
            continue
        have = codes.get(tensor.data_type)
        value = numpy_helper.to_array(tensor)
        if have is None or value.size != 1 or int(value.reshape(())) != have.zero_point:
            raise ValueError(f"activation zero point {tensor.name} is not a known symmetric code: {value}")
        tensor.CopyFrom(want.zero(tensor.name))
        changed += 1
    return changed
