"""The trt-compat flavour: graphs for every TensorRT from 10.3 (JetPack 6). Attention stays the
canonical MatMul -> Softmax -> MatMul pattern TensorRT fuses itself, every operator is in the
10.3 parser's list, and the graphs go through quantize and check like any other."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from btdeploy.artifacts.graph_names import Flavour, Precision, graph_file
from btdeploy.artifacts.manifest import Manifest, read_manifest
from btdeploy.backends.tensorrt.build import choose_graph
from btdeploy.backends.tensorrt.operators import check_tensorrt_ops, line_table
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS
from btdeploy.quantize.quantizer import quantize_head
from btdeploy.verify.check import check_export


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("head", list(HEADS))
def test_every_block_is_kept_canonical_and_parses_on_10_3(optimized: Path, head: str) -> None:
    manifest = read_manifest(optimized / head)
    record = manifest.data["optimized"]["trt-compat"]
    expected = HEADS[head].attention_blocks(manifest.config)
    assert record["attention_fused"] == record["attention_expected"] == expected and not record["partial"]
    assert record["bridges_fused"] == record["bridges_expected"]
    assert record["requires"] == {"tensorrt": "TensorRT 10.3"}
    assert record["tensorrt_op_check"] == {"passed": True, "unsupported": []}
    model = onnx.load(str(optimized / head / "model.trt-compat.onnx"))
    ops = [(n.domain or "", n.op_type) for n in model.graph.node]
    assert ("", "Attention") not in ops and all(domain == "" for domain, _ in ops)
    assert sum(op == "Softmax" for _, op in ops) == expected  # one per block, in TensorRT's fusable form
    assert {op for _, op in ops} <= set(line_table("10.3")["operators"])
    assert _opset(model) <= 20
    # The trt graph of the same head needs 10.14: the check of the 10.3 list names why.
    trt = onnx.load(str(optimized / head / "model.trt.onnx"))
    assert check_tensorrt_ops(trt, "10.14").passed
    assert set(check_tensorrt_ops(trt, "10.3").unsupported) >= {f"Attention ({expected})", "opset 23 outside 9..20"}


def test_fp32_parity(optimized: Path) -> None:
    rows = check_export(optimized, batch_sizes=(1, 3), text_lengths=(2, 33), flavour="trt-compat")
    assert len(rows) == sum(len(h.outputs) for h in HEADS.values()) and all(row.passed for row in rows)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantized_graphs_meet_the_floors_and_stay_in_the_10_3_list(
    optimized: Path, tmp_path: Path, precision: str
) -> None:
    import shutil

    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    summary = quantize_head(folder, precision, "trt-compat")
    assert summary["source"] == "model.trt-compat.onnx"  # standard ONNX already: its own graph
    assert summary["graph"]["tensorrt_op_check"] == "passed"
    model = onnx.load(str(folder / graph_file(Flavour.TRT_COMPAT, Precision(precision))))
    assert check_tensorrt_ops(model, "10.3").passed and _opset(model) <= 20
    rows = check_export(folder, flavour="trt-compat", precision=precision, batch_sizes=(1, 3), text_lengths=(5, 40))
    assert all(row.passed for row in rows), [(r.output, r.stats.cosine) for r in rows]


def test_build_picks_the_graph_the_installed_tensorrt_parses(tmp_path: Path) -> None:
    folder = tmp_path / "itm"
    folder.mkdir()
    manifest = Manifest(folder, {"head": "itm"})
    (folder / "model.trt-compat.fp16.onnx").write_bytes(b"graph")
    path, why = choose_graph(manifest, Precision.FP16, "10.3.0")
    assert path.name == "model.trt-compat.fp16.onnx"
    assert "passed over: model.trt.fp16.onnx needs TensorRT 10.14" in why
    path, why = choose_graph(manifest, Precision.FP16, "11.4.0")  # no trt graph yet: the compat one
    assert path.name == "model.trt-compat.fp16.onnx" and "model.trt.fp16.onnx does not exist" in why
    (folder / "model.trt.fp16.onnx").write_bytes(b"graph")
    assert choose_graph(manifest, Precision.FP16, "10.14.1")[0].name == "model.trt.fp16.onnx"
    with pytest.raises(BtDeployError) as error:
        choose_graph(manifest, Precision.INT8, "10.3.0")
    message = str(error.value)
    assert message.startswith("no int8 graph that TensorRT 10.3.0 can parse: model.trt.int8.onnx needs TensorRT 10.14")
    assert "btdeploy quantize" in message and "--flavour trt-compat --precision int8" in message
