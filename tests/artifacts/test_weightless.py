"""Weightless copies: shape inference and model checks on the structure alone give what the whole
model gives, and the weights come back intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from btdeploy.artifacts.onnx_files import load_graph, save_graph_atomically
from btdeploy.artifacts.weightless import (
    WEIGHT_BYTES,
    check_without_weights,
    external_weights_read,
    infer_shapes_without_weights,
    raw_size,
    weightless_copy,
    weightless_with_side_file,
    with_structure_of,
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
    weight = next(t for t in graph.graph.initializer if len(t.raw_data) > WEIGHT_BYTES)
    light = infer_shapes_without_weights(graph, strict_mode=True)
    assert len(whole.graph.value_info) > 100
    assert light.SerializeToString() == whole.SerializeToString()
    # The model itself took the inferred structure; its weights stayed where they were.
    assert light is graph and any(t is weight for t in light.graph.initializer)


def test_the_weightless_check_passes_a_good_graph_and_refuses_a_broken_one(graph: onnx.ModelProto) -> None:
    check_without_weights(graph)
    graph.graph.node[5].input[0] = "no_such_tensor"
    with pytest.raises(onnx.checker.ValidationError, match="no_such_tensor"):
        check_without_weights(graph)


def test_the_byte_size_of_a_weight_is_known_without_reading_it() -> None:
    from onnx import helper, numpy_helper

    arrays = [np.zeros((3, 5), dtype) for dtype in (np.float32, np.float16, np.int8, np.uint8, np.int64, np.bool_)]
    tensors = [numpy_helper.from_array(a, f"t{i}") for i, a in enumerate(arrays)]
    tensors.append(helper.make_tensor("packed", onnx.TensorProto.INT4, [7], bytes(4), raw=True))  # 2 a byte
    tensors.append(helper.make_tensor("typed", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))  # float_data
    assert [raw_size(t) for t in tensors] == [len(t.raw_data) for t in tensors]
    assert [raw_size(t) for t in tensors][-2:] == [4, 0]


def test_a_converted_structure_takes_the_weights_where_they_are(graph: onnx.ModelProto) -> None:
    """The light copy's nodes, opsets and small tensors come into the model, its weights stay; a
    light copy that names other weights takes them instead, and a stub of no weight is an error."""
    light = weightless_copy(graph)
    light.opset_import[0].version += 1
    light.graph.node[0].name = "renamed"
    small = next(t for t in light.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    small.doc_string = "rewritten"
    expected = with_weights_of(onnx.ModelProto.FromString(light.SerializeToString()), graph)
    kept = onnx.ModelProto.FromString(graph.SerializeToString())
    assert with_structure_of(kept, light).SerializeToString() == expected.SerializeToString()

    extra = weightless_copy(graph)
    extra.graph.initializer.add().CopyFrom(onnx.numpy_helper.from_array(np.zeros(2), "new"))
    taken = with_structure_of(onnx.ModelProto.FromString(graph.SerializeToString()), extra)
    assert [t.name for t in taken.graph.initializer][-1] == "new"
    assert taken.graph.initializer[0].SerializeToString() == graph.graph.initializer[0].SerializeToString()

    # Reordered, one weight dropped and one small tensor added (GraphSurgeon's cleanup orders the
    # initializers its own way): the model takes that order, and its weights are not copied.
    shuffled = weightless_copy(graph)
    tensors = list(shuffled.graph.initializer)
    del shuffled.graph.initializer[:]
    shuffled.graph.initializer.extend([*tensors[::-1][1:], onnx.numpy_helper.from_array(np.zeros(2), "new")])
    expected = with_weights_of(onnx.ModelProto.FromString(shuffled.SerializeToString()), graph)
    kept = onnx.ModelProto.FromString(graph.SerializeToString())
    weight = next(t for t in kept.graph.initializer if len(t.raw_data) > WEIGHT_BYTES and t.name != tensors[-1].name)
    assert with_structure_of(kept, shuffled).SerializeToString() == expected.SerializeToString()
    assert any(t is weight for t in kept.graph.initializer)

    orphan = weightless_copy(graph)
    stub = next(t for t in orphan.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    stub.name = "nowhere"
    before = graph.SerializeToString()
    with pytest.raises(RuntimeError, match="nowhere: a weight the model it stands for does not hold"):
        with_structure_of(graph, orphan)
    assert graph.SerializeToString() == before  # refused before anything changed


@pytest.mark.parametrize("external", [False, True], ids=["weights-in-the-graph", "weights-in-a-data-file"])
def test_weights_left_in_their_file_are_read_for_a_block_and_dropped_after(
    graph: onnx.ModelProto, tmp_path: Path, external: bool
) -> None:
    """A structure read (every weight a reference into the file that holds it) passes the model
    check; for a block its weights are read in, to the bytes a whole read gives, and afterwards it
    is the structure read again."""
    path = tmp_path / "model.onnx"
    save_graph_atomically(graph, path, external=external)
    light = load_graph(path, "make it again", load_weights=False)
    structure = light.SerializeToString()
    assert len(structure) < graph.ByteSize() // 10
    check_without_weights(light)  # the references name a file the check's own folder does not hold
    whole = load_graph(path, "make it again").SerializeToString()
    with external_weights_read(light, path):
        assert light.SerializeToString() == whole
    assert light.SerializeToString() == structure
