"""Models measured, written and read a field at a time give protobuf's own size, bytes and message."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from btdeploy.artifacts import streamed_proto
from btdeploy.artifacts.onnx_files import INLINE_WEIGHT_BYTES, load_graph, save_graph_atomically
from btdeploy.artifacts.streamed_proto import encoded_size, read_model, write_encoded
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS


def _every_kind_of_field() -> onnx.ModelProto:
    """A model using every field kind of ModelProto and GraphProto: scalars, negative and multi-byte
    varints, repeated scalars and messages, subgraphs, sparse weights, functions, metadata."""
    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    branch = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["z"])], "branch", [],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 64])],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch, doc_string="d" * 300),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 64])],
        [weight],
        doc_string="g" * 200,
        value_info=[helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 64])],
    )
    graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(np.ones(3, np.float32), "s"),
            numpy_helper.from_array(np.array([0, 5, 9], np.int64), ""),
            [10],
        )
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.test", 1)])
    model.model_version = -3  # a negative varint takes 10 bytes
    model.doc_string, model.producer_name, model.domain = "m" * 70_000, "btdeploy", "ai.test"
    helper.set_model_props(model, {"source": "x" * 129, "seed": "0"})
    model.functions.append(helper.make_function("ai.test", "F", ["a"], ["b"], [], [], ["a"]))
    return model


def _streamed(model: onnx.ModelProto) -> bytes:
    stream = io.BytesIO()
    write_encoded(model, stream)
    return stream.getvalue()


def test_every_kind_of_field_is_measured_and_written_as_protobuf_does() -> None:
    model = _every_kind_of_field()
    assert encoded_size(model) == model.ByteSize()
    assert _streamed(model) == model.SerializeToString()
    assert encoded_size(model.graph) == model.graph.ByteSize()


@pytest.mark.parametrize("head", list(HEADS))
def test_an_exported_graph_is_written_byte_for_byte(tiny_export: Path, head: str, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_export / head / "model.onnx"))
    expected = model.SerializeToString()
    assert encoded_size(model) == len(expected)
    save_graph_atomically(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").read_bytes() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left behind


def test_fields_of_a_newer_onnx_are_kept() -> None:
    """A model read by an older ONNX than the one that wrote it holds fields this ONNX does not
    know: protobuf keeps them, and so must the writer."""
    known = _every_kind_of_field().SerializeToString()
    unknown_field = bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 0x2A])  # field 99, varint 42
    model = onnx.ModelProto.FromString(known + unknown_field)
    assert model.ByteSize() == len(known) + len(unknown_field)
    assert encoded_size(model) == model.ByteSize()
    assert _streamed(model) == model.SerializeToString()


@pytest.mark.parametrize("piece_bytes", [1, 1 << 24])
def test_a_model_read_a_field_at_a_time_is_the_one_protobuf_parses(
    tmp_path: Path, piece_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every kind of field, a field of a newer ONNX, and the graph parsed one field per piece or
    all in one: the message is protobuf's own."""
    monkeypatch.setattr(streamed_proto, "_PIECE_BYTES", piece_bytes)
    unknown_field = bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 0x2A])
    encoded = _every_kind_of_field().SerializeToString() + unknown_field
    (tmp_path / "m.onnx").write_bytes(encoded)
    assert read_model(tmp_path / "m.onnx").SerializeToString() == encoded
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert read_model(tmp_path / "empty.onnx").SerializeToString() == b""


@pytest.mark.parametrize("head", list(HEADS))
def test_a_graph_read_without_its_weights_names_where_each_one_lies(tiny_export: Path, head: str) -> None:
    """Each weight past the threshold is a stub naming the graph file and its bytes' place: ONNX
    reads every weight back from there, byte for byte."""
    path = tiny_export / head / "model.onnx"
    whole = onnx.load(str(path))
    assert read_model(path).SerializeToString() == whole.SerializeToString()
    light = read_model(path, weights_up_to=INLINE_WEIGHT_BYTES)
    stubs = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    large = [t for t in whole.graph.initializer if len(t.raw_data) > INLINE_WEIGHT_BYTES]
    assert len(stubs) == len(large) > 10
    assert {e.value for t in stubs for e in t.external_data if e.key == "location"} == {"model.onnx"}
    assert light.ByteSize() < whole.ByteSize() - sum(len(t.raw_data) for t in large) + 100_000
    onnx.load_external_data_for_model(light, str(path.parent))
    weights = {t.name: t.raw_data for t in whole.graph.initializer}
    assert all(t.raw_data == weights[t.name] for t in light.graph.initializer)


def test_a_graph_read_without_its_weights_looks_the_same_in_one_file_or_two(tiny_export: Path, tmp_path: Path) -> None:
    model = onnx.load(str(tiny_export / "itm" / "model.onnx"))
    save_graph_atomically(model, tmp_path / "one.onnx", external=False)
    save_graph_atomically(model, tmp_path / "two.onnx", external=True)
    one, two = (load_graph(tmp_path / name, "export again", load_weights=False) for name in ("one.onnx", "two.onnx"))
    for light in (one, two):  # the stubs differ only in where they point
        for tensor in light.graph.initializer:
            del tensor.external_data[:]
    assert one.SerializeToString() == two.SerializeToString()
    assert load_graph(tmp_path / "one.onnx", "x").SerializeToString() == model.SerializeToString()


def test_a_cut_short_or_foreign_file_is_refused_in_one_line(tiny_export: Path, tmp_path: Path) -> None:
    encoded = (tiny_export / "itm" / "model.onnx").read_bytes()
    for name, data in (("cut.onnx", encoded[: len(encoded) // 2]), ("zeros.onnx", b"\x00" * 64)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError):
            read_model(tmp_path / name)
        with pytest.raises(BtDeployError, match=f"cannot read {tmp_path / name} .*: export again$"):
            load_graph(tmp_path / name, "export again", load_weights=False)
