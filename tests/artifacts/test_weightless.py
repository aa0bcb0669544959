"""Weightless copies: shape inference and model checks on the structure alone give what the whole
model gives, and the weights come back intact."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from btdeploy.artifacts.weightless import (
    WEIGHT_BYTES,
    check_without_weights,
    infer_shapes_without_weights,
    weightless_copy,
    weightless_with_side_file,
    with_weights_of,
)


@pytest.fixture
def graph(optimized: Path) -> onnx.ModelProto:
    return onnx.load(str(optimized / "itm" / "model.trt.onnx"))


def test_a_weightless_copy_holds_no_weight_bytes_and_gets_them_back(graph: onnx.ModelProto, tmp_path: Path) -> None:
    light = weightless_copy(graph)
    weights = [t for t in graph.graph.initializer if len(t.raw_data) > WEIGHT_BYTES]
    assert weights and light.ByteSize() < graph.ByteSize() - sum(len(t.raw_data) for t in weights) + 100_000
    # The copy that writes its side file points into it: ONNX reads the weights back from there.
    onnx.save(weightless_with_side_file(graph, tmp_path / "model.onnx.data"), str(tmp_path / "model.onnx"))
    reread = {t.name: t.raw_data for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    assert all(reread[t.name] == t.raw_data for t in weights)
    assert with_weights_of(weightless_copy(graph), graph).SerializeToString() == graph.SerializeToString()


def test_shape_inference_without_weights_equals_onnx_on_the_whole_model(graph: onnx.ModelProto) -> None:
    del graph.graph.value_info[:]
    whole = onnx.shape_inference.infer_shapes(graph, strict_mode=True)
    light = infer_shapes_without_weights(graph, strict_mode=True)
    assert len(whole.graph.value_info) > 100
    assert light.SerializeToString() == whole.SerializeToString()


def test_the_weightless_check_passes_a_good_graph_and_refuses_a_broken_one(graph: onnx.ModelProto) -> None:
    check_without_weights(graph)
    graph.graph.node[5].input[0] = "no_such_tensor"
    with pytest.raises(onnx.checker.ValidationError, match="no_such_tensor"):
        check_without_weights(graph)
