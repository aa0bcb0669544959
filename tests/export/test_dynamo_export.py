"""Export with torch's torch.export-based exporter (`--exporter dynamo`): the same graph interface,
parity, fusions and names the passes read as the TorchScript export, no stack traces, and an
opset conversion that keeps every reduction's axes."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import onnx
import pytest
from onnx import helper

from btdeploy.errors import BtDeployError
from btdeploy.export.exporter import export_head, exported_with
from btdeploy.model.checkpoints import resolve_model
from btdeploy.model.heads import HEADS
from btdeploy.optimize.optimizer import optimize_head
from btdeploy.verify.check import check_export

# itc: both towers, both bridges, every attention block, and the embeddings' L2 norms (ReduceL2,
# whose axes moved from input to attribute when opset 18 was converted to 17).
HEAD = "itc"


def _traced_bridgetower_graphs() -> list[object]:
    gc.collect()
    return [
        found
        for found in gc.get_objects()
        if type(found).__name__ == "GraphModule" and any("bridgetower" in node.name for node in found.graph.nodes)
    ]


# Traced graphs alive before the module's export: torch.compile (the torch-compile peer, run earlier
# by the same worker) keeps its own in dynamo's cache for as long as the process lives.
_GRAPHS_BEFORE_THE_EXPORT: weakref.WeakSet[object] = weakref.WeakSet()


@pytest.fixture(scope="module")
def dynamo_export(tmp_path_factory: pytest.TempPathFactory, private_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("dynamo-export")
    _GRAPHS_BEFORE_THE_EXPORT.update(_traced_bridgetower_graphs())
    export_head(resolve_model("tiny"), HEAD, out, exporter="dynamo")
    return out


def _model(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / HEAD / "model.onnx"))


def test_the_dynamo_export_has_the_heads_interface_and_its_parity(dynamo_export: Path) -> None:
    model = _model(dynamo_export)
    onnx.checker.check_model(model)
    head = HEADS[HEAD]
    assert [i.name for i in model.graph.input] == head.input_names
    assert [o.name for o in model.graph.output] == head.output_names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch", "text_length"] and dims["pixel_values"] == ["batch", 3, 64, 64]
    assert [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")] == [17]
    # No initializer writes out its (default) data location: the graph serializes as the TorchScript
    # one does, which quantize's byte-for-byte comparison with ONNX Runtime's own tool had failed on.
    assert not any(tensor.HasField("data_location") for tensor in model.graph.initializer)
    manifest = json.loads((dynamo_export / HEAD / "manifest.json").read_text())
    assert "torch.export" in manifest["onnx"]["exporter"] and manifest["onnx"]["opset"] == 17
    rows = check_export(dynamo_export, batch_sizes=(1, 3), text_lengths=(5, 40))
    assert len(rows) == len(head.outputs)
    for row in rows:
        assert row.passed and row.stats.max_abs <= 1e-4, f"{row.output}: max_abs {row.stats.max_abs:.2e}"


def test_no_tensor_of_the_exporter_outlives_the_export(dynamo_export: Path) -> None:
    # ONNX Script's rule matchers had kept the last export's graph, and with it the model's tensors
    # wrapped in the exporter's TorchTensor (212 of them on tiny itc; 1.5 GB on base itm).
    gc.collect()
    assert not [found for found in gc.get_objects() if type(found).__name__ == "TorchTensor"]
    # torch.export's map from each traced fake tensor to its node had kept the traced graph alive.
    traced = [graph for graph in _traced_bridgetower_graphs() if graph not in _GRAPHS_BEFORE_THE_EXPORT]
    assert traced == []


def test_the_reductions_keep_their_axes_through_the_opset_conversion(dynamo_export: Path) -> None:
    # ONNX's converter read the axes input only from int64_data; from raw_data it wrote axes=[],
    # a reduction over every axis, which parity at batch 3 had failed by 0.2.
    norms = [node for node in _model(dynamo_export).graph.node if node.op_type == "ReduceL2"]
    assert len(norms) == 3  # text, image and cross embeddings
    for node in norms:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"axes": [-1], "keepdims": 1}, node.name
        assert len(node.input) == 1  # the axes input became the attribute


def test_nodes_are_named_by_their_module_and_carry_no_stack_trace(dynamo_export: Path) -> None:
    model = _model(dynamo_export)
    bridges = [n for n in model.graph.node if n.op_type == "LayerNormalization" and "link_tower" in n.input[1]]
    assert len(bridges) == 2 and all("_link_tower.0.LayerNorm/" in n.name for n in bridges)
    assert all(n.name.startswith("/") for n in model.graph.node if n.op_type == "MatMul")
    assert not any(n.metadata_props for n in model.graph.node)
    text = model.SerializeToString()
    assert b".py" not in text and b"stack_trace" not in text  # no paths of the machine that exported


def test_every_flavour_fuses_every_block_of_the_dynamo_export(dynamo_export: Path) -> None:
    # tiny: 3 text and 3 vision self-attention blocks, 2 cross-modal layers of 4 blocks, 2 bridges.
    for flavour in ("ort", "trt", "trt-compat"):
        summary = optimize_head(dynamo_export / HEAD, flavour)  # fewer fused blocks than declared raises
        assert (summary["attention_fused"], summary["bridges_fused"]) == (14, 2), flavour
        folded = next(p for p in summary["passes"] if p["name"] == "weight layouts")
        assert folded["details"]["slice_folded"] == 9  # Q, K and V of the 3 packed vision in-projections
    rows = check_export(dynamo_export, batch_sizes=(1, 3), text_lengths=(5, 40), flavour="ort")
    assert len(rows) == len(HEADS[HEAD].outputs)
    assert all(row.passed and row.stats.max_abs <= 1e-4 for row in rows)


def test_an_export_is_kept_only_for_the_same_exporter(dynamo_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(dynamo_export, folder)
    kept = export_head(resolve_model("tiny"), HEAD, folder, reuse=True, exporter="dynamo")
    assert kept.reused and exported_with(kept) == "dynamo"
    again = export_head(resolve_model("tiny"), HEAD, folder, reuse=True, exporter="torchscript")
    assert not again.reused and "TorchScript" in again.data["onnx"]["exporter"]
    assert exported_with(again) == "torchscript"


def test_an_unknown_exporter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BtDeployError, match="--exporter fx is not known: use one of torchscript, dynamo"):
        export_head(resolve_model("tiny"), HEAD, tmp_path, exporter="fx")
    assert not any(tmp_path.iterdir())
