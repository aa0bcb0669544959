"""int8: Model Optimizer's ONNX quantizer: explicit, symmetric QuantizeLinear/DequantizeLinear
(zero point 0, as TensorRT requires), calibrated; LayerNorm and Softmax get no Q/DQ, and the
residual stream reads full precision (btdeploy/optimize/passes/qdq_islands.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.onnx_files import graph_bytes, needs_external_data
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
from btdeploy.optimize.passes.qdq_islands import QDQ_ISLANDS
from btdeploy.quantize.calibration import CalibrationReader
from btdeploy.quantize.modelopt_env import require_modelopt

# What is not INT8: TensorRT runs it in FP16; ONNX Runtime's CPU provider wants FP32.
HIGH_PRECISION = {Flavour.TRT: "fp16", Flavour.TRT_COMPAT: "fp16", Flavour.ORT: "fp32"}


def modelopt_int8(
    source: Path, feeds: dict[str, np.ndarray], workdir: Path, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    require_modelopt()
    from modelopt.onnx.quantization import quantize

    high_precision = HIGH_PRECISION[flavour]
    attention_matmuls = _activation_matmuls(onnx.load(str(source), load_external_data=False))
    output = workdir / "int8.onnx"
    quantize(
        str(source),
        quantize_mode="int8",
        # One row per calibration run, with progress (calibration_shapes would make Model
        # Optimizer run ONNX shape inference, which stops at com.microsoft operators).
        calibration_data_reader=CalibrationReader(feeds, f"calibrating {source.stem} (int8)"),
        calibration_eps=["cpu"],
        # The GEMMs hold nearly all the compute (the attention matmuls are inside the fused
        # Attention nodes); Q/DQ anywhere else would cost conversions and accuracy for no gain.
        op_types_to_quantize=["MatMul"],
        # The attention core (Q.K^T and P.V, activation x activation) stays in high precision in every
        # flavour: in ort and trt graphs it is inside the Attention operator; trt-compat keeps it
        # as MatMuls, and quantizing the softmax probabilities would cost accuracy for little compute.
        nodes_to_exclude=attention_matmuls or None,
        # The same attention MatMuls, named by Model Optimizer's own pattern match, without the
        # inference it otherwise runs to decide per block (on base trt-compat, minutes).
        disable_mha_qdq=True,
        op_types_to_exclude=list(FULL_PRECISION_OPS),
        op_types_to_exclude_fp16=list(FULL_PRECISION_OPS),
        high_precision_dtype=high_precision,
        dq_only=True,  # weights stored as int8 with a DequantizeLinear: a quarter of the bytes
        use_external_data_format=needs_external_data(graph_bytes(source)),
        output_path=str(output),
        log_level="ERROR",
    )
    if not output.is_file():
        raise BtDeployError(f"Model Optimizer wrote no INT8 model for {source}: see its log above")
    graph = Graph(onnx.load(str(output)))
    restored = QDQ_ISLANDS.run(graph, flavour)
    model = graph.model
    options = {
        "tool": "modelopt.onnx.quantization",
        "op_types_quantized": ["MatMul"],
        "full_precision_inputs_restored": restored.fused,
        "mode": "int8 explicit Q/DQ, symmetric",
        "calibration_method": "entropy (Model Optimizer's int8 default)",
        "calibration_rows": len(next(iter(feeds.values()))),
        "op_types_excluded": list(FULL_PRECISION_OPS),
        "attention_matmuls_excluded": len(attention_matmuls),
        "high_precision": high_precision,
    }
    return model, options


def _activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose second operand is not a stored weight: the attention core."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in constants]


def int8_from_twin(
    model: onnx.ModelProto, made_for: Flavour, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]] | None:
    """The INT8 graph of `flavour` from the one calibrated for `made_for` on the same source graph:
    the same Q/DQ, with the high-precision part converted the way Model Optimizer converts it after
    calibrating (its convert_to_f16, the full-precision operators kept in FP32). Only FP32 -> FP16."""
    have, want = HIGH_PRECISION[made_for], HIGH_PRECISION[flavour]
    if have == want:
        return model, {}
    if (have, want) != ("fp32", "fp16"):
        return None
    require_modelopt()
    from modelopt.onnx.autocast.convert import convert_to_f16

    converted = convert_to_f16(
        model, low_precision_type="fp16", keep_io_types=True, op_block_list=list(FULL_PRECISION_OPS)
    )
    graph = Graph(converted)
    restored = QDQ_ISLANDS.run(graph, flavour)
    # The residual inputs were restored in the twin (its record's count stands); the conversion adds none.
    return graph.model, {
        "high_precision": want,
        "converted_from": f"{made_for} int8",
        "restored_after_conversion": restored.fused,
    }
