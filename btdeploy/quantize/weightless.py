"""Graphs without their weight bytes, for work that needs only the structure.

ONNX shape inference and an ONNX Runtime session of a graph with extra outputs need the nodes,
the types and the dims of every weight, not the weights: Model Optimizer's AutoCast hands them the
whole model (serialized, parsed, inferred, serialized back: about five copies of the weights for
each of its ten inferences on base). Here the weights are stubs that point at a side file, and only
tensors small enough to be shapes or axes (which inference reads) keep their bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
from google.protobuf.message import Message

# Above this size a tensor is a weight; below, it may be a shape, axes or a scalar that inference reads.
WEIGHT_BYTES = 1024


def _copy_fields(source: Message, target: Message, skip: Iterable[str]) -> None:
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _is_weight(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) > WEIGHT_BYTES


def weightless_copy(model: onnx.ModelProto, data_file: str = "weights.bin") -> onnx.ModelProto:
    """`model` with every weight a stub that reads `data_file` at the offset `write_weights` gives it.
    Weights already external keep their own reference."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    offset = 0
    for tensor in model.graph.initializer:
        if not _is_weight(tensor):
            light.graph.initializer.append(tensor)
            continue
        stub = light.graph.initializer.add()
        _copy_fields(tensor, stub, skip=("raw_data",))
        size = len(tensor.raw_data)
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(size))):
            stub.external_data.add(key=key, value=value)
        offset += size
    return light


def write_weights(model: onnx.ModelProto, path: Path) -> None:
    """The weight bytes of `model` into `path`, in the order and offsets `weightless_copy` gives them,
    one tensor at a time."""
    with open(path, "wb") as out:
        for tensor in model.graph.initializer:
            if _is_weight(tensor):
                out.write(tensor.raw_data)


def with_weights_of(light: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """`light` (a weightless copy, perhaps inferred since) with the weights of `model` put back."""
    weights = {t.name: t for t in model.graph.initializer if _is_weight(t)}
    for stub in light.graph.initializer:
        original = weights.get(stub.name)
        if original is None or stub.data_location != onnx.TensorProto.EXTERNAL:
            continue
        stub.ClearField("external_data")
        stub.ClearField("data_location")
        stub.raw_data = original.raw_data
    return light


def infer_shapes_without_weights(model: onnx.ModelProto, **options: object) -> onnx.ModelProto:
    """onnx.shape_inference.infer_shapes(model, **options), run on a weightless copy: a new model
    with the inferred types and shapes and the weights of `model` (copied once)."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), **options)  # type: ignore[arg-type]
    return with_weights_of(inferred, model)


def check_without_weights(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model on a weightless copy of `model` (its weights' types, dims and sizes are
    checked, their bytes are not read): the checker otherwise serializes the whole model."""
    light = weightless_copy(model)
    size = sum(len(t.raw_data) for t in model.graph.initializer if _is_weight(t))
    with tempfile.TemporaryDirectory(prefix="btdeploy-check-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(light, str(path))
        with open(Path(folder) / "weights.bin", "wb") as side:
            side.truncate(size)  # a sparse file as long as the weights: the checker reads where they would be
        onnx.checker.check_model(str(path))
