"""`optimize` fails when fewer attention blocks fuse than the head declares, says why, and keeps
the partly fused graph only when asked to."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.optimizer import optimize_head


def _break_one_scale(path: Path) -> None:
    """Read one block's query scale through an Identity of a Constant node, so it is no longer a
    constant to the fusions (an Identity of an initializer, the shared-weights pass would undo)."""
    model = onnx.load(str(path))
    graph = Graph(model)
    for node in graph.graph.node:
        if node.op_type != "Mul":
            continue
        for index, name in enumerate(node.input):
            value = graph.constant(name)
            if value is not None and value.size == 1 and np.isclose(float(value.reshape(())), 32**-0.5):
                scale = helper.make_tensor("planted_value", onnx.TensorProto.FLOAT, [], [float(value.reshape(()))])
                graph.graph.node.append(helper.make_node("Constant", [], ["planted_value"], value=scale))
                planted = helper.make_node("Identity", ["planted_value"], ["planted_scale"], name="planted")
                graph.graph.node.append(planted)
                node.input[index] = "planted_scale"
                graph.toposort()
                onnx.save(graph.model, str(path))
                manifest = read_manifest(path.parent)  # recorded, as an export that made it would have
                manifest.record_graph(path)
                manifest.write()
                return
    raise AssertionError("no query scale found: the export changed")


def test_a_block_that_does_not_fuse_fails_optimize_with_the_reason(tiny_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "itm"
    shutil.copytree(tiny_export / "itm", folder)
    _break_one_scale(folder / "model.onnx")
    with pytest.raises(BtDeployError) as error:
        optimize_head(folder, "trt")
    message = str(error.value)
    assert "fused 13 of 14 attention blocks" in message and "not scaled by a constant Mul" in message
    assert "--allow-partial" in message and "\n" not in message
    assert not (folder / "model.trt.onnx").exists()
    summary = optimize_head(folder, "trt", allow_partial=True)
    assert summary["partial"] and summary["attention_fused"] == 13 and summary["attention_expected"] == 14
    assert (folder / "model.trt.onnx").is_file()
