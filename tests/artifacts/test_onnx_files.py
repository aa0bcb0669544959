"""Graphs on disk: weights beside the graph laid out as onnx lays them out, the model in memory
untouched, files as readable as a plain open makes them, no temporary left after a failure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from btdeploy.artifacts import onnx_files
from btdeploy.artifacts.onnx_files import save_graph_atomically


def _weights_of_every_size() -> onnx.ModelProto:
    """Weights on both sides of onnx's 1 KB inline limit, one held as floats rather than raw bytes
    (which onnx keeps inline at any size), a segment field, in an opset ONNX Runtime runs."""
    rng = np.random.default_rng(0)
    sizes = {"tiny": 16, "edge_in": 990, "edge_out": 991, "big": 70_000}
    weights = [numpy_helper.from_array(rng.integers(0, 255, n, dtype=np.uint8), name) for name, n in sizes.items()]
    floats = helper.make_tensor("floats", onnx.TensorProto.FLOAT, [600], rng.standard_normal(600).tolist())
    matrix = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    matrix.doc_string = "a 64 x 64 weight"
    weights[0].segment.begin, weights[0].segment.end = 0, 16
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [*weights, floats, matrix],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_written_beside_the_graph_are_laid_out_as_onnx_lays_them_out(tmp_path: Path) -> None:
    model = _weights_of_every_size()
    before = model.SerializeToString()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    save_graph_atomically(model, ours / "model.onnx", external=True)
    onnx.save_model(
        onnx.ModelProto.FromString(before), str(theirs / "model.onnx"),
        save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
    )  # fmt: skip
    for name in ("model.onnx", "model.onnx.data"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    assert sorted(p.name for p in ours.iterdir()) == ["model.onnx", "model.onnx.data"]  # no temporary left
    moved = {t.name for t in onnx.load(str(ours / "model.onnx"), load_external_data=False).graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL}  # fmt: skip
    assert moved == {"edge_out", "big", "w"}


@pytest.mark.parametrize("external", [False, True])
def test_weights_held_apart_are_written_where_the_model_would_hold_them(tmp_path: Path, external: bool) -> None:
    """A weight may be a stub (name, type, dims) whose bytes are held apart, as the export hands over
    torch's tensors: the files are those written from the model holding every weight, one file or
    with its `.data`, weights below onnx's inline limit kept in the graph; the size is the same."""
    from btdeploy.artifacts.streamed_proto import encoded_size

    whole = _weights_of_every_size()
    light, apart = onnx.ModelProto(), {}
    light.CopyFrom(whole)
    for tensor in light.graph.initializer:
        if tensor.HasField("raw_data") and not tensor.doc_string:  # the export's stubs have no later fields
            apart[tensor.name] = memoryview(bytearray(tensor.raw_data))
            tensor.ClearField("raw_data")
    assert sorted(apart) == ["big", "edge_in", "edge_out", "tiny"]
    assert encoded_size(light, apart) == whole.ByteSize() > encoded_size(light) + 70_000
    save_graph_atomically(whole, tmp_path / "whole.onnx", external)
    save_graph_atomically(light, tmp_path / "apart.onnx", external, apart)
    assert all(not t.HasField("raw_data") for t in light.graph.initializer if t.name in apart)  # left as it was
    names = [".onnx", ".onnx.data"] if external else [".onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{g}{n}" for g in ("whole", "apart") for n in names)
    for name in names:
        data = (tmp_path / f"apart{name}").read_bytes()
        assert data == (tmp_path / f"whole{name}").read_bytes().replace(b"whole.onnx.data", b"apart.onnx.data"), name


def test_a_graph_saved_with_its_weights_beside_it_keeps_them_in_memory(tmp_path: Path) -> None:
    """onnx.save_model strips the weights from the model it saves (they then name the temporary file
    they went to): a second save, or a session from the same model, found none."""
    import onnxruntime

    model = _weights_of_every_size()
    before = model.SerializeToString()
    save_graph_atomically(model, tmp_path / "first.onnx", external=True)
    assert model.SerializeToString() == before
    save_graph_atomically(model, tmp_path / "second.onnx", external=True)
    feed = {"x": np.ones((1, 64), np.float32)}
    inline = onnxruntime.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    for name in ("first.onnx", "second.onnx"):
        session = onnxruntime.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, feed)[0], inline)


def test_the_graph_and_its_weights_get_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    """Both files readable by whoever may read the folder's other files (a server running as
    another user reads both); mkstemp, and onnx's data writer, make them owner-only."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    save_graph_atomically(_weights_of_every_size(), tmp_path / "model.onnx", external=True)
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / name).stat().st_mode == plain.stat().st_mode, name


def test_a_failed_rename_leaves_no_temporary_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def graph_rename_fails(source: Path, target: Path) -> None:
        if Path(target).name == "model.onnx":
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(onnx_files.os, "replace", graph_rename_fails)
    with pytest.raises(OSError, match="No space"):
        save_graph_atomically(_weights_of_every_size(), tmp_path / "model.onnx", external=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_a_graph_whose_weights_file_was_left_behind_says_which_file(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A graph past 2 GB is two files; a copy of the graph alone was refused as 'damaged, make it
    again' (an hour on large) or with ONNX Runtime's file-size error and a hint about operators,
    which ONNX Runtime had also printed to stderr itself before btdeploy's line."""
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
    from btdeploy.errors import BtDeployError

    model = _weights_of_every_size()
    whole, split = tmp_path / "whole.onnx", tmp_path / "split.onnx"
    save_graph_atomically(model, whole, external=False)
    save_graph_atomically(model, split, external=True)
    assert onnx_files.missing_weight_files(whole) == onnx_files.missing_weight_files(split) == []
    assert onnx_files.missing_weights_problem(split) is None
    OnnxRuntimeBackend(split, ["y"], ["cpu"])  # loads while the weights are there
    onnx_files.data_file(split).unlink()
    assert onnx_files.missing_weight_files(split) == ["split.onnx.data"]
    for attempt in (
        lambda: onnx_files.load_graph(split, "export again"),
        lambda: OnnxRuntimeBackend(split, ["y"], ["cpu"]),
    ):
        with pytest.raises(BtDeployError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"{split} keeps its weights in split.onnx.data, which is not beside it: copy it")
        assert "\n" not in message
    assert "onnxruntime" not in capfd.readouterr().err
    # A graph in one file that cannot be read is still called what it is.
    whole.write_bytes(b"\x00" * 100)
    assert onnx_files.missing_weight_files(whole) == []
    with pytest.raises(BtDeployError, match="cannot read"):
        onnx_files.load_graph(whole, "export again")
