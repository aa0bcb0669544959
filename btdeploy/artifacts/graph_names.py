"""The vocabulary of graphs on disk: flavours (graph dialects), precisions, and file names.

Every module that names a graph reads these: a flavour or precision is never a loose string.
"""

from __future__ import annotations

from enum import StrEnum

from btdeploy.errors import BtDeployError


class Flavour(StrEnum):
    """The dialect an optimized graph is written in, for the runtime that consumes it."""

    ORT = "ort"  # ONNX Runtime: standard operators plus com.microsoft contrib operators
    TRT = "trt"  # TensorRT 10.14+: standard ONNX only, attention as the ONNX Attention operator (opset 23)
    # TensorRT 10.3+ (JetPack 6): standard ONNX at opset <= 20, attention kept as the canonical
    # MatMul -> (mask Add) -> Softmax -> MatMul with the scale on Q, which TensorRT fuses itself.
    TRT_COMPAT = "trt-compat"

    @property
    def standard_only(self) -> bool:
        """Whether its graphs hold standard ONNX operators only (what Model Optimizer reads)."""
        return self is not Flavour.ORT


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # computed in, never stored in: a bf16 run (PyTorch, OpenVINO) reads the FP32 graph
    INT8 = "int8"
    INT8_DYNAMIC = "int8-dynamic"


STEMS = ("model", "text", "vision", "fusion")  # the whole head, then its split graphs


def parse_flavour(value: str | Flavour | None, option: str = "--flavour") -> Flavour | None:
    if value is None or isinstance(value, Flavour):
        return value
    try:
        return Flavour(value)
    except ValueError:
        raise BtDeployError(f"{option} {value!r}: choose one of {', '.join(f.value for f in Flavour)}") from None


def parse_precision(value: str | Precision, option: str = "--precision") -> Precision:
    if isinstance(value, Precision):
        return value
    try:
        return Precision(value)
    except ValueError:
        raise BtDeployError(f"{option} {value!r}: choose one of {', '.join(p.value for p in Precision)}") from None


# Precisions an engine computes in from the FP32 graph (OpenVINO's inference precision, the PyTorch
# reference cast to it): no step writes a graph in them.
COMPUTED_ONLY = frozenset({Precision.BF16})


def stored_precision(precision: Precision) -> Precision:
    """The precision of the graph a run at `precision` reads."""
    return Precision.FP32 if precision in COMPUTED_ONLY else precision


def graph_file(flavour: Flavour | None, precision: Precision = Precision.FP32, stem: str = "model") -> str:
    """<stem>.onnx (the export), <stem>.<flavour>.onnx (optimize), <stem>.<flavour>.<precision>.onnx (quantize).

    The stem is `model` for the whole head, or `text`, `vision`, `fusion` for its split graphs.
    A precision no graph is stored in (bf16) names the FP32 graph, which a run at it reads."""
    precision = stored_precision(precision)
    if flavour is None:
        if precision != Precision.FP32:
            raise BtDeployError(f"a {precision} graph is always an optimized one: name its flavour")
        return f"{stem}.onnx"
    return f"{stem}.{flavour}.onnx" if precision == Precision.FP32 else f"{stem}.{flavour}.{precision}.onnx"


def graph_key(flavour: Flavour | None, precision: Precision = Precision.FP32) -> str:
    """plain, ort, trt, ort.int8, ...: how reports name a graph of a head."""
    if flavour is None:
        return "plain"
    return str(flavour) if precision == Precision.FP32 else f"{flavour}.{precision}"
