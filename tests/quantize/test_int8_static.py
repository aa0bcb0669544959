"""btdeploy's streaming INT8 quantizer against Model Optimizer's, on the same graph and rows.

btdeploy used to hand its trt and trt-compat graphs to Model Optimizer's INT8 quantizer (MatMul only,
entropy calibration, the attention core, LayerNorm and Softmax left out, int8 weights behind a
DequantizeLinear). Its own quantizer must write the same Q/DQ: the same MatMuls, the same activation
scales and the same int8 weights and scales, while holding one copy of the graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.inputs import sample_inputs
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
from btdeploy.optimize.passes.integer_matmul import INTEGER_MATMULS
from btdeploy.quantize.int8 import calibrated_int8, quantize_weight
from btdeploy.quantize.rows import ArrayRows
from btdeploy.quantize.tensor_ranges import entropy_ranges

ROWS = 4


def _feeds(head_folder: Path) -> dict[str, np.ndarray]:
    manifest = read_manifest(head_folder)
    feeds = sample_inputs(manifest.config, ROWS, 9, seed=1234)
    return {name: feeds[name] for name in manifest.input_names("model")}


class _Rows:
    """ONNX Runtime's CalibrationDataReader: one row per call, as btdeploy's calibration runs them."""

    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self.feeds, self.index = feeds, 0

    def get_first(self) -> dict[str, np.ndarray]:  # Model Optimizer reads one row for its MHA checks
        return {name: values[:1] for name, values in self.feeds.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(next(iter(self.feeds.values()))):
            return None
        self.index += 1
        return {name: values[self.index - 1 : self.index] for name, values in self.feeds.items()}

    def rewind(self) -> None:
        self.index = 0


def _model_optimizer_int8(source: Path, feeds: dict[str, np.ndarray], out: Path) -> onnx.ModelProto:
    """Model Optimizer's INT8 quantizer with the options btdeploy gave it before it had its own."""
    from modelopt.onnx.quantization import quantize

    model = onnx.load(str(source), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    attention = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    quantize(
        str(source), quantize_mode="int8", calibration_data_reader=_Rows(feeds),
        calibration_eps=["cpu"], op_types_to_quantize=["MatMul"], nodes_to_exclude=attention or None,
        disable_mha_qdq=True, op_types_to_exclude=list(FULL_PRECISION_OPS),
        op_types_to_exclude_fp16=list(FULL_PRECISION_OPS), high_precision_dtype="fp32", dq_only=True,
        output_path=str(out), log_level="ERROR",
    )  # fmt: skip
    return onnx.load(str(out))


def _qdq(model: onnx.ModelProto) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]], set[str]]:
    """Activation scales by tensor, int8 weights and their scales by MatMul, the quantized MatMuls."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    activations = {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    weights, quantized = {}, set()
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        dq = producer[node.input[1]]
        if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            quantized.add(node.name)
            weights[node.name] = (inits[dq.input[0]], inits[dq.input[1]])
    return activations, weights, quantized


@pytest.mark.parametrize(("head", "flavour"), [("itm", "trt"), ("mlm", "trt"), ("itc", "trt-compat")])
def test_the_same_qdq_as_model_optimizer(optimized: Path, tmp_path: Path, head: str, flavour: str) -> None:
    source = tmp_path / f"model.{flavour}.onnx"
    shutil.copyfile(optimized / head / source.name, source)
    feeds = _feeds(optimized / head)
    reference = _model_optimizer_int8(source, feeds, tmp_path / "reference.onnx")
    ours, options = calibrated_int8(source, ArrayRows(feeds), tmp_path, Flavour.ORT)
    onnx.checker.check_model(ours)
    # The ort graph holds ONNX Runtime's integer MatMuls; raised, they are the Q/DQ they stand for.
    raised = Graph(ours)
    assert INTEGER_MATMULS.run(raised, Flavour.TRT).fused == options["matmuls_quantized"]
    ours = raised.model
    want_scales, want_weights, want_quantized = _qdq(reference)
    got_scales, got_weights, got_quantized = _qdq(ours)
    assert got_quantized == want_quantized and options["matmuls_quantized"] == len(want_quantized)
    assert options["attention_matmuls_excluded"] > 0 or flavour == "trt"
    assert set(got_scales) == set(want_scales)
    for tensor, scale in want_scales.items():
        assert got_scales[tensor] == pytest.approx(scale, rel=1e-6), tensor
    for name, (values, weight_scales) in want_weights.items():
        assert values.dtype == got_weights[name][0].dtype == np.int8
        np.testing.assert_array_equal(got_weights[name][0], values, err_msg=name)
        np.testing.assert_array_equal(got_weights[name][1], weight_scales, err_msg=name)
    # Only MatMuls read a rounded activation: the residual stream and the norms read full precision.
    dequantized = {n.output[0] for n in ours.graph.node if n.op_type == "DequantizeLinear"}
    readers = {n.op_type for n in ours.graph.node if any(i in dequantized for i in n.input)}
    assert readers == {"MatMul"}
    assert not list(tmp_path.glob(".*calibrate*")), "the calibration graph was left behind"


def test_weight_scales_are_per_output_channel_and_symmetric() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(24, 5)).astype(np.float32)
    weight[:, 3] = 0.0  # an all-zero channel gets scale 1 and stays zero
    weight[2, 1] = 9.0  # one large value sets its channel's scale alone
    values, scale = quantize_weight(weight)
    assert values.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (5,)
    assert scale[3] == 1.0 and not values[:, 3].any()
    assert scale[1] == pytest.approx(9.0 / 127) and values[2, 1] == 127
    assert np.abs(values).max() <= 127
    restored = values.astype(np.float32) * scale
    assert np.abs(restored - weight).max() <= scale.max() / 2 + 1e-6


def test_calibration_reads_an_external_data_graph_without_copying_it(optimized: Path, tmp_path: Path) -> None:
    source = tmp_path / "model.trt.onnx"
    onnx.save(onnx.load(str(optimized / "itm" / source.name)), str(source), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.trt.onnx.data", size_threshold=1024)  # fmt: skip
    model = onnx.load(str(source), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    tensors = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights})
    found = entropy_ranges(source, lambda _: tensors, ArrayRows(_feeds(optimized / "itm")), "itm")
    assert set(found.ranges) == set(tensors)
    for low, high in found.ranges.values():
        assert np.isfinite(low) and np.isfinite(high) and low <= 0 <= high
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.trt.onnx", "model.trt.onnx.data"]


def test_a_graph_onnx_runtime_cannot_run_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "broken.onnx"
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="no.such.domain")
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
    )  # fmt: skip
    onnx.save(onnx.helper.make_model(graph), str(source))
    with pytest.raises(BtDeployError, match="ONNX Runtime cannot run broken.onnx for calibration"):
        entropy_ranges(source, lambda _: ["y"], ArrayRows({"x": np.zeros((1, 1, 2), np.float32)}), "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]
