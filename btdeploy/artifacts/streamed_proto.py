"""ONNX models measured and written a field at a time, never encoded whole.

upb's `ByteSize` and `SerializeToString` of a model encode all of it into one buffer: on base
(1.3 GB of weights) each took 4-7 s, and the buffer is a second copy of every weight in memory.
A protobuf message is its fields' encodings one after another, so the model's and its graph's
fields are measured and written one by one here (each weight is encoded on its own); the bytes
are those `SerializeToString` writes, in the same order.
"""

from __future__ import annotations

from typing import BinaryIO

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

# The messages taken apart; every other message (a weight, a node) is encoded whole.
_OPENED = (onnx.ModelProto, onnx.GraphProto)
_LENGTH_DELIMITED = 2  # the wire type of an embedded message


def encoded_size(message: Message) -> int:
    """`message.ByteSize()`, without encoding the model whole. Raises EncodeError, as ByteSize
    does, where one part is past protobuf's 2 GB."""
    if not _opened(message):
        return int(message.ByteSize())
    total = 0
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        tag = len(_varint(field.number << 3 | _LENGTH_DELIMITED))
        for item in _items(value):
            size = encoded_size(item)
            total += tag + len(_varint(size)) + size
    return total + int(_scalars(message).ByteSize())


def write_encoded(message: Message, stream: BinaryIO) -> None:
    """Write `message.SerializeToString()` to `stream`, a field at a time."""
    if not _opened(message):
        stream.write(message.SerializeToString())
        return
    for field, value in message.ListFields():  # in field-number order, as protobuf writes them
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            stream.write(_set(type(message)(), field, value).SerializeToString())
            continue
        tag = _varint(field.number << 3 | _LENGTH_DELIMITED)
        for item in _items(value):
            if _opened(item):
                stream.write(tag + _varint(encoded_size(item)))
                write_encoded(item, stream)
            else:
                data = item.SerializeToString()
                stream.write(tag + _varint(len(data)) + data)


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
