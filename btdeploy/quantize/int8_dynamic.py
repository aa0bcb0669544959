"""int8-dynamic: ONNX Runtime's dynamic quantization of the MatMul weights (activations are
quantized at run time), for CPU-only edge boxes. ONNX Runtime only; TensorRT cannot run it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.onnx_files import load_graph
from btdeploy.artifacts.weightless import infer_shapes_without_weights
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.integer_width import INTEGER_WIDTHS
from btdeploy.quantize.onnx_stand_in import OnnxModuleSeenBy
from btdeploy.quantize.rows import CalibrationRows
from btdeploy.swaps import replaced


def dynamic_int8(
    source: Path, feeds: CalibrationRows, workdir: Path, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # One scale per weight matrix: on base itm at batch 4, length 40 it ran 2.06 s against
    # 2.24 s per output channel, with logits as close to FP32 (cosine 0.99990 against 0.99979).
    with _quantized_in_memory(source) as quantized:
        quantize_dynamic(
            str(source),
            str(workdir / "int8-dynamic.onnx"),  # not written: the model is handed over
            op_types_to_quantize=["MatMul"],
            per_channel=False,
            weight_type=QuantType.QInt8,
            # The com.microsoft nodes defeat ONNX shape inference; every tensor here is FP32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    model = quantized[0]
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


@contextmanager
def _quantized_in_memory(source: Path) -> Iterator[list[onnx.ModelProto]]:
    """For one quantize_dynamic call, the graph read once and the result handed over. ONNX
    Runtime's own reads the source by shape-inferring it into a new file and loading that, its
    quantizer writes a deep copy with external data and reads it back for the value infos, and
    the result is written for btdeploy to read back: on base each is the 1.3 GB of weights
    written or read again. Here the source is read by load_graph and shape-inferred without its
    weights, in place (which also answers the quantizer's value infos), and the model its save
    would write is put in the list yielded instead. The graph is the same except that its weights
    are inline without an explicit default data location (ONNX Runtime's reload from a
    weights file sets one)."""
    from onnxruntime.quantization import base_quantizer, onnx_model, onnx_quantizer
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    # By import_module: the package's own name `quantize` is a function.
    quantize_module: Any = importlib.import_module("onnxruntime.quantization.quantize")

    def inferred(model: onnx.ModelProto) -> onnx.ModelProto:
        model = infer_shapes_without_weights(model)
        add_infer_metadata(model)
        return model

    def read(path: Path) -> onnx.ModelProto:
        if path.resolve() != source.resolve():
            raise RuntimeError(f"quantize_dynamic read {path}, not {source}")
        return inferred(load_graph(source, "optimize the head again"))

    quantized: list[onnx.ModelProto] = []
    with replaced(
        (quantize_module, "load_model_with_shape_infer", read),
        (base_quantizer, "save_and_reload_model_with_shape_infer", inferred),
        (onnx_quantizer, "save_and_reload_model_with_shape_infer", inferred),
        (onnx_model, "onnx", _SaveHandedOver(quantized)),
    ):
        yield quantized
    if len(quantized) != 1:
        raise RuntimeError(f"quantize_dynamic saved {len(quantized)} models, not the one btdeploy takes")


class _SaveHandedOver(OnnxModuleSeenBy):
    """The onnx module as ONNX Runtime's ONNXModel sees it: its save_model keeps the model."""

    def __init__(self, kept: list[onnx.ModelProto]) -> None:
        self.kept = kept

    def save_model(self, model: onnx.ModelProto, path: object, *args: Any, **kwargs: Any) -> None:
        self.kept.append(model)
