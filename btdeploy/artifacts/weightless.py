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
from typing import BinaryIO

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


def _weightless(
    model: onnx.ModelProto, data_file: str, sink: BinaryIO | None = None, inline_up_to: int = WEIGHT_BYTES
) -> tuple[onnx.ModelProto, int]:
    """`model` with every weight of more than `inline_up_to` bytes a stub reading `data_file` at its
    offset, and the weights' total size. With `sink`, the weight bytes are written there in that
    order, one after another. Each tensor's bytes are read once (protobuf copies them on every
    read). Weights already external keep their own reference; `model` is left as it was."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    offset = 0
    for tensor in model.graph.initializer:
        data = b"" if tensor.data_location == onnx.TensorProto.EXTERNAL else tensor.raw_data
        if len(data) <= inline_up_to:
            light.graph.initializer.append(tensor)
            continue
        if sink is not None:
            sink.write(data)
        stub = light.graph.initializer.add()
        _copy_fields(tensor, stub, skip=("raw_data",))
        stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(len(data)))):
            stub.external_data.add(key=key, value=value)
        offset += len(data)
    return light, offset


def weightless_copy(model: onnx.ModelProto, data_file: str = "weights.bin") -> onnx.ModelProto:
    """`model` with every weight a stub that reads `data_file` (which is not written)."""
    return _weightless(model, data_file)[0]


def weightless_with_side_file(
    model: onnx.ModelProto, side_file: Path, named: str | None = None, inline_up_to: int = WEIGHT_BYTES
) -> onnx.ModelProto:
    """A weightless copy of `model` whose weights are written to `side_file`, one tensor at a time:
    saved beside that file, it is a graph ONNX Runtime and ONNX load with all their weights. The
    stubs name the file `named` (one it will be renamed to) or its own name."""
    with open(side_file, "wb") as sink:
        return _weightless(model, named or side_file.name, sink, inline_up_to)[0]


def with_weights_of(light: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """`light` (a weightless copy, perhaps inferred since) with the weights of `model` put back."""
    # A stub is an external tensor whose original is held in memory.
    held = {t.name: t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    for stub in light.graph.initializer:
        original = held.get(stub.name)
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
    light, size = _weightless(model, "weights.bin")
    with tempfile.TemporaryDirectory(prefix="btdeploy-check-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(light, str(path))
        with open(Path(folder) / "weights.bin", "wb") as side:
            side.truncate(size)  # a sparse file as long as the weights: the checker reads where they would be
        onnx.checker.check_model(str(path))
