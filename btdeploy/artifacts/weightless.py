"""Graphs without their weight bytes, for work that needs only the structure.

ONNX shape inference and an ONNX Runtime session of a graph with extra outputs need the nodes,
the types and the dims of every weight, not the weights: Model Optimizer's AutoCast hands them the
whole model (serialized, parsed, inferred, serialized back: about five copies of the weights for
each of its ten inferences on base). Here the weights are stubs that point at a side file, and only
tensors small enough to be shapes or axes (which inference reads) keep their bytes.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import Message
from onnx.external_data_helper import ExternalDataInfo

# Above this size a tensor is a weight; below, it may be a shape, axes or a scalar that inference reads.
WEIGHT_BYTES = 1024
# Weights whose bytes are held apart from the model, by initializer name: the model holds a stub of
# each (its name, type and dims, no data) and the writers put these bytes in its place. The export
# hands over torch's own tensors this way (export/held_weights.py), never copied into protobuf.
WeightBytes = Mapping[str, memoryview]
NO_WEIGHTS: WeightBytes = {}
# Types stored two values to a byte.
_PACKED_4BIT = {getattr(onnx.TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, t)}


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


def held_bytes(message: Message, apart: WeightBytes) -> memoryview | None:
    """The bytes `apart` holds for `message`, where it is a tensor stub of theirs (no data of its own)."""
    if not apart or not isinstance(message, onnx.TensorProto):
        return None
    if message.HasField("raw_data") or message.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return apart.get(message.name)


def _weightless(
    model: onnx.ModelProto,
    data_file: str,
    sink: BinaryIO | None = None,
    inline_up_to: int = WEIGHT_BYTES,
    apart: WeightBytes = NO_WEIGHTS,
) -> tuple[onnx.ModelProto, int]:
    """`model` with every weight of more than `inline_up_to` bytes a stub reading `data_file` at its
    offset, and the weights' total size. With `sink`, the weight bytes are written there in that
    order, one after another, each read once (protobuf copies them on every read); without one
    they are not read. Weights already external keep their own reference; `model` is left as it was."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    offset = 0
    for tensor in model.graph.initializer:
        held = held_bytes(tensor, apart)
        if held is not None:
            size = held.nbytes
        else:
            size = 0 if tensor.data_location == onnx.TensorProto.EXTERNAL else raw_size(tensor)
        if size <= inline_up_to:
            light.graph.initializer.append(tensor)
            if held is not None:
                light.graph.initializer[-1].raw_data = held.tobytes()
            continue
        if sink is not None:
            data = tensor.raw_data if held is None else held
            sink.write(data)
            size = memoryview(data).nbytes
        stub = light.graph.initializer.add()
        _copy_fields(tensor, stub, skip=("raw_data",))
        point_at(stub, data_file, offset, size)
        offset += size
    return light, offset


def point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` (without its raw bytes) read them from `location` at `offset`: ONNX's external data."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def raw_size(tensor: onnx.TensorProto) -> int:
    """`len(tensor.raw_data)`, from the tensor's dims and type where they give it: protobuf copies
    a bytes field on every read (on base 1.3 GB for the weights of one graph)."""
    if not tensor.HasField("raw_data"):
        return 0
    return size_from_dims(tensor) or len(tensor.raw_data)  # a type numpy does not hold: read it


def size_from_dims(tensor: onnx.TensorProto) -> int | None:
    """A tensor's byte size from its dims and type, or None for a type numpy does not hold."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    try:
        return count * int(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def weightless_copy(model: onnx.ModelProto, data_file: str = "weights.bin") -> onnx.ModelProto:
    """`model` with every weight a stub that reads `data_file` (which is not written)."""
    return _weightless(model, data_file)[0]


def weightless_with_side_file(
    model: onnx.ModelProto,
    side_file: Path,
    named: str | None = None,
    inline_up_to: int = WEIGHT_BYTES,
    apart: WeightBytes = NO_WEIGHTS,
) -> onnx.ModelProto:
    """A weightless copy of `model` whose weights are written to `side_file`, one tensor at a time:
    saved beside that file, it is a graph ONNX Runtime and ONNX load with all their weights. The
    stubs name the file `named` (one it will be renamed to) or its own name."""
    with open(side_file, "wb") as sink:
        return _weightless(model, named or side_file.name, sink, inline_up_to, apart)[0]


def with_weights_of(light: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """`light` (a weightless copy, perhaps inferred or converted since) with the weights of `model`
    put back, each copied once. A stub of no weight `model` holds is an error."""
    # A stub is an external tensor whose original is held in memory; the original replaces it whole.
    held = {t.name: t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    names = {t.name for t in model.graph.initializer}
    for stub in light.graph.initializer:
        if stub.data_location != onnx.TensorProto.EXTERNAL:
            continue
        original = held.get(stub.name)
        if original is not None:
            stub.CopyFrom(original)
        elif stub.name not in names:
            raise RuntimeError(f"{stub.name}: a weight the model it stands for does not hold")
    return light


def with_structure_of(model: onnx.ModelProto, light: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with everything but its weights taken from `light` (a weightless copy of it, converted
    or inferred since), its weights left where they are: nothing the size of a weight is copied.
    Weights `light` dropped go, those it added come, and the order is `light`'s (a repeated field
    sorts without copying its elements). Where a name repeats, `light` takes the weights instead."""
    order = {t.name: index for index, t in enumerate(light.graph.initializer)}
    held = model.graph.initializer
    present = {t.name for t in held}
    if len(order) < len(light.graph.initializer) or len(present) < len(held):
        return with_weights_of(light, model)
    added = [t for t in light.graph.initializer if t.name not in present]
    for tensor in added:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"{tensor.name}: a weight the model it stands for does not hold")
    for index in reversed([i for i, t in enumerate(held) if t.name not in order]):
        del held[index]
    for tensor in added:
        held.add().CopyFrom(tensor)
    held.sort(key=lambda t: order[t.name])
    for kept, new in zip(held, light.graph.initializer, strict=True):
        stub = new.data_location == onnx.TensorProto.EXTERNAL and kept.data_location != onnx.TensorProto.EXTERNAL
        if not stub:  # a small tensor, which the conversion may have rewritten
            kept.CopyFrom(new)
    for target, source, keep in ((model, light, "graph"), (model.graph, light.graph, "initializer")):
        for field, _ in target.ListFields():
            if field.name != keep:
                target.ClearField(field.name)
        _copy_fields(source, target, skip=(keep,))
    return model


Reference = tuple[onnx.TensorProto, list[tuple[str, str]]]  # a tensor read in, and the reference it had


def read_external_weights(model: onnx.ModelProto, graph: Path, read: list[Reference] | None = None) -> None:
    """Read into `model` (the graph at `graph`, read without its weights) every weight it leaves
    in a file, noting in `read` each tensor read with the reference it had. One left in the graph
    file itself (load_graph's structure read) comes back as the file holds it, without a data location."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = [(entry.key, entry.value) for entry in tensor.external_data]
        in_the_graph_file = ExternalDataInfo(tensor).location == graph.name
        onnx.external_data_helper.load_external_data_for_tensor(tensor, str(graph.parent))
        del tensor.external_data[:]
        if in_the_graph_file:
            tensor.ClearField("data_location")
        else:
            tensor.data_location = onnx.TensorProto.DEFAULT  # as onnx's own load of a weights file leaves it
        if read is not None:
            read.append((tensor, entries))


@contextmanager
def external_weights_read(model: onnx.ModelProto, graph: Path) -> Iterator[None]:
    """For the block, every weight `model` leaves in a file read into it (read_external_weights);
    afterwards each points at its file again and the bytes are dropped, even if reading failed."""
    read: list[Reference] = []
    try:
        read_external_weights(model, graph, read)
        yield
    finally:
        for tensor, entries in read:
            tensor.ClearField("raw_data")
            for key, value in entries:
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = onnx.TensorProto.EXTERNAL


def infer_shapes_without_weights(model: onnx.ModelProto, **options: object) -> onnx.ModelProto:
    """onnx.shape_inference.infer_shapes(model, **options), run on a weightless copy: `model` itself
    takes the inferred structure, its weights left where they are (with_structure_of). Unlike ONNX's
    own, which returns a new model, it changes `model`: its callers (Model Optimizer's conversions)
    all replace the model they pass with the one returned."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model), **options)  # type: ignore[arg-type]
    return with_structure_of(model, inferred)


def check_without_weights(model: onnx.ModelProto, apart: WeightBytes = NO_WEIGHTS) -> None:
    """onnx.checker.check_model on a weightless copy of `model` (its weights' types, dims and sizes are
    checked, their bytes are not read): the checker otherwise serializes the whole model."""
    light, size = _weightless(model, "weights.bin", apart=apart)
    for tensor in light.graph.initializer:  # weights left in another file: the checker looks for that file
        if tensor.data_location == onnx.TensorProto.EXTERNAL and ExternalDataInfo(tensor).location != "weights.bin":
            length = _external_length(tensor)
            del tensor.external_data[:]
            point_at(tensor, "weights.bin", size, length)
            size += length
    with tempfile.TemporaryDirectory(prefix="btdeploy-check-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(light, str(path))
        with open(Path(folder) / "weights.bin", "wb") as side:
            side.truncate(size)  # a sparse file as long as the weights: the checker reads where they would be
        onnx.checker.check_model(str(path))


def _external_length(tensor: onnx.TensorProto) -> int:
    """The byte length an external tensor's reference gives, or else its dims and type."""
    given = ExternalDataInfo(tensor).length
    return given if given is not None else size_from_dims(tensor) or 0
