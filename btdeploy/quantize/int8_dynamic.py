"""int8-dynamic: ONNX Runtime's dynamic quantization of the MatMul weights (activations are
quantized at run time), for CPU-only edge boxes. ONNX Runtime only; TensorRT cannot run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.onnx_files import graph_bytes, load_graph, needs_external_data
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.integer_width import INTEGER_WIDTHS
from btdeploy.quantize.rows import CalibrationRows


def dynamic_int8(
    source: Path, feeds: CalibrationRows, workdir: Path, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = workdir / "int8-dynamic.onnx"
    # One scale per weight matrix: on base itm at batch 4, length 40 it ran 2.06 s against
    # 2.24 s per output channel, with logits as close to FP32 (cosine 0.99990 against 0.99979).
    quantize_dynamic(
        str(source),
        str(output),
        op_types_to_quantize=["MatMul"],
        per_channel=False,
        weight_type=QuantType.QInt8,
        use_external_data_format=needs_external_data(graph_bytes(source)),
        # The com.microsoft nodes defeat ONNX shape inference; every tensor here is FP32.
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    model = load_graph(output, "quantize again")
    graph = Graph(model)
    padded = INTEGER_WIDTHS.run(graph, flavour)  # integer GEMMs at widths ONNX Runtime's AMX kernel gets right
    model = graph.model
    options = {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "op_types": ["MatMul"],
        "weights": "int8, one scale per matrix",
        "activations": "uint8, quantized at run time",
        "integer_widths": padded.details,
    }
    return model, options
