"""ONNX models measured, written and read a field at a time, never encoded or decoded whole.

upb's `ByteSize` and `SerializeToString` of a model encode all of it into one buffer: on base
(1.3 GB of weights) each took 4-7 s, and the buffer is a second copy of every weight in memory.
A protobuf message is its fields' encodings one after another, so the model's and its graph's
fields are measured and written one by one here (each weight is encoded on its own); the bytes
are those `SerializeToString` writes, in the same order.

Reading is the same in reverse: `onnx.load` reads the whole file into one buffer and parses it,
two copies of every weight at once (on base 2.5 GB of fresh memory for a 1.3 GB graph, which this
VM's kernel zeroes page by page). `read_model` maps the file and parses the graph's fields a few
megabytes at a time (parsing concatenated fields is merging them, the same message), and can leave
a weight's bytes in the file, as a reference ONNX's external data format reads.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from btdeploy.artifacts.weightless import NO_WEIGHTS, WeightBytes, held_bytes, point_at

# The messages taken apart; every other message (a weight, a node) is encoded whole.
_OPENED = (onnx.ModelProto, onnx.GraphProto)
_LENGTH_DELIMITED = 2  # the wire type of an embedded message
_FIXED_SIZES = {1: 8, 5: 4}  # wire types 64-bit and 32-bit; 0 is a varint, groups (3, 4) ONNX never uses
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
# The graph's fields are parsed in pieces of about this size (one weight may be larger).
_PIECE_BYTES = 1 << 24


def encoded_size(message: Message, apart: WeightBytes = NO_WEIGHTS) -> int:
    """`message.ByteSize()`, without encoding the model whole (with the weights `apart` holds in
    their stubs' place). Raises EncodeError, as ByteSize does, where one part is past protobuf's 2 GB."""
    if not _opened(message):
        held = held_bytes(message, apart)
        return int(message.ByteSize()) + (0 if held is None else len(_raw_data_header(held)) + held.nbytes)
    total = 0
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        tag = len(_varint(field.number << 3 | _LENGTH_DELIMITED))
        for item in _items(value):
            size = encoded_size(item, apart)
            total += tag + len(_varint(size)) + size
    return total + int(_scalars(message).ByteSize())


def write_encoded(message: Message, stream: BinaryIO, apart: WeightBytes = NO_WEIGHTS) -> None:
    """Write `message.SerializeToString()` to `stream`, a field at a time; a stub of a weight
    `apart` holds is written with those bytes as its raw_data."""
    if not _opened(message):
        stream.write(message.SerializeToString())
        return
    for field, value in message.ListFields():  # in field-number order, as protobuf writes them
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            stream.write(_set(type(message)(), field, value).SerializeToString())
            continue
        tag = _varint(field.number << 3 | _LENGTH_DELIMITED)
        for item in _items(value):
            held = held_bytes(item, apart)
            if _opened(item):
                stream.write(tag + _varint(encoded_size(item, apart)))
                write_encoded(item, stream, apart)
            elif held is not None:
                # The stub's fields, then raw_data: where protobuf puts it after dims, type and name.
                data, header = item.SerializeToString(), _raw_data_header(held)
                stream.write(tag + _varint(len(data) + len(header) + held.nbytes) + data + header)
                stream.write(held)
            else:
                data = item.SerializeToString()
                stream.write(tag + _varint(len(data)) + data)


def _raw_data_header(data: memoryview) -> bytes:
    return _varint(_RAW_DATA << 3 | _LENGTH_DELIMITED) + _varint(data.nbytes)


def _opened(message: Message) -> bool:
    # Fields this module does not know (from a newer ONNX) are written only by protobuf itself.
    return isinstance(message, _OPENED) and not len(UnknownFieldSet(message))


def _items(value: object) -> list[Message]:
    return [value] if isinstance(value, Message) else list(value)  # type: ignore[call-overload]


def _scalars(message: Message) -> Message:
    """A message of the same type holding only the fields of `message` that are not messages."""
    shell = type(message)()
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            _set(shell, field, value)
    return shell


def _set(message: Message, field: FieldDescriptor, value: object) -> Message:
    if isinstance(value, (str, bytes, int, float)):
        setattr(message, field.name, value)
    else:
        getattr(message, field.name).extend(value)
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_model(path: Path, weights_up_to: int | None = None) -> onnx.ModelProto:
    """`onnx.load_model(path, load_external_data=False)`, the file mapped and its graph parsed a piece
    at a time: at most one weight is held twice. With `weights_up_to`, a weight whose bytes are
    longer stays in the file: its tensor is a stub naming this file and where the bytes lie (ONNX's
    external data: `onnx.load_external_data_for_model` and ONNX Runtime read them from there).
    Raises ValueError on a file that is not a whole protobuf message."""
    model = onnx.ModelProto()
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return model  # an empty message; mmap refuses an empty file
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            for number, wire, start, body, end in _fields(view, 0, len(view)):
                if number == _GRAPH and wire == _LENGTH_DELIMITED:
                    _read_graph(handle.fileno(), view, body, end, model.graph, path.name, weights_up_to)
                else:
                    model.MergeFromString(os.pread(handle.fileno(), end - start, start))
    return model


def _read_graph(
    fd: int, view: mmap.mmap, start: int, end: int, graph: onnx.GraphProto, file_name: str, weights_up_to: int | None
) -> None:
    """Merge the graph's fields into `graph`, a piece at a time. The map is read for the fields'
    headers only: the pieces are copied from the file (mapping a page costs a fault, reading it not)."""

    def merge(first: int, last: int) -> None:
        graph.MergeFromString(os.pread(fd, last - first, first))

    piece = start  # where the fields not yet parsed begin
    for number, wire, field_start, body, field_end in _fields(view, start, end):
        stub = None
        if weights_up_to is not None and number == _INITIALIZER and wire == _LENGTH_DELIMITED:
            stub = _weight_stub(view, body, field_end, file_name, weights_up_to)
        if stub is not None:
            if piece < field_start:
                merge(piece, field_start)
            graph.initializer.append(stub)
            piece = field_end
        elif field_end - piece >= _PIECE_BYTES:
            merge(piece, field_end)
            piece = field_end
    if piece < end:
        merge(piece, end)


def _weight_stub(view: mmap.mmap, start: int, end: int, file_name: str, longest: int) -> onnx.TensorProto | None:
    """The tensor encoded in view[start:end] with its raw bytes left in the file, or None where it
    holds at most `longest` of them (or none: small tensors and typed fields are parsed whole)."""
    raw = [field for field in _fields(view, start, end) if field[0] == _RAW_DATA]
    if not raw or raw[-1][4] - raw[-1][3] <= longest:
        return None
    tensor = onnx.TensorProto()
    at = start
    for _, _, field_start, _, field_end in raw:  # every field but the raw bytes, parsed as it lies
        tensor.MergeFromString(view[at:field_start])
        at = field_end
    tensor.MergeFromString(view[at:end])
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None  # bytes both here and elsewhere: left to protobuf and onnx as they are
    body, field_end = raw[-1][3], raw[-1][4]  # the last of a repeated field is the one kept
    point_at(tensor, file_name, body, field_end - body)
    return tensor


def _fields(view: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, where the field starts, where its value starts, where it ends) of
    each field encoded in view[start:end]."""
    at = start
    while at < end:
        field_start = at
        tag, at = _read_varint(view, at, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, field_end = _read_varint(view, at, end)
        elif wire == _LENGTH_DELIMITED:
            length, at = _read_varint(view, at, end)
            field_end = at + length
        elif wire in _FIXED_SIZES:
            field_end = at + _FIXED_SIZES[wire]
        else:
            raise ValueError(f"wire type {wire} at byte {field_start}: not an ONNX protobuf")
        if number == 0:
            raise ValueError(f"field number 0 at byte {field_start}: not an ONNX protobuf")
        if field_end > end:
            raise ValueError(f"a field at byte {field_start} runs past its message: the file is cut short or damaged")
        yield number, wire, field_start, at, field_end
        at = field_end


def _read_varint(view: mmap.mmap, at: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while at < end and shift < 64:
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
    raise ValueError(f"a varint at byte {at} does not end: the file is cut short or damaged")
