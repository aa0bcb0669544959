"""NVIDIA Model Optimizer, imported lazily: fp16 and int8 need it, int8-dynamic does not."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from btdeploy.artifacts.weightless import (
    check_without_weights,
    infer_shapes_without_weights,
    weightless_copy,
    with_structure_of,
)
from btdeploy.errors import BtDeployError
from btdeploy.quantize.redundant_casts import remove_redundant_casts
from btdeploy.signals import interrupts_deferred
from btdeploy.swaps import replaced


def require_modelopt() -> None:
    try:
        # AutoCast's modules set their loggers to INFO when first imported, so they are imported
        # here, before the loggers are quieted, not later by the conversion that uses them. They
        # import lief (nanobind), which Ctrl-C mid-import would abort from C++: held till the end.
        with interrupts_deferred():
            import modelopt.onnx.autocast.convert  # noqa: F401
    except ImportError:
        raise BtDeployError(
            "fp16 and int8 need NVIDIA Model Optimizer: pip install 'nvidia-modelopt[onnx]==0.47.0' "
            "(int8-dynamic needs only ONNX Runtime)"
        ) from None
    # AutoCast's reference runs, which btdeploy streams (quantize/fp16.py), are Polygraphy's: a
    # dependency of btdeploy that an environment assembled by hand can lack.
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise BtDeployError(
            "fp16 and int8 need Polygraphy (AutoCast's reference runs): pip install 'polygraphy>=0.49' "
            "(int8-dynamic needs only ONNX Runtime)"
        ) from None
    # Model Optimizer logs every node at INFO (thousands of lines on base); btdeploy prints its own progress.
    for name in ["root", *logging.root.manager.loggerDict]:
        if name == "root" or name.startswith("modelopt"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def lean_conversion() -> Iterator[None]:
    """Model Optimizer, for the duration of one conversion, without its two costs that grow past the
    graph's own: its shape inferences and model checks run on weightless copies of the model
    (btdeploy/artifacts/weightless.py; each otherwise serializes and parses the whole model: on
    base AutoCast, 120 s and 11.6 GB became 42 s and 6.9 GB with btdeploy's streaming reference
    run), and its dead-node cleanup finds the consumed tensors in one pass instead of one scan
    of the graph per node output (quadratic: half of convert_to_f16's time on the unfused
    trt-compat graph), and so does its removal of redundant Casts (btdeploy/quantize/redundant_casts.py).
    Its sanitizer's dead-node cleanup (GraphSurgeon's import and export) and opset upgrade
    (onnxscript's, on the trt-compat graphs' opset 17) copy every weight in and out; neither
    touches a weight, so both run on a weightless copy whose structure the model then takes.
    The graph is the same, byte for byte (tests), except that the Casts of a graph's inputs come
    in the order of their names: AutoCast lists the tensors to cast from a set, whose order
    changes from one Python process to the next, so a graph with two float inputs (the split
    fusion graph's text and image states) came out in either order."""
    import modelopt.onnx.utils as modelopt_utils
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    with replaced(
        (modelopt_utils, "infer_shapes", infer_shapes_without_weights),
        (modelopt_utils, "check_model", check_without_weights),
        (modelopt_utils, "remove_redundant_casts", remove_redundant_casts),
        (PrecisionConverter, "_cleanup_no_consumer_nodes", _cleanup_no_consumer_nodes),
        (PrecisionConverter, "_get_tensors_to_cast", _sorted_tensors_to_cast(PrecisionConverter._get_tensors_to_cast)),
        (GraphSanitizer, "cleanup_model", _on_the_structure(GraphSanitizer.cleanup_model)),
        (GraphSanitizer, "convert_opset", _on_the_structure(GraphSanitizer.convert_opset)),
    ):
        yield


def _on_the_structure(step: Any) -> Any:
    """A GraphSanitizer step run on a weightless copy of its model, the model then taking the
    copy's structure (with_structure_of: the weights stay where they are, whether the step
    reordered, dropped or added initializers)."""

    def run(sanitizer: Any) -> None:
        model = sanitizer.model
        sanitizer.model = weightless_copy(model)
        try:
            step(sanitizer)
        finally:
            sanitizer.model = with_structure_of(model, sanitizer.model)

    return run


def _sorted_tensors_to_cast(original: Any) -> Any:
    """PrecisionConverter._get_tensors_to_cast with its two lists (to cast down, to cast up) sorted."""

    def tensors_to_cast(converter: Any, *args: Any, **kwargs: Any) -> Any:
        down, up, *rest = original(converter, *args, **kwargs)
        return (sorted(down), sorted(up), *rest)

    return tensors_to_cast


def _cleanup_no_consumer_nodes(converter: Any) -> None:
    """PrecisionConverter._cleanup_no_consumer_nodes: remove every node none of whose outputs is a
    network output or read by a node. Its own asks `get_consumer_nodes` (a scan of every node)
    for each output of each node; the graph does not change while it asks, so one set of the
    names every node reads gives the same answer."""
    graph = converter.model.graph
    kept = {output.name for output in graph.output} | {name for node in graph.node for name in node.input}
    for node in [node for node in graph.node if not any(name in kept for name in node.output)]:
        graph.node.remove(node)
