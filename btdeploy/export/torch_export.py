"""The torch.export-based exporter (`torch.onnx.export(dynamo=True)`, `btdeploy export --exporter dynamo`).

torch has deprecated its TorchScript exporter, which btdeploy uses by default, in favour of this one.
Its graph is made to read as the TorchScript one does where the graph passes look:
- each node is named after the module that made it (`/model.bridgetower.cross_modal_text_link_tower.0.LayerNorm/...`),
  as the TorchScript exporter names them: the bridge pass tells the link towers' LayerNorms by that scope.
  The exporter writes the scope, the class path and a stack trace into every node's metadata instead;
  they are dropped, so no local file path or line number ships in a graph.
- the weights leave as `ExportedGraph` stubs and their bytes, read from torch's own tensors without a copy
  (as export/held_weights.py does for the TorchScript exporter).
Its constant folding stops at a size, so some weights reach their MatMuls through Slice and Transpose
(the vision tower's packed in-projection); optimize's first pass folds those (passes/weight_layouts.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx

from btdeploy.artifacts.weightless import WEIGHT_BYTES
from btdeploy.errors import BtDeployError
from btdeploy.export.held_weights import ExportedGraph, tensor_bytes
from btdeploy.export.trace_request import TraceRequest

_SCOPES = "pkg.torch.onnx.name_scopes"
LEAST_EXPORTER_OPSET = 18  # the oldest opset torch's dynamo exporter writes
LEAST_CONVERTIBLE_OPSET = 17  # the oldest its graphs convert to
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")


def export_with_torch_export(request: TraceRequest) -> ExportedGraph:
    """The request's module on its tensors through torch.export and ONNX Script, its dynamic axes left
    dynamic, in its opset. The exporter writes opset 18 or later; an older opset is converted to here,
    without the weights (torch's own conversion drops the module scopes and copies every weight)."""
    import torch

    opset, what = request.opset, request.what
    with _quiet(), warnings.catch_warnings():
        # dynamic_axes (what the heads declare) rather than dynamic_shapes: torch warns; the graph's
        # axes are named as the TorchScript exporter names them (the tests hold both to that).
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                request.module,
                request.tensors,
                dynamo=True,
                opset_version=max(opset, LEAST_EXPORTER_OPSET),
                input_names=request.input_names,
                output_names=request.output_names,
                dynamic_axes=request.dynamic_axes,
                optimize=True,
                verbose=False,
            )
        except Exception as error:
            message = " ".join(str(error).split())[:600]
            raise BtDeployError(
                f"torch.onnx.export (dynamo) failed for {what}: {message}; export with --exporter torchscript"
            ) from None
    if program is None:
        raise BtDeployError(f"torch.onnx.export (dynamo) returned no program for {what}")
    graph = program.model.graph
    _name_by_module_scope(graph)
    weights = _hold_weights(graph)
    model = _serialize(program.model)
    del program, graph
    _release_traced_graph()
    _release_matchers()
    if opset < LEAST_EXPORTER_OPSET:
        model = _convert_down(model, opset, what)
    _stubs_without_location(model)
    return ExportedGraph(model, weights)


def _release_traced_graph() -> None:
    """torch.export keeps a module-level map from each fake tensor it traced to the FX node that made
    it, and never empties it: the whole traced graph stayed alive after the export, its GraphModule,
    every node's metadata and a fake tensor per value (684 on tiny itm; they hold no data, so on base
    itm the process holds 0.01 GB less, 0.55 GB after the export). Emptied here; the next export
    fills it again."""
    try:
        from torch.fx.experimental import proxy_tensor
    except ImportError:
        return
    held = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(held, dict):
        held.clear()


def _release_matchers() -> None:
    """ONNX Script's rewrite rules live for the whole process, and each rule's pattern matcher keeps the
    graph, node and match of its last use: every value the export's optimizer replaced, the model's
    tensors among them (on base itm the process held 2.2 GB after the export, 0.7 GB after the
    TorchScript one, and 0.9 GB with this). Each matcher is put back as it was before its first match."""
    import gc

    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another layout: tests/export/test_dynamo_export.py counts what stays
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on torch.distributed's deprecated aliases warns
        matchers = [found for found in gc.get_objects() if isinstance(found, PatternMatcher)]
    for matcher in matchers:
        state = vars(matcher)
        for name in ("_graph", "_match", "_tracer"):
            state.pop(name, None)  # each set again at the start of a match
        if "_current_node" in state:
            state["_current_node"] = None
    gc.collect()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter reports each step (opset set to 18, torchvision missing, conversion fallback) on
    its loggers and on stdout; btdeploy's own progress lines say what is happening."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in _NOISY_LOGGERS]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _name_by_module_scope(graph: Any) -> None:
    """Each node named `/<module path>/<node>` (unique as the node names were) with its metadata dropped."""
    for node in graph:
        scopes = _scopes(node.metadata_props.get(_SCOPES, ""))
        module = scopes[-2] if len(scopes) >= 2 else ""
        node.name = f"/{module}/{node.name}" if module else node.name
        node.metadata_props.clear()
    for value in graph.initializers.values():
        value.metadata_props.clear()


def _scopes(text: str) -> list[str]:
    """The exporter writes the scopes as a Python list of strings: "['', 'model', 'model.bridgetower', ...]"."""
    import ast

    try:
        parsed = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [str(scope) for scope in parsed] if isinstance(parsed, list) else []


def _hold_weights(graph: Any) -> dict[str, memoryview]:
    """Every weight's bytes as they lie in torch's (or numpy's) memory, and the initializer a stub with
    its type and dims, so that serializing the graph copies no weight."""
    import onnx_ir as ir

    weights: dict[str, memoryview] = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= WEIGHT_BYTES:
            continue  # small constants (axes, shapes) stay in the graph: the opset converter reads them
        weights[name] = _bytes_of(tensor)
        value.const_value = ir.ExternalTensor(
            "held", 0, weights[name].nbytes, tensor.dtype, shape=tensor.shape, name=name
        )
    return weights


def _bytes_of(tensor: Any) -> memoryview:
    """A torch tensor's bytes in place; a tensor the exporter folded holds a numpy array."""
    import torch

    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return tensor_bytes(raw)
    return np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8).data


def _serialize(model: Any) -> onnx.ModelProto:
    """The model as a protobuf, each initializer still the external stub `_hold_weights` made, and
    no value_info for initializers (the TorchScript exporter writes none)."""
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    kept = [info for info in proto.graph.value_info if info.name not in initializers]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return proto


def _convert_down(model: onnx.ModelProto, opset: int, what: str) -> onnx.ModelProto:
    """ONNX's version converter on the weightless graph (its stubs still external references)."""
    from onnx import version_converter

    # LayerNormalization, in every block, came with opset 17: the converter cannot go below it
    advice = f"export at --opset {LEAST_CONVERTIBLE_OPSET} or later, or with --exporter torchscript"
    _int64_as_typed_field(model)
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as error:
        # its assertions read "<source file>:<line>: adapt: Assertion `false` failed: <reason>"
        reason = re.sub(r"^.*Assertion `[^`]*` failed: ", "", " ".join(str(error).split()))[:300]
        raise BtDeployError(
            f"{what}: ONNX could not convert the dynamo exporter's opset {LEAST_EXPORTER_OPSET} graph to "
            f"opset {opset} ({reason}): {advice}"
        ) from None
    for node in converted.graph.node:
        _drop_newer_attributes(node, opset, f"{what}: {advice}")
    return converted


def _int64_as_typed_field(model: onnx.ModelProto) -> None:
    """The converter reads a Reduce's axes (18 -> 17: input to attribute) from `int64_data` alone; from
    an initializer in `raw_data`, as the exporter writes them, it wrote `axes=[]`, which reduces over
    every axis. Each small int64 constant is moved to `int64_data` (the same values)."""
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT64 and tensor.HasField("raw_data"):
            values = numpy_helper.to_array(tensor)
            tensor.ClearField("raw_data")
            tensor.int64_data.extend(int(value) for value in values.reshape(-1))


def _drop_newer_attributes(node: onnx.NodeProto, opset: int, advice: str) -> None:
    """ONNX's converter moves a Reduce's axes from input to attribute on the way down from 18 but
    keeps `noop_with_empty_axes`, which the older operator lacks (the checker refuses it). At 0 it
    says what the older operator always does, so it goes; any other attribute the opset lacks is an error."""
    if node.domain not in ("", "ai.onnx"):
        return
    known = onnx.defs.get_schema(node.op_type, opset).attributes
    for attribute in list(node.attribute):
        if attribute.name in known:
            continue
        if attribute.name == "noop_with_empty_axes" and onnx.helper.get_attribute_value(attribute) == 0:
            node.attribute.remove(attribute)
            continue
        raise BtDeployError(f"{node.op_type} keeps attribute {attribute.name}, which opset {opset} lacks; {advice}")


def _stubs_without_location(model: onnx.ModelProto) -> None:
    """Each initializer a stub as ExportedGraph holds them: type and dims, no data, no location field
    (not even DEFAULT written out: the graph then serializes as the TorchScript exporter's does, which
    the byte-for-byte comparisons of quantize and the weights files rely on)."""
    for tensor in model.graph.initializer:
        del tensor.external_data[:]
        tensor.ClearField("data_location")
