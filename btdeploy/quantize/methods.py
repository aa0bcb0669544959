"""The quantization methods, each declared once: the precision it makes, the flavours it writes,
the graph it starts from, whether it calibrates, and the function that runs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from btdeploy.artifacts.graph_names import Flavour, Precision
from btdeploy.errors import BtDeployError
from btdeploy.quantize.fp16 import FP16_RANGE_ROWS, autocast_fp16
from btdeploy.quantize.int8 import calibrated_int8, int8_from_twin, int8_twin_converts
from btdeploy.quantize.int8_dynamic import dynamic_int8
from btdeploy.quantize.rows import CalibrationRows

Run = Callable[[Path, CalibrationRows, Path, Flavour], tuple[onnx.ModelProto, dict[str, Any]]]


@dataclass(frozen=True)
class FromTwin:
    """How the graph written for flavour A becomes flavour B's. `converts(A, B)` is asked first, so a
    twin that cannot be converted is never hashed or loaded; `convert(graph, A, B)` returns B's graph
    and what changed."""

    converts: Callable[[Flavour, Flavour], bool]
    convert: Callable[[onnx.ModelProto, Flavour, Flavour], tuple[onnx.ModelProto, dict[str, Any]]]


def _always(made_for: Flavour, flavour: Flavour) -> bool:
    return True


def _same_graph(model: onnx.ModelProto, made_for: Flavour, flavour: Flavour) -> tuple[onnx.ModelProto, dict[str, Any]]:
    return model, {}


@dataclass(frozen=True)
class QuantizeMethod:
    precision: Precision
    flavours: tuple[Flavour, ...]  # the flavours it writes a graph for
    # The optimized graph it starts from where the flavour's own graph will not do; None: always its own.
    source_flavour: Flavour | None
    source_reason: str  # why
    calibrates: bool
    run: Run
    refusal: str = ""  # what to say for a flavour it does not write
    # When two flavours start from one source graph with the same calibration data, how the graph
    # already written for one becomes the other's, instead of calibrating again; None: never.
    from_twin: FromTwin | None = None
    # The most calibration rows it reads; None: every row asked for. Fewer are made and held.
    calibration_rows: int | None = None

    def rows_to_load(self, asked: int) -> int:
        return asked if self.calibration_rows is None else min(asked, self.calibration_rows)

    def source(self, flavour: Flavour) -> tuple[Flavour, str]:
        if self.source_flavour is None or flavour.standard_only:
            return flavour, ""
        return self.source_flavour, self.source_reason


# Model Optimizer's AutoCast reads standard ONNX only (it asks TensorRT for the types of other
# operators). So fp16 of the ort flavour starts from the trt graph, which holds the same fusions
# in standard operators (ONNX Runtime fuses its own kernels again when it loads them); the
# standard-only flavours start from their own graph.
_MODELOPT_SOURCE = "Model Optimizer needs standard ONNX operators"
# int8 of the ort flavour starts from the trt graph too: then the ort and trt int8 graphs share one
# calibration and one set of Q/DQ, and the trt one is the ort one with FP16 outside the Q/DQ.
_SHARED_INT8_SOURCE = "the ort and trt int8 graphs share one calibration of the trt graph"

METHODS: dict[Precision, QuantizeMethod] = {
    method.precision: method
    for method in (
        # AutoCast takes no flavour-specific option: the ort and trt fp16 graphs, both made from the
        # trt graph with the same calibration rows, are one graph (on base, 90 s of AutoCast each).
        QuantizeMethod(
            Precision.FP16,
            tuple(Flavour),
            Flavour.TRT,
            _MODELOPT_SOURCE,
            True,
            autocast_fp16,
            from_twin=FromTwin(_always, _same_graph),
            calibration_rows=FP16_RANGE_ROWS,
        ),
        # The ort and trt int8 graphs share their calibration and Q/DQ; only what stays out of INT8
        # differs (FP32 for ONNX Runtime, FP16 for TensorRT).
        QuantizeMethod(
            Precision.INT8,
            tuple(Flavour),
            Flavour.TRT,
            _SHARED_INT8_SOURCE,
            True,
            calibrated_int8,
            from_twin=FromTwin(int8_twin_converts, int8_from_twin),
        ),
        QuantizeMethod(
            Precision.INT8_DYNAMIC,
            (Flavour.ORT,),
            None,
            "",
            False,
            dynamic_int8,
            refusal="int8-dynamic quantizes activations at run time with ONNX Runtime operators TensorRT cannot "
            "parse: use --flavour ort, or --precision int8 for TensorRT",
        ),
    )
}
PRECISIONS = tuple(METHODS)  # what `btdeploy quantize` makes


def get_method(precision: Precision | str, flavour: Flavour) -> QuantizeMethod:
    method = next((m for p, m in METHODS.items() if p == precision), None)
    if method is None:
        raise BtDeployError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if flavour not in method.flavours:
        raise BtDeployError(method.refusal or f"--precision {precision} is not written for --flavour {flavour}")
    return method


def quantized_graphs() -> list[tuple[Flavour, Precision]]:
    """Every (flavour, precision) graph quantize can write, flavour by flavour."""
    return [(flavour, p) for flavour in Flavour for p, m in METHODS.items() if flavour in m.flavours]
