"""Models measured and written a field at a time give protobuf's own size and bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from btdeploy.artifacts.onnx_files import save_graph_atomically
from btdeploy.artifacts.streamed_proto import encoded_size, write_encoded
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
