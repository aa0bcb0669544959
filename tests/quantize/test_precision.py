"""Precision in the graph: FP16 islands, symmetric INT8 Q/DQ, dynamic INT8, and their parity floors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import benchmark_module, spying
from onnx import numpy_helper

from btdeploy.artifacts.graph_names import Flavour, Precision, graph_file
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
from btdeploy.backends.targets import TARGETS, RunOptions
from btdeploy.cli import main
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS
from btdeploy.model.inputs import sample_inputs
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.graph_checks import fp16_unsafe_constants, layernorm_types, qdq_summary
from btdeploy.optimize.passes.integer_matmul import INTEGER_MATMULS
from btdeploy.optimize.passes.layernorm import is_add_layernorm
from btdeploy.quantize import quantizer
from btdeploy.quantize.calibration import load_calibration
from btdeploy.quantize.int8 import (
    calibrated_int8,
    encode_activations,
    int8_flavour_form,
    int8_from_twin,
    int8_twin_converts,
)
from btdeploy.quantize.methods import PRECISIONS
from btdeploy.quantize.quantizer import quantize_head
from btdeploy.quantize.rows import ArrayRows
from btdeploy.verify.check import check_export

CALIB_SIZE = 4  # generated rows: enough for ranges on tiny graphs, quick in CI
TRT_HEADS = ("itm", "mlm")  # the TensorRT-flavour graphs checked here (one pooled, one per token)


@pytest.fixture(scope="module")
def quantized(optimized: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every head in all three ort precisions; itm and mlm also in the trt precisions."""
    out = tmp_path_factory.mktemp(f"quantized-{optimized.name}")
    for head in HEADS:
        shutil.copytree(optimized / head, out / head)
        for precision in PRECISIONS:
            quantize_head(out / head, precision, "ort", calib_size=CALIB_SIZE)
        if head in TRT_HEADS:
            for trt_precision in ("fp16", "int8"):
                quantize_head(out / head, trt_precision, "trt", calib_size=CALIB_SIZE)
    return out


def _graphs(folder: Path, precision: str) -> list[tuple[str, onnx.ModelProto]]:
    found = []
    for head in HEADS:
        for flavour in ("ort", "trt"):
            path = folder / head / graph_file(Flavour(flavour), Precision(precision))
            if path.is_file():
                found.append((f"{head}/{path.name}", onnx.load(str(path))))
    return found


def _reaches_layernorm(users: dict[str, onnx.NodeProto], name: str) -> bool:
    user = users.get(name)
    while user is not None and user.op_type == "Cast":
        user = users.get(user.output[0])
    return user is not None and user.op_type == "LayerNormalization"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_head_meets_the_precision_floors(quantized: Path, precision: str) -> None:
    rows = check_export(quantized, batch_sizes=(1, 3), text_lengths=(5, 40), flavour="ort", precision=precision)
    assert len(rows) == sum(len(h.outputs) for h in HEADS.values())
    floor = 0.999 if precision == "fp16" else 0.99
    for row in rows:
        assert row.stats.non_finite == 0
        assert row.stats.cosine >= floor, (row.head, row.output, row.stats.cosine)
        agreement = row.stats.argmax_agreement
        if agreement is not None:
            assert agreement >= (1.0 if precision == "fp16" else 0.99), (row.head, row.output, agreement)
        assert row.passed, (row.head, row.output, row.stats)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_trt_precision_graphs_meet_the_floors(quantized: Path, precision: str) -> None:
    rows = check_export(quantized, list(TRT_HEADS), (2,), (7, 40), flavour="trt", precision=precision)
    assert rows and all(row.passed for row in rows), [(r.head, r.output, r.stats.cosine) for r in rows]


def test_the_trt_int8_graphs_fp16_attention_and_quantize_run_in_fp32_on_the_cpu(quantized: Path) -> None:
    """Next to FP16 DequantizeLinear nodes ONNX Runtime would run these on its reference FP16 kernel."""
    folder = quantized / "itm"
    graph = onnx.load(str(folder / graph_file(Flavour.TRT, Precision.INT8)), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    attention = [n for n in graph.graph.node if n.op_type == "Attention"]
    assert attention and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT16 for n in attention)
    options = RunOptions(flavour=Flavour.TRT, precision=Precision.INT8)
    backend = TARGETS["onnxruntime"].make(read_manifest(folder), options)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.attention_in_fp32 == len(attention)
    # ... and its activation QuantizeLinear nodes (FP16 inputs) round from FP32, as ONNX says.
    quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and backend.quantize_in_fp32 == len(quantize)


@pytest.mark.parametrize("native", [[], ["avx512_vnni"]], ids=["saturating-cpu", "vnni-cpu"])
def test_only_graphs_that_may_hold_fp16_or_saturating_gemms_are_parsed_for_the_cpu_rewrite(
    quantized: Path, monkeypatch: pytest.MonkeyPatch, native: list[str]
) -> None:
    """FP16 operators for their FP32 stand-ins; the ort INT8 graphs' uint8 x int8 GEMMs for exact
    sums, only where this CPU's kernel would saturate (the trt INT8 graph's are int8 x int8)."""
    import btdeploy.cpu
    from btdeploy.backends import onnxruntime as ort_backend

    monkeypatch.setattr(btdeploy.cpu, "exact_integer_sums", lambda *_: list(native))

    parsed: list[str] = []
    real = ort_backend._CpuRewrites.source

    def recording(self: ort_backend._CpuRewrites, path: Path, options: object) -> str | bytes:
        if self.fp32_stand_ins or self.exact_sums:  # the two rewrites that parse the graph
            parsed.append(path.name)
        return real(self, path, options)

    monkeypatch.setattr(ort_backend._CpuRewrites, "source", recording)
    manifest = read_manifest(quantized / "itm")
    for flavour, precision in [
        (Flavour.ORT, Precision.INT8),  # FP32 around the Q/DQ, as its record says
        (Flavour.ORT, Precision.INT8_DYNAMIC),
        (Flavour.TRT, Precision.INT8),
        (Flavour.ORT, Precision.FP16),
    ]:
        TARGETS["onnxruntime"].make(manifest, RunOptions(flavour=flavour, precision=precision))
    recoded = [] if native else ["model.ort.int8.onnx", "model.ort.int8-dynamic.onnx"]
    assert parsed == [*recoded, "model.trt.int8.onnx", "model.ort.fp16.onnx"]


def test_int8_qdq_is_symmetric_and_keeps_norms_and_residuals_out(quantized: Path) -> None:
    graphs = _graphs(quantized, "int8")
    assert len(graphs) == len(HEADS) + len(TRT_HEADS)
    for name, model in graphs:
        # Weights int8 and zero point 0; activations in TensorRT's code (int8, 0) in the trt graphs
        # and in ONNX Runtime's (uint8, 128: the same values) in the ort graph.
        ort_graph = ".ort." in name
        activation_type, activation_zero = (onnx.TensorProto.UINT8, 128) if ort_graph else (onnx.TensorProto.INT8, 0)
        summary = qdq_summary(model, activation_type, activation_zero)
        assert summary.asymmetric == [] and summary.wrong_type == [], name
        # ... which the TensorRT rules refuse for the ort graph: the check can fail.
        assert bool(qdq_summary(model).wrong_type) == ort_graph, name
        matmuls = sum(1 for n in model.graph.node if n.op_type in ("MatMul", "MatMulIntegerToFloat"))
        # Every MatMul is INT8 on both inputs, except the few the quantizer leaves in high
        # precision (matrix-vector products of one [CLS] row), and those are recorded. In the ort
        # graph the INT8 ones are ONNX Runtime's integer MatMuls, in the trt graphs Q/DQ MatMuls.
        integer = sum(1 for n in model.graph.node if n.op_type == "MatMulIntegerToFloat")
        assert integer == (summary.quantized_matmuls if ort_graph else 0), name
        assert summary.quantized_matmuls + len(summary.unquantized_matmuls) == matmuls, name
        assert summary.quantized_matmuls >= 0.9 * matmuls, name
        assert 0.9 * matmuls <= summary.dequantize_only <= summary.quantized_matmuls, name  # int8 weights on disk
        head, file = name.split("/")
        recorded = read_manifest(quantized / head).data["precisions"][file.split(".")[1] + ".int8"]["graph"]
        assert recorded["matmuls_excluded"] == summary.unquantized_matmuls, name
        assert recorded["wrong_type"] == 0 and recorded["asymmetric"] == 0, name
        assert summary.quantized_no_qdq_ops == [], name
        producers = {out: node for node in model.graph.node for out in node.output}
        users = {i: node for node in model.graph.node for i in node.input}
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zero_point = next(t for t in model.graph.initializer if t.name == node.input[2])
                weight = node.op_type == "DequantizeLinear" and node.input[0] not in producers
                want = (onnx.TensorProto.INT8, 0) if weight else (activation_type, activation_zero)
                assert zero_point.data_type == want[0], (name, node.name)
                assert (numpy_helper.to_array(zero_point) == want[1]).all(), (name, node.name)
            # The residual Add before a LayerNorm reads full-precision tensors.
            if node.op_type in ("Softmax", "LayerNormalization", "SkipLayerNormalization", "Add"):
                fed = [producers[i].op_type for i in node.input if i in producers]
                if node.op_type != "Add" or _reaches_layernorm(users, node.output[0]):
                    assert "DequantizeLinear" not in fed, (name, node.name)
    recorded = read_manifest(quantized / "itm").data["precisions"]["trt.int8"]
    # btdeploy's quantizer hands the rounded copy to MatMuls only: the islands pass finds nothing to restore.
    assert recorded["full_precision_inputs_restored"] == 0
    assert recorded["graph"]["qdq_pairs"] > 0 and recorded["graph"]["asymmetric"] == 0


def test_fp16_keeps_layernorm_and_io_in_fp32(quantized: Path) -> None:
    for name, model in _graphs(quantized, "fp16"):
        types = layernorm_types(model)
        assert types and set(types.values()) == {onnx.TensorProto.FLOAT}, name
        halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert len(halves) > 10, name  # the weights did move to FP16
        for value in list(model.graph.input) + list(model.graph.output):
            assert value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64), name
        softmax_or_ln = [n for n in model.graph.node if n.op_type in ("Softmax", "LayerNormalization")]
        assert softmax_or_ln


def _integer_kernels(path: Path, tmp_path: Path) -> Counter[str]:
    """The operators ONNX Runtime's CPU provider runs for a graph, after its own fusions."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}.ort-optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def test_onnx_runtime_runs_every_int8_matmul_of_the_ort_graph_as_integer_gemm(quantized: Path, tmp_path: Path) -> None:
    """ONNX Runtime fuses a Q/DQ MatMul into its integer kernel only with unsigned activations on
    x86; signed, it recodes a pair itself only where one MatMul reads it, and the shared Q/K/V input
    ran as DequantizeLinear + FP32 MatMul."""
    for head in HEADS:
        path = quantized / head / graph_file(Flavour.ORT, Precision.INT8)
        quantized_matmuls = qdq_summary(onnx.load(str(path)), onnx.TensorProto.UINT8, 128).quantized_matmuls
        ops = _integer_kernels(path, tmp_path)
        assert ops["MatMulIntegerToFloat"] == quantized_matmuls > 0, (head, ops)
        assert ops["DequantizeLinear"] == 0, (head, ops)
        # Every Add + LayerNorm pair as one kernel (ONNX Runtime fuses only those whose sum nothing else reads).
        written = Graph(onnx.load(str(path)))
        assert not [n.name for n in written.graph.node if is_add_layernorm(written, n)], head
        assert ops["SkipLayerNormalization"] >= written.count("SkipLayerNormalization", "com.microsoft") > 0, head
        # The same graph as Q/DQ in TensorRT's signed code: ONNX Runtime leaves the shared inputs in FP32.
        raised = Graph(onnx.load(str(path)))
        assert INTEGER_MATMULS.run(raised, Flavour.TRT).fused == quantized_matmuls
        signed = raised.model
        assert encode_activations(signed, Flavour.TRT) > 0
        signed_path = tmp_path / f"{head}.signed.onnx"
        onnx.save(signed, str(signed_path))
        assert _integer_kernels(signed_path, tmp_path)["MatMulIntegerToFloat"] < quantized_matmuls, head


def test_recoding_activations_keeps_every_value(quantized: Path, tmp_path: Path) -> None:
    """uint8 with zero point 128 holds what int8 with zero point 0 holds: every code is the same
    value, and so are the outputs."""
    folder = quantized / "itm"
    path = folder / graph_file(Flavour.ORT, Precision.INT8)
    signed = onnx.load(str(path))
    recoded = encode_activations(signed, Flavour.TRT)
    assert recoded == sum(1 for n in signed.graph.node if n.op_type == "QuantizeLinear") > 0
    assert encode_activations(signed, Flavour.TRT) == 0  # already in that code
    signed_path = tmp_path / "signed.onnx"
    onnx.save(signed, str(signed_path))
    feeds = sample_inputs(read_manifest(folder).config, 2, 11, seed=5)
    codes = [n.output[0] for n in signed.graph.node if n.op_type == "QuantizeLinear"]
    outputs = [o.name for o in signed.graph.output]
    # ONNX's reference evaluator sums both graphs' integer GEMMs exactly, on any CPU. (ONNX Runtime
    # sums uint8 x int8 in saturating int16 pairs without VNNI and int8 x int8 exactly: there the
    # two graphs' answers differ by its kernels, not by their codes.)
    emulation = benchmark_module("u8s8_saturation")
    graphs = (path, signed_path)
    results = [emulation.EmulatedIntegerSums(g, codes + outputs, saturate=False).run(feeds) for g in graphs]
    for name in codes:
        assert results[0][name].dtype == np.uint8 and results[1][name].dtype == np.int8, name
        np.testing.assert_array_equal(results[0][name].astype(np.int16) - 128, results[1][name], err_msg=name)
    assert len(outputs) > 0
    for name in outputs:
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)
    bad = onnx.load(str(path))
    zero = next(t for t in bad.graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    zero.CopyFrom(numpy_helper.from_array(np.array(3, np.uint8), zero.name))
    with pytest.raises(ValueError, match="not a known symmetric code"):
        encode_activations(bad, Flavour.TRT)


def test_dynamic_int8_quantizes_every_weight_matmul(quantized: Path) -> None:
    for name, model in _graphs(quantized, "int8-dynamic"):
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulInteger") > 0 and "DynamicQuantizeLinear" in ops, name
        constant = _computed_from_constants(model)
        float_weight_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constant]
        assert float_weight_matmuls == [], name


def test_dynamic_int8_in_memory_is_onnx_runtimes_own_quantization(
    optimized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """btdeploy reads the source once, infers it without its weights and takes the quantized model
    as ONNX Runtime's save hands it over; the graph must be the one ONNX Runtime's own
    quantize_dynamic writes, byte for byte once the weights' explicit default data locations
    (which its reload from a weights file sets) are set aside, and nothing may be written."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from btdeploy.artifacts.onnx_files import load_graph
    from btdeploy.optimize.passes.integer_width import INTEGER_WIDTHS
    from btdeploy.quantize import int8_dynamic

    source = read_manifest(optimized / "itm").graph_path(Flavour.ORT)
    reads: list[Path] = []
    real_load = int8_dynamic.load_graph
    monkeypatch.setattr(int8_dynamic, "load_graph", spying(real_load, lambda path, what: reads.append(path)))
    workdir = tmp_path / "work"
    workdir.mkdir()
    ours, _ = int8_dynamic.dynamic_int8(source, ArrayRows({}), workdir, Flavour.ORT)
    assert reads == [source] and list(workdir.iterdir()) == []

    quantize_dynamic(str(source), str(tmp_path / "own.onnx"), op_types_to_quantize=["MatMul"], per_channel=False,
                     weight_type=QuantType.QInt8,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip
    graph = Graph(load_graph(tmp_path / "own.onnx", "quantize again"))
    INTEGER_WIDTHS.run(graph, Flavour.ORT)
    own = graph.model
    explicit = [t for t in own.graph.initializer if t.HasField("data_location")]
    assert explicit and not any(t.HasField("data_location") for t in ours.graph.initializer)
    for tensor in explicit:
        tensor.ClearField("data_location")
    assert ours.SerializeToString() == own.SerializeToString()


def _computed_from_constants(model: onnx.ModelProto) -> set[str]:
    """Initializers and whatever is computed from them alone (a weight read through Identity counts)."""
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # graphs are stored in topological order
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input if i)):
            constant.update(node.output)
    return constant


def test_no_written_graph_holds_an_fp16_unsafe_constant(quantized: Path) -> None:
    paths = sorted(quantized.glob("*/model*.onnx"))
    assert len(paths) >= len(HEADS) * 6
    for path in paths:
        assert fp16_unsafe_constants(onnx.load(str(path))) == [], path


def test_a_planted_infinite_mask_is_caught(quantized: Path, tmp_path: Path) -> None:
    folder = tmp_path / "itm"
    shutil.copytree(quantized / "itm", folder)
    model = onnx.load(str(folder / "model.trt.onnx"))
    mask = numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "planted_mask_fill")
    model.graph.initializer.append(mask)
    # Max(logits, -inf) leaves the logits as they are, as an additive -inf mask does where it is 0.
    last = next(n for n in model.graph.node if "logits" in n.output)
    last.output[list(last.output).index("logits")] = "logits_before_mask"
    model.graph.node.append(onnx.helper.make_node("Max", ["logits_before_mask", "planted_mask_fill"], ["logits"]))
    assert fp16_unsafe_constants(model) == ["planted_mask_fill"]
    big = numpy_helper.from_array(np.array([-3.4e38], dtype=np.float32), "float32_min_fill")
    model.graph.initializer.append(big)
    assert fp16_unsafe_constants(model) == ["planted_mask_fill", "float32_min_fill"]
    onnx.save(model, str(folder / "model.trt.onnx"))
    manifest = read_manifest(folder)  # recorded, as if optimize had written it: quantize takes only recorded graphs
    manifest.record_graph(folder / "model.trt.onnx")
    manifest.write()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(BtDeployError, match="infinite or overflow FP16.*planted_mask_fill"):
        quantize_head(folder, "fp16", "trt", calib_size=2)
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing half-written left behind


def test_calibration_from_files_is_recorded(optimized: Path, tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 255, size=(40 + 8 * index, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"photo{index}.png")
    texts = tmp_path / "captions.txt"
    texts.write_text("a dog on a sofa\n\ntwo cats in the sun\na red car\n")
    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    quantize_head(folder, "int8", "ort", images, texts, calib_size=5)
    calibration = read_manifest(folder).data["precisions"]["ort.int8"]["calibration"]
    assert calibration["kind"] == "files" and calibration["size"] == 3  # 5 asked, 3 distinct pairs
    assert calibration["image_files"] == 3 and calibration["captions"] == 3
    rows = check_export(folder, precision="int8", flavour="ort")
    assert all(row.passed for row in rows)


def _calibration_files(tmp_path: Path, count: int) -> tuple[Path, Path]:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 255, size=(40 + 8 * index, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"photo{index}.png")
    texts = tmp_path / "captions.txt"
    texts.write_text("".join(f"caption number {index}\n" for index in range(count)))
    return images, texts


def test_calibration_reuse_follows_what_the_files_hold(optimized: Path, tmp_path: Path) -> None:
    """A graph is kept only when the same data would calibrate it: other captions or image bytes
    under the same names (the same counts) had been taken as the same calibration."""
    from PIL import Image

    images, texts = _calibration_files(tmp_path, 3)
    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    first = quantize_head(folder, "int8", "ort", images, texts, calib_size=4, reuse=True)
    assert quantize_head(folder, "int8", "ort", images, texts, calib_size=4, reuse=True).get("reused")
    texts.write_text(texts.read_text().replace("number 1", "number one"))
    second = quantize_head(folder, "int8", "ort", images, texts, calib_size=4, reuse=True)
    assert not second.get("reused") and second["calibration"]["sha256"] != first["calibration"]["sha256"]
    Image.fromarray(np.zeros((48, 56, 3), dtype=np.uint8)).save(images / "photo2.png")
    third = quantize_head(folder, "int8", "ort", images, texts, calib_size=4, reuse=True)
    assert not third.get("reused") and third["calibration"]["sha256"] != second["calibration"]["sha256"]
    # The digest is of what the rows read: with 2 rows, a caption added after them leaves it as it was.
    two_rows = quantize_head(folder, "int8", "ort", images, texts, calib_size=2)
    texts.write_text(texts.read_text() + "a caption no row reads\n")
    later = quantize_head(folder, "int8", "ort", images, texts, calib_size=2)
    assert later["calibration"]["sha256"] == two_rows["calibration"]["sha256"]


def test_calibration_files_are_hashed_once_per_version(
    optimized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline plans calibration for every head, flavour and precision from the same files:
    each image is hashed once while it stays as it is, and again once it changes."""
    from PIL import Image

    from btdeploy.quantize import calibration

    images, texts = _calibration_files(tmp_path, 3)
    hashed: list[str] = []
    sha256_of = calibration.sha256_of
    monkeypatch.setattr(calibration, "sha256_of", spying(sha256_of, lambda path: hashed.append(path.name)))
    manifest = read_manifest(optimized / "itm")
    first = calibration.plan_calibration(manifest, images, texts, 3).source["sha256"]
    assert calibration.plan_calibration(manifest, images, texts, 3).source["sha256"] == first
    assert sorted(hashed) == ["photo0.png", "photo1.png", "photo2.png"]
    Image.fromarray(np.zeros((48, 56, 3), dtype=np.uint8)).save(images / "photo1.png")
    assert calibration.plan_calibration(manifest, images, texts, 3).source["sha256"] != first
    assert sorted(hashed) == ["photo0.png", "photo1.png", "photo1.png", "photo2.png"]


def test_calibration_images_are_decoded_once_a_chunk_at_a_time(
    optimized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row's picture held at once had taken gigabytes for a few hundred photos: each file is
    now decoded once, IMAGE_CHUNK at a time, and the rows are what the processor makes of all of
    them together."""
    from btdeploy.model import media
    from btdeploy.quantize import calibration

    images, texts = _calibration_files(tmp_path, 5)
    texts.write_text(texts.read_text() + "a sixth caption\n")  # 12 rows, no pair twice (lcm 30)
    monkeypatch.setattr(calibration, "IMAGE_CHUNK", 2)
    decoded: list[str] = []
    batches: list[int] = []
    load_image, image_inputs = media.load_image, media.image_inputs
    monkeypatch.setattr(media, "load_image", spying(load_image, lambda path, *a: decoded.append(path.name)))
    monkeypatch.setattr(media, "image_inputs", spying(image_inputs, lambda proc, pics: batches.append(len(pics))))
    manifest = read_manifest(optimized / "itm")
    data = load_calibration(manifest, images, texts, 12)
    assert sorted(decoded) == [f"photo{index}.png" for index in range(5)] and batches == [2, 2, 1]
    processor = media.export_processor(manifest)
    files = sorted(images.iterdir())
    captions = texts.read_text().splitlines()
    whole = processor(
        images=[load_image(files[i % 5]) for i in range(12)], text=[captions[i % 6] for i in range(12)],
        return_tensors="np", padding="max_length", truncation=True, max_length=data.source["text_length"],
    )  # fmt: skip
    for name, values in data.feeds.items():
        np.testing.assert_array_equal(values, whole[name], err_msg=name)


def test_calibration_rows_stop_before_a_pair_repeats(
    optimized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row k pairs image k % a with caption k % b: 16 rows asked of 4 images and 4 captions had
    run each pair 4 times, and 16 of 10 had weighed 6 pairs twice in the ranges. The rows now stop
    at the distinct pairs (lcm(a, b)), and the output says so."""
    from btdeploy.quantize import calibration

    manifest = read_manifest(optimized / "itm")
    images, texts = _calibration_files(tmp_path, 4)
    plan = calibration.plan_calibration(manifest, images, texts, 16)
    assert plan.size == 4 and plan.source["size"] == 4
    feeds = plan.load().feeds
    assert {name: len(values) for name, values in feeds.items()} == dict.fromkeys(feeds, 4)
    pairs = {(feeds["input_ids"][k].tobytes(), feeds["pixel_values"][k].tobytes()) for k in range(4)}
    assert len(pairs) == 4
    assert "4 pairs from 4 images and 4 captions (each pair once: 16 rows would repeat them)" in capsys.readouterr().err
    texts.write_text(texts.read_text() + "a fifth caption\na sixth caption\n")  # 4 images, 6 captions: lcm 12
    assert calibration.plan_calibration(manifest, images, texts, 16).size == 12
    assert calibration.plan_calibration(manifest, images, texts, 7).size == 7  # fewer asked: as asked


def test_fp16_makes_only_the_calibration_rows_it_reads(optimized: Path, tmp_path: Path) -> None:
    """AutoCast's range check reads FP16_RANGE_ROWS rows: a --calib-size of 100,000 made and held
    them all (5 GB on tiny) before; now the recorded calibration is the rows it read."""
    from btdeploy.quantize.fp16 import FP16_RANGE_ROWS
    from btdeploy.quantize.methods import METHODS

    assert METHODS[Precision.FP16].rows_to_load(100_000) == FP16_RANGE_ROWS
    assert METHODS[Precision.INT8].rows_to_load(100_000) == 100_000  # int8 reads every row asked for
    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    quantize_head(folder, "fp16", "trt", calib_size=100_000)
    assert read_manifest(folder).data["precisions"]["trt.fp16"]["calibration"]["size"] == FP16_RANGE_ROWS


def test_model_optimizer_logs_nothing_of_its_own(tiny_export: Path, tmp_path: Path) -> None:
    """AutoCast's modules set their loggers to INFO when first imported, after btdeploy had quieted
    Model Optimizer: the main job on base printed some 4,800 lines of its per-node logs. A fresh
    process, as a user's, so that the import happens inside the command."""
    import subprocess
    import sys

    from btdeploy.optimize.optimizer import optimize_head

    folder = tmp_path / "itm"
    shutil.copytree(tiny_export / "itm", folder)
    optimize_head(folder, "trt")
    done = subprocess.run(
        [sys.executable, "-m", "btdeploy", "quantize", str(folder), "--flavour", "trt", "--precision", "fp16"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model.trt.fp16.onnx" in done.stderr  # the command's own progress still shows
    assert [line for line in (done.stdout + done.stderr).splitlines() if "modelopt" in line] == []
    # Nor Polygraphy's: its session announcements ("[I] Creating ONNX-Runtime Inference Session").
    assert [line for line in (done.stdout + done.stderr).splitlines() if line.startswith(("[I]", "[V]"))] == []


def test_generated_calibration_is_loud_and_recorded(quantized: Path) -> None:
    calibration = read_manifest(quantized / "mlm").data["precisions"]["ort.int8"]["calibration"]
    assert calibration["kind"] == "generated" and calibration["size"] == CALIB_SIZE


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_generated_calibration_is_warned_of_where_a_graph_is_made_from_it(
    optimized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once per graph made, naming it; not for a graph kept (it had warned the main job's 24 times,
    kept graphs included), and not where the caller says it once itself."""
    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    capsys.readouterr()
    quantize_head(folder, "int8", "trt", calib_size=CALIB_SIZE)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "GENERATED" in line]
    assert len(warnings) == 1 and f"the trt.int8 graph of itm is calibrated on {CALIB_SIZE} GENERATED" in warnings[0]
    assert quantize_head(folder, "int8", "trt", calib_size=CALIB_SIZE, reuse=True)["reused"] is True
    quantize_head(folder, "fp16", "trt", announce_generated=False)
    assert "GENERATED" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"precision": "int4"}, "--precision 'int4': choose one of fp16, int8, int8-dynamic"),
        ({"precision": "int8-dynamic", "flavour": "trt"}, "TensorRT cannot parse: use --flavour ort"),
        ({"precision": "int8", "calib_images": Path("/nonexistent")}, "give both --calib-images"),
        ({"precision": "int8", "calib_size": 0}, "--calib-size 0 must be at least 1"),
        # Refused before any row is made, not killed by the kernel once they fill the memory.
        (
            {"precision": "int8", "calib_size": 10**9},
            r"--calib-size 1000000000 holds \d+\.\d GB of calibration inputs in memory",
        ),
    ],
)
def test_bad_quantize_requests_say_what_to_do(optimized: Path, arguments: dict[str, object], message: str) -> None:
    with pytest.raises(BtDeployError, match=message.replace("(", r"\(").replace("'", "'")):
        quantize_head(optimized / "itm", **arguments)  # type: ignore[arg-type]


def test_bad_calibration_files_are_named(optimized: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "t.txt"
    texts.write_text("a caption\n")
    with pytest.raises(BtDeployError, match="holds no images"):
        quantize_head(optimized / "itm", "int8", "ort", empty, texts)
    (empty / "cats").mkdir()  # a calibration set in class folders, as ImageNet's is
    (empty / "cats" / "one.png").write_bytes(b"an image in a subfolder")
    (empty / "folder.png").mkdir()
    with pytest.raises(BtDeployError, match=r"holds no images \(.*\) \(it has 1 in its subfolders: btdeploy reads"):
        quantize_head(optimized / "itm", "int8", "ort", empty, texts)
    shutil.rmtree(empty / "cats")
    (empty / "folder.png").rmdir()
    (empty / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BtDeployError, match="broken.png cannot be read"):
        quantize_head(optimized / "itm", "int8", "ort", empty, texts, calib_size=1)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n")
    with pytest.raises(BtDeployError, match="has no captions"):
        quantize_head(optimized / "itm", "int8", "ort", empty, blank)


def test_cli_quantize_and_check_precision(optimized: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(optimized / "itc", tmp_path / "itc")
    assert main(["quantize", str(tmp_path), "--precision", "int8-dynamic"]) == 0
    report = tmp_path / "parity.json"
    assert main(["check", str(tmp_path), "--precision", "int8-dynamic", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["graph"] == "model.ort.int8-dynamic.onnx" and data["passed"]
    assert {row["tolerance"]["min_cosine"] for row in data["rows"]} == {0.99}
    assert main(["check", str(tmp_path), "--precision", "fp16"]) == 2
    assert "btdeploy quantize" in capsys.readouterr().err


def test_an_fp16_graph_two_flavours_share_is_made_once(optimized: Path, tmp_path: Path) -> None:
    import numpy as np

    import btdeploy
    from btdeploy.model.inputs import sample_inputs

    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    made = quantize_head(folder, "fp16", "trt")
    assert "reused_from" not in made and made["source"] == "model.trt.onnx"
    shared = quantize_head(folder, "fp16", "ort")  # also from model.trt.onnx, same calibration rows
    assert shared["reused_from"] == "model.trt.fp16.onnx" and shared["source_sha256"] == made["source_sha256"]
    runtimes = [btdeploy.load(folder, flavour=flavour, precision="fp16") for flavour in ("trt", "ort")]
    feeds = sample_inputs(runtimes[0].config, 2, 7)
    np.testing.assert_array_equal(runtimes[0](**feeds).logits, runtimes[1](**feeds).logits)
    # Other calibration rows make another graph: nothing is shared then. (Another --calib-size of
    # generated rows would not do: AutoCast reads the first 4 rows, and only those are made.)
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(images / "a.png")
    (tmp_path / "captions.txt").write_text("a dog on a sofa\n")
    again = quantize_head(folder, "fp16", "ort", images, tmp_path / "captions.txt")
    assert "reused_from" not in again and again["calibration"]["kind"] == "files"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantizing_leaves_the_source_graph_as_recorded(optimized: Path, tmp_path: Path, precision: str) -> None:
    from btdeploy.artifacts.files import sha256_of

    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    before = sha256_of(folder / "model.trt.onnx")
    quantize_head(folder, precision, "trt")
    assert sha256_of(folder / "model.trt.onnx") == before
    read_manifest(folder).verify_graph(folder / "model.trt.onnx", full=True)


def test_the_trt_int8_graph_reuses_the_ort_calibration_and_not_the_reverse(
    optimized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "itm"
    shutil.copytree(optimized / "itm", folder)
    made = quantize_head(folder, "int8", "ort", calib_size=CALIB_SIZE)
    derived = quantize_head(folder, "int8", "trt", calib_size=CALIB_SIZE)
    assert "reused_from" not in made and made["high_precision"] == "fp32"
    assert derived["reused_from"] == "model.ort.int8.onnx" and derived["high_precision"] == "fp16"
    for key in ("qdq_pairs", "weights_int8", "matmuls_int8"):
        assert derived["graph"][key] == made["graph"][key] > 0, key
    # The same activation scales (stored in FP16 in TensorRT's graph, whose tensors are renamed by the casts).
    scales = []
    for name in ("model.ort.int8.onnx", "model.trt.int8.onnx"):
        model = onnx.load(str(folder / name))
        values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        scales.append(np.sort([float(values[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"]))
    assert len(scales[0]) == made["graph"]["qdq_pairs"]
    np.testing.assert_allclose(scales[1], scales[0], rtol=1e-3)
    # ... in each flavour's activation code.
    assert made["activations"] == made["graph"]["activations"] == "uint8, zero point 128"
    assert derived["activations"] == derived["graph"]["activations"] == "int8, zero point 0"
    rows = check_export(tmp_path, ["itm"], flavour="trt", precision="int8")
    assert all(row.passed for row in rows)
    # FP16 cannot become FP32 again: made in the other order, the ort graph calibrates itself,
    # without loading the trt graph it could not use.
    again = tmp_path / "again"
    shutil.copytree(optimized / "itm", again / "itm")
    quantize_head(again / "itm", "int8", "trt", calib_size=CALIB_SIZE)
    loaded: list[str] = []
    real_load = quantizer.load_graph

    def recording_load(path: Path, what: str, load_weights: bool = True) -> onnx.ModelProto:
        loaded.append(path.name)
        return real_load(path, what, load_weights)

    monkeypatch.setattr(quantizer, "load_graph", recording_load)
    assert "reused_from" not in quantize_head(again / "itm", "int8", "ort", calib_size=CALIB_SIZE)
    assert "model.trt.int8.onnx" not in loaded
    assert not int8_twin_converts(Flavour.TRT, Flavour.ORT)
    assert int8_twin_converts(Flavour.ORT, Flavour.TRT) and int8_twin_converts(Flavour.TRT, Flavour.TRT_COMPAT)
    with pytest.raises(ValueError, match="fp16 outside the Q/DQ cannot become one with fp32"):
        int8_from_twin(onnx.ModelProto(), Flavour.TRT, Flavour.ORT)


@pytest.mark.parametrize(
    ("flavour", "external"), [(Flavour.TRT, False), (Flavour.TRT_COMPAT, False), (Flavour.TRT, True)]
)
def test_the_streaming_fp16_range_check_writes_autocasts_own_graph(
    optimized: Path, tmp_path: Path, flavour: Flavour, external: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """btdeploy runs AutoCast's reference one row at a time, its inferences without weights and its
    cleanup in one pass, and leaves the weights in the source's files until its classifier reads
    them; the graph must be the one AutoCast's own all-rows-at-once run makes, byte for byte (the
    unfused trt-compat graph has the most casts to clean up; a graph past 2 GB keeps its weights
    in a data file)."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from btdeploy.artifacts.onnx_files import data_file, load_graph, save_graph_atomically
    from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
    from btdeploy.quantize import fp16
    from btdeploy.quantize.fp16 import FP16_RANGE_ROWS, autocast_fp16

    manifest = read_manifest(optimized / "itm")
    source = manifest.graph_path(flavour)
    if external:
        source = tmp_path / "source" / source.name
        source.parent.mkdir()
        save_graph_atomically(load_graph(manifest.graph_path(flavour), "make it again"), source, external=True)
    feeds = load_calibration(manifest, None, None, 6).feeds
    # The range check's session reads every weight from the source's files: none is written again.
    rewritten: list[int] = []
    real_side_file = fp16.weightless_with_side_file

    def side_file(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
        light = real_side_file(model, path)
        rewritten.append(path.stat().st_size)
        return light

    monkeypatch.setattr(fp16, "weightless_with_side_file", side_file)
    streamed, options = autocast_fp16(source, ArrayRows(feeds), tmp_path, flavour)
    assert options["range_rows"] == FP16_RANGE_ROWS
    assert rewritten == [0]
    assert sorted(p.name for p in source.parent.iterdir() if "autocast" in p.name) == []  # its graph is gone
    if external:
        assert data_file(source).is_file()
    npz = tmp_path / "rows.npz"
    np.savez(npz, **{name: values[:FP16_RANGE_ROWS] for name, values in feeds.items()})  # type: ignore[arg-type]
    whole = convert_to_mixed_precision(str(source), low_precision_type="fp16", keep_io_types=True,
                                       op_types_to_exclude=list(FULL_PRECISION_OPS), calibration_data=str(npz),
                                       providers=["cpu"])  # fmt: skip
    assert streamed.SerializeToString() == whole.SerializeToString()


def test_quantize_with_reuse_keeps_an_up_to_date_graph_and_remakes_a_changed_one(
    optimized: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "itc"
    shutil.copytree(optimized / "itc", folder)
    quantize_head(folder, "int8-dynamic", "ort")
    path = folder / "model.ort.int8-dynamic.onnx"
    stamp = path.stat().st_mtime_ns
    assert quantize_head(folder, "int8-dynamic", "ort", reuse=True)["reused"] is True
    assert path.stat().st_mtime_ns == stamp
    assert "reused" not in quantize_head(folder, "int8-dynamic", "ort")  # without reuse: made again
    # Another calibration is another graph.
    quantize_head(folder, "int8", "ort", calib_size=CALIB_SIZE)
    assert "reused" not in quantize_head(folder, "int8", "ort", calib_size=CALIB_SIZE + 1, reuse=True)


# One config: the comparison is of graph bytes, not of a config's numbers (half a minute for both).
@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_the_lean_fp16_conversion_of_an_int8_graph_is_model_optimizers_own(optimized: Path) -> None:
    """The twin conversion (FP16 outside the Q/DQ) under btdeploy's patches, against Model
    Optimizer's convert_to_f16 as it comes, on the unfused trt-compat INT8 graph."""
    from modelopt.onnx.autocast.convert import convert_to_f16

    from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
    from btdeploy.quantize.modelopt_env import lean_conversion

    manifest = read_manifest(optimized / "mlm")
    feeds = load_calibration(manifest, None, None, CALIB_SIZE).feeds
    int8, _ = calibrated_int8(manifest.graph_path(Flavour.TRT_COMPAT), ArrayRows(feeds), manifest.folder, Flavour.ORT)
    qdq = Graph(int8)
    int8_flavour_form(qdq, Flavour.TRT_COMPAT)  # Q/DQ and standard LayerNorms again, as the twin conversion sees it
    int8 = qdq.model
    options = {"low_precision_type": "fp16", "keep_io_types": True, "op_block_list": list(FULL_PRECISION_OPS)}
    own = convert_to_f16(onnx.ModelProto.FromString(int8.SerializeToString()), **options)
    with lean_conversion():
        lean = convert_to_f16(onnx.ModelProto.FromString(int8.SerializeToString()), **options)
    casts = sum(1 for node in own.graph.node if node.op_type == "Cast")
    assert casts > 0
    assert lean.SerializeToString() == own.SerializeToString()


_CAST_ORDER = """
import hashlib, sys
import numpy as np
import onnx
from onnx import helper, numpy_helper
from modelopt.onnx.autocast.convert import convert_to_f16
from btdeploy.quantize.modelopt_env import lean_conversion

names = [f"states_{k}" for k in range(6)]
weights = [numpy_helper.from_array(np.eye(4, dtype=np.float32), f"{name}_w") for name in names]
nodes = [helper.make_node("MatMul", [name, f"{name}_w"], [f"{name}_out"], name=f"{name}_matmul") for name in names]
nodes.append(helper.make_node("Sum", [f"{name}_out" for name in names], ["y"], name="sum"))
value = lambda name: helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2, 4])
graph = helper.make_graph(nodes, "g", [value(n) for n in names], [value("y")], weights)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
with lean_conversion():
    converted = convert_to_f16(model, low_precision_type="fp16", keep_io_types=True)
print(" ".join(n.input[0] for n in converted.graph.node if n.op_type == "Cast" and n.input[0] in names))
print(hashlib.sha256(converted.SerializeToString()).hexdigest())
"""


def test_the_fp16_conversion_writes_the_same_bytes_in_every_process() -> None:
    """AutoCast lists the tensors it casts from a set, in an order that changes with each Python
    process's string hashes: the split fusion graph, with two float inputs, came out with its
    input Casts in either order. Under btdeploy they come sorted by name."""
    import os

    printed = []
    for seed in ("1", "2", "3"):
        done = subprocess.run(
            [sys.executable, "-c", _CAST_ORDER],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        printed.append(done.stdout.splitlines()[-2:])  # after anything Model Optimizer prints
    assert sorted(printed[0][0].split()) == [f"states_{k}" for k in range(6)]  # a Cast for each input
    assert printed[0] == printed[1] == printed[2]


_INTERRUPT_DURING_MODELOPT_IMPORT = """
import os, signal, sys

class InterruptMidImport:
    # Ctrl-C arriving while Model Optimizer's modules are still being imported
    def find_spec(self, name, path=None, target=None):
        if name == "modelopt.onnx.autocast":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptMidImport())
from btdeploy.quantize.modelopt_env import require_modelopt
try:
    require_modelopt()
except KeyboardInterrupt:
    print("interrupted; import finished:", "modelopt.onnx.autocast.convert" in sys.modules)
"""


def test_fp16_without_polygraphy_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # An environment assembled by hand (the H200 machine's) lacked Polygraphy: AutoCast's reference
    # runs raised ModuleNotFoundError from deep inside quantize/fp16.py.
    from btdeploy.quantize.modelopt_env import require_modelopt

    monkeypatch.setitem(sys.modules, "polygraphy", None)  # import polygraphy now raises ImportError
    with pytest.raises(BtDeployError, match=r"need Polygraphy .*pip install 'polygraphy>=0.49'"):
        require_modelopt()


def test_ctrl_c_during_the_model_optimizer_import_waits_for_the_import_to_end() -> None:
    # Model Optimizer imports `lief` (nanobind): an interrupt inside its initialization aborted the
    # process from C++ with no cleanup. The interrupt is held until the import is done, then raised.
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_DURING_MODELOPT_IMPORT], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip() == "interrupted; import finished: True", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
@pytest.mark.parametrize("precision", ["int8", "int8-dynamic"])
def test_exact_sums_recodes_every_integer_gemm_of_the_ort_int8_graphs(quantized: Path, precision: str) -> None:
    """Every weight of the graphs' integer GEMMs (uint8 activations by int8 weights) turns uint8, so
    ONNX Runtime sums them as a VNNI CPU does; `check` (exact sums by default) holds them to the INT8 floors."""
    from btdeploy.backends.exact_sums import INTEGER_GEMMS, unsigned_weights

    folder = quantized / "itm"
    model = onnx.load(str(folder / graph_file(Flavour.ORT, Precision(precision))))
    gemms = [n for n in model.graph.node if (n.domain if n.domain != "ai.onnx" else "", n.op_type) in INTEGER_GEMMS]
    weights = {n.input[1] for n in gemms}
    assert gemms and unsigned_weights(model) == len(weights)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert all(types[n.input[1]] == onnx.TensorProto.UINT8 for n in gemms)
    report = folder.parent / f"exact-{precision}.json"
    argv = ["check", str(folder), "--flavour", "ort", "--precision", precision, "--report", str(report)]
    assert main(argv) == 0
    data = json.loads(report.read_text())
    assert data["passed"] and data["options"]["exact_sums"] is True
    assert data["integer_sums"].startswith("exact (")  # VNNI's own, or recoded
    assert main(argv[:-2] + ["--junit", str(report.with_suffix(".xml"))]) == 0  # a CI gate sees it too
    assert 'name="integer_sums" value="exact (' in report.with_suffix(".xml").read_text()


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
@pytest.mark.parametrize("native", [[], ["avx512_vnni"]], ids=["saturating-cpu", "vnni-cpu"])
def test_check_says_when_the_integer_sums_it_held_saturate(
    quantized: Path, native: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A check of an ort INT8 graph with --no-exact-sums on a CPU whose kernel saturates says so under
    its table, and records it; by default (exact sums), on a VNNI CPU, or for the trt graph (int8 x int8)
    it does not."""
    import btdeploy.cpu

    monkeypatch.setattr(btdeploy.cpu, "exact_integer_sums", lambda *_: list(native))
    folder = str(quantized / "itm")
    said, recorded = {}, {}
    for name, argv in {
        "ort.int8": ["check", folder, "--flavour", "ort", "--precision", "int8"],
        "ort.int8 saturating": ["check", folder, "--flavour", "ort", "--precision", "int8", "--no-exact-sums"],
        "trt.int8": ["check", folder, "--flavour", "trt", "--precision", "int8", "--no-exact-sums"],
    }.items():
        report = quantized / f"{name}.json"
        assert main([*argv, "--report", str(report)]) == 0
        said[name] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("integer sums:")]
        recorded[name] = json.loads(report.read_text())["integer_sums"]
    assert said["ort.int8"] == [] and said["trt.int8"] == [] and recorded["trt.int8"] is None
    if native:
        assert said["ort.int8 saturating"] == []
        assert recorded["ort.int8"] == recorded["ort.int8 saturating"] == "exact (avx512_vnni)"
    else:
        assert len(said["ort.int8 saturating"]) == 1 and "model.ort.int8.onnx" in said["ort.int8 saturating"][0]
        assert recorded["ort.int8"].startswith("exact (exact_sums")
        assert recorded["ort.int8 saturating"].startswith("saturating")


def _quantizer_module_contents() -> dict[str, dict[str, object]]:
    """What each module and class that btdeploy's quantize steps swap attributes of holds."""
    import modelopt.onnx.autocast.convert as autocast_convert
    import modelopt.onnx.utils as modelopt_utils
    from modelopt.onnx.autocast.graphsanitizer import GraphSanitizer
    from modelopt.onnx.autocast.nodeclassifier import NodeClassifier
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter
    from onnxruntime.quantization import base_quantizer, onnx_model, onnx_quantizer

    owners = [autocast_convert, modelopt_utils, GraphSanitizer, NodeClassifier, PrecisionConverter,
              base_quantizer, onnx_model, onnx_quantizer, sys.modules["onnxruntime.quantization.quantize"]]  # fmt: skip
    return {getattr(owner, "__name__", repr(owner)): dict(vars(owner)) for owner in owners}


def test_the_quantizers_modules_are_as_they_were_after_each_conversion_and_each_failure(
    optimized: Path, tmp_path: Path
) -> None:
    """fp16, int8 and int8-dynamic swap attributes of Model Optimizer's and ONNX Runtime's modules for
    one conversion; afterwards, whether it finished or failed, every module must hold what it held
    before, the same objects, and nothing more."""
    from btdeploy.quantize.fp16 import autocast_fp16
    from btdeploy.quantize.int8_dynamic import dynamic_int8

    manifest = read_manifest(optimized / "itm")
    standard, ort = manifest.graph_path(Flavour.TRT), manifest.graph_path(Flavour.ORT)  # AutoCast's and ORT's sources
    feeds = load_calibration(manifest, None, None, 2).feeds
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    workdir = tmp_path / "work"
    workdir.mkdir()
    autocast_fp16(standard, ArrayRows(feeds), workdir, Flavour.TRT)  # imports everything the swaps touch
    before = _quantizer_module_contents()
    autocast_fp16(standard, ArrayRows(feeds), workdir, Flavour.TRT)
    dynamic_int8(ort, ArrayRows({}), workdir, Flavour.ORT)
    for convert in (autocast_fp16, dynamic_int8):
        with pytest.raises(BtDeployError, match="broken.onnx"):
            convert(broken, ArrayRows(feeds), workdir, Flavour.ORT)
    after = _quantizer_module_contents()
    for owner, contents in before.items():
        changed = [name for name in contents.keys() | after[owner].keys()
                   if contents.get(name, None) is not after[owner].get(name, None)]  # fmt: skip
        assert changed == [], f"{owner}: {changed}"
