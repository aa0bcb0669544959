"""Graph passes: every attention block and bridge fused, in both flavours, at FP32 parity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import btdeploy
from btdeploy.artifacts.graph_names import Flavour, graph_file
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.tensorrt.operators import check_tensorrt_ops
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS
from btdeploy.model.inputs import sample_inputs
from btdeploy.optimize.optimizer import optimize_head
from btdeploy.verify.check import check_export

FUSED_ATTENTION_OPS = {"ort": {("", "Attention")}, "trt": {("", "Attention")}}


def _ops(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.domain or "", n.op_type) for n in model.graph.node]


@pytest.mark.parametrize("flavour", ["ort", "trt"])
@pytest.mark.parametrize("head", list(HEADS))
def test_every_attention_block_and_bridge_is_fused(optimized: Path, head: str, flavour: str) -> None:
    manifest = read_manifest(optimized / head)
    config = manifest.config
    plain = onnx.load(str(optimized / head / "model.onnx"))
    fused = onnx.load(str(optimized / head / f"model.{flavour}.onnx"))
    # M from the config must equal what the plain graph holds: one Softmax per live block.
    expected = HEADS[head].attention_blocks(config)
    assert sum(op == "Softmax" for _, op in _ops(plain)) == expected
    record = manifest.data["optimized"][flavour]
    assert record["attention_fused"] == record["attention_expected"] == expected
    assert sum(op in FUSED_ATTENTION_OPS[flavour] for op in _ops(fused)) == expected
    assert not any(op == "Softmax" for _, op in _ops(fused)), "an attention block was left unfused"
    assert record["bridges_fused"] == HEADS[head].bridges(config) == 2 * (config.num_hidden_layers - 1)
    if flavour == "ort":
        assert sum(op == ("com.microsoft", "SkipLayerNormalization") for op in _ops(fused)) > HEADS[head].bridges(
            config
        )
    else:
        assert check_tensorrt_ops(fused).passed
        assert record["tensorrt_op_check"] == {"passed": True, "unsupported": []}
        assert next(o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")) == 23
        assert all(domain == "" for domain, _ in _ops(fused))
        assert sum(op == "LayerNormalization" for _, op in _ops(fused)) == sum(
            op == "LayerNormalization" for _, op in _ops(plain)
        )


@pytest.mark.parametrize("flavour", ["ort", "trt"])
@pytest.mark.parametrize("head", list(HEADS))
def test_cls_only_heads_compute_one_row_of_the_last_layer(optimized: Path, head: str, flavour: str) -> None:
    passes = {p["name"]: p for p in read_manifest(optimized / head).data["optimized"][flavour]["passes"]}
    cls_rows = passes["[CLS]-only rows"]
    # itm and itc read the last cross layer of both stacks through the poolers only: all four
    # of its attention blocks run for one query row. base and mlm read every row.
    assert cls_rows["fused"] == (4 if head in ("itm", "itc") else 0)
    # Each node on the one-row path is rewritten in place of its full-size self; what is added is a
    # Slice where a tensor is also read in full (a link tower's output, as the keys and values).
    sliced = cls_rows["details"]["full_tensors_sliced"]
    assert sliced >= 2 if head in ("itm", "itc") else sliced == 0  # at least both link towers' outputs
    assert cls_rows["nodes_after"] <= cls_rows["nodes_before"] + sliced
    # In the ort flavour those four attend to their keys' source unprojected (no K/V projection
    # of every key); the trt flavour keeps one K/V projection per head.
    absorbed = passes["attention"]["details"]["one_row_absorbed"]
    assert absorbed == (cls_rows["fused"] if flavour == "ort" else 0)
    fused = onnx.load(str(optimized / head / f"model.{flavour}.onnx"), load_external_data=False)
    producers = {o: n for n in fused.graph.node for o in n.output}
    attention = [n for n in fused.graph.node if n.op_type == "Attention"]
    key_sources = [producers[n.input[1]].op_type for n in attention]
    assert key_sources.count("Unsqueeze") == absorbed
    # No bias Add runs over the keys or values of any block.
    assert {producers[name].op_type for n in attention for name in n.input[1:3]} <= {"MatMul", "Unsqueeze"}


@pytest.mark.parametrize("flavour", ["ort", "trt"])
def test_shared_weights_are_read_without_identity_copies(optimized: Path, flavour: str) -> None:
    # The cross-modal transforms run once per cross layer with one weight, which the TorchScript
    # exporter hands out through Identity copies (the dynamo exporter reads the one initializer);
    # quantizers skip a MatMul whose weight is not constant.
    from btdeploy.export.exporter import exported_with

    plain = onnx.load(str(optimized / "itm" / "model.onnx"))
    initializers = {t.name for t in plain.graph.initializer}
    copies = [n for n in plain.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    if exported_with(read_manifest(optimized / "itm")) == "torchscript":
        assert copies, "the export no longer reads shared weights through Identity: drop this step"
    else:
        assert copies == []
    model = onnx.load(str(optimized / "itm" / graph_file(Flavour(flavour))))
    initializers = {t.name for t in model.graph.initializer}
    assert [n.name for n in model.graph.node if n.op_type == "Identity" and n.input[0] in initializers] == []
    passes = {p["name"]: p for p in read_manifest(optimized / "itm").data["optimized"][flavour]["passes"]}
    assert passes["shared weights"]["details"]["weight_identities_bypassed"] == len(copies)


def _no_op_casts(model: onnx.ModelProto) -> list[str]:
    """The Casts to the type their input already has, by ONNX's type inference."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in inferred.initializer}
    types |= {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info]}
    to = {n.name: next(a.i for a in n.attribute if a.name == "to") for n in inferred.node if n.op_type == "Cast"}
    return [n.name for n in inferred.node if n.op_type == "Cast" and types.get(n.input[0]) == to[n.name]]


@pytest.mark.parametrize("flavour", ["ort", "trt"])
@pytest.mark.parametrize("head", list(HEADS))
def test_no_cast_to_the_type_a_tensor_already_has_is_left(optimized: Path, head: str, flavour: str) -> None:
    # The TorchScript export casts the pixels and each bridge-read vision layer's residual sum from
    # FP32 to FP32 (and itc's embeddings on their way out); the Cast between such a sum and its
    # LayerNorm had hidden the pair from the residual fusion (six of them on base).
    from btdeploy.export.exporter import exported_with

    manifest = read_manifest(optimized / head)
    plain = _no_op_casts(onnx.load(str(optimized / head / "model.onnx")))
    if exported_with(manifest) == "torchscript":
        assert len(plain) >= 2 + 1, plain  # the pixels' two, and at least one bridge-read residual sum
    details = {p["name"]: p for p in manifest.data["optimized"][flavour]["passes"]}["no-op casts"]["details"]
    assert details["no_op_casts_bypassed"] + details["output_casts_dropped"] == len(plain)
    fused = onnx.load(str(optimized / head / f"model.{flavour}.onnx"))
    assert _no_op_casts(fused) == []
    assert [o.name for o in fused.graph.output] == HEADS[head].output_names


def test_a_checkpoint_saved_right_after_initialisation_fuses_every_block(tmp_path: Path) -> None:
    # transformers initialises every bias to zeros and every LayerNorm weight to ones; the TorchScript
    # exporter then reads all equal weights through Identity copies of one tensor, and the fusions,
    # which find a projection's bias only as a constant, fused no attention block of such a checkpoint.
    # (The dynamo exporter keeps equal weights apart.)
    import torch
    from transformers import BridgeTowerForImageAndTextRetrieval

    from btdeploy.export.exporter import export_head
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.model.configs import build_config

    torch.manual_seed(0)
    BridgeTowerForImageAndTextRetrieval(build_config("tiny")).save_pretrained(tmp_path / "fresh")
    export_head(resolve_model(str(tmp_path / "fresh")), "itm", tmp_path / "out", exporter="torchscript")
    plain = onnx.load(str(tmp_path / "out" / "itm" / "model.onnx"))
    initializers = {t.name for t in plain.graph.initializer}
    copies = [n for n in plain.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    expected = HEADS["itm"].attention_blocks(read_manifest(tmp_path / "out" / "itm").config)
    assert len(copies) > 3 * expected, "the exporter no longer shares equal weights: this test checks nothing"
    for flavour in ("ort", "trt", "trt-compat"):
        summary = optimize_head(tmp_path / "out" / "itm", flavour)
        assert summary["attention_fused"] == summary["attention_expected"] == expected, flavour
        assert summary["bridges_fused"] == HEADS["itm"].bridges(read_manifest(tmp_path / "out" / "itm").config)
    for flavour in ("ort", "trt"):
        rows = check_export(tmp_path / "out", batch_sizes=(2,), text_lengths=(7,), flavour=flavour)
        assert rows and all(row.passed for row in rows), flavour


@pytest.mark.parametrize("flavour", ["ort", "trt"])
def test_optimized_graphs_keep_fp32_parity(optimized: Path, flavour: str) -> None:
    rows = check_export(optimized, batch_sizes=(1, 3), text_lengths=(2, 33), flavour=flavour)
    assert len(rows) == sum(len(h.outputs) for h in HEADS.values())
    for row in rows:
        assert row.passed, (row.head, row.output, row.stats.max_abs, row.stats.cosine)


def test_interpolate_bridges_fuse_too(non_default_checkpoint: Path, tmp_path: Path) -> None:
    import json

    from btdeploy.export.exporter import export_head
    from btdeploy.model.checkpoints import resolve_model

    folder = tmp_path / "ckpt"
    shutil.copytree(non_default_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["link_tower_type"] = "interpolate"
    (folder / "config.json").write_text(json.dumps(config))
    export_head(resolve_model(str(folder), seed=3), "itm", tmp_path / "out")
    for flavour in ("ort", "trt"):
        summary = optimize_head(tmp_path / "out" / "itm", flavour)
        assert summary["bridges_fused"] == 2 and summary["attention_fused"] == summary["attention_expected"] == 16
    rows = check_export(tmp_path / "out", batch_sizes=(2,), text_lengths=(7,), flavour="ort")
    assert all(row.passed for row in rows)


def test_a_tower_with_tanh_gelu_is_fused_as_fully_as_with_gelu(non_default_checkpoint: Path, tmp_path: Path) -> None:
    """hidden_act gelu_new (tanh GELU, with Pow(x, 3)) had stayed as exported: eight operators per
    FFN; its Pow also stopped the [CLS]-only rows pass, so the last layer's attention ran for every
    row. (It had first left the ort graph's node list out of order where the cleanup swept it:
    `graph has a cycle or a dangling input`, a traceback from optimize.)"""
    import json

    from btdeploy.export.exporter import export_head
    from btdeploy.model.checkpoints import resolve_model

    folder = tmp_path / "ckpt"
    shutil.copytree(non_default_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu_new"
    (folder / "config.json").write_text(json.dumps(config))
    details: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for act, source in (("gelu", non_default_checkpoint), ("gelu_new", folder)):
        export_head(resolve_model(str(source), seed=3), "itm", tmp_path / act)
        for flavour in ("ort", "trt"):
            summary = optimize_head(tmp_path / act / "itm", flavour)
            assert summary["attention_fused"] == summary["attention_expected"] == 16
            details[act, flavour] = {p["name"]: p["details"] for p in summary["passes"]}
    for flavour in ("ort", "trt"):
        plain, tanh = details["gelu", flavour], details["gelu_new", flavour]
        assert tanh["[CLS]-only rows"] == plain["[CLS]-only rows"]
        assert tanh["[CLS]-only rows"]["attention_blocks_one_row"] > 0
        assert tanh["GELU/QuickGELU + bias"]["gelu_tanh"] == plain["GELU/QuickGELU + bias"]["gelu"] > 0
        graph = onnx.load(str(tmp_path / "gelu_new" / "itm" / f"model.{flavour}.onnx"))
        ops = [n.op_type for n in graph.graph.node]
        assert "Pow" not in ops and ops.count("Tanh") == plain["[CLS]-only rows"]["poolers"]  # the poolers' alone
        rows = check_export(tmp_path / "gelu_new", batch_sizes=(2,), text_lengths=(7,), flavour=flavour)
        assert rows and all(row.passed for row in rows), flavour
    assert details["gelu_new", "ort"]["GELU/QuickGELU + bias"]["bias_folded"] == details["gelu", "ort"][
        "GELU/QuickGELU + bias"]["bias_folded"]  # fmt: skip


def test_the_operator_check_rejects_contrib_and_unknown_ops(optimized: Path) -> None:
    ort_graph = onnx.load(str(optimized / "itm" / "model.ort.onnx"))
    verdict = check_tensorrt_ops(ort_graph)
    assert not verdict.passed
    assert any(item.startswith("com.microsoft::SkipLayerNormalization") for item in verdict.unsupported)
    trt_graph = onnx.load(str(optimized / "itm" / "model.trt.onnx"))
    assert check_tensorrt_ops(trt_graph).passed
    planted = helper.make_node("FastGelu", [trt_graph.graph.node[0].output[0]], ["planted"], domain="com.microsoft")
    trt_graph.graph.node.append(planted)
    assert check_tensorrt_ops(trt_graph).unsupported == ["com.microsoft::FastGelu (1)"]
    trt_graph.graph.node.append(helper.make_node("StringNormalizer", ["planted"], ["planted2"]))
    assert "StringNormalizer (1)" in check_tensorrt_ops(trt_graph).unsupported


def test_runtime_loads_a_flavour_and_says_how_to_make_a_missing_one(optimized: Path, tmp_path: Path) -> None:
    runtime = btdeploy.load(optimized, head="itc", flavour="ort")
    reference = btdeploy.load(optimized, head="itc")
    feeds = sample_inputs(runtime.config, 2, 6)
    np.testing.assert_allclose(runtime(**feeds).cross_embeds, reference(**feeds).cross_embeds, atol=1e-5)
    bare = tmp_path / "itm"
    shutil.copytree(optimized / "itm", bare)
    (bare / "model.trt.onnx").unlink()
    with pytest.raises(BtDeployError, match="model.trt.onnx does not exist: run btdeploy optimize .* --flavour trt"):
        btdeploy.load(bare, flavour="trt")


def test_optimize_refuses_a_damaged_model(tiny_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "itm"
    shutil.copytree(tiny_export / "itm", folder)
    (folder / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BtDeployError, match=r"model.onnx is not the graph its manifest recorded \(11 bytes.*make it"):
        optimize_head(folder, "ort")
    assert not (folder / "model.ort.onnx").exists()
