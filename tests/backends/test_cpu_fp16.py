"""FP16 Attention and QuantizeLinear on the CPU provider run in FP32, as TensorRT computes them; file unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from btdeploy.backends.cpu_fp16 import attention_in_fp32, quantize_in_fp32
from btdeploy.backends.onnxruntime import OnnxRuntimeBackend

HEADS, TOKENS, WIDTH = 2, 7, 16


def _fp16_attention_graph(query_type: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """q, k, v -> Attention (FP16 when asked) -> + an FP16 bias initializer -> out."""
    rng = np.random.default_rng(0)
    bias = numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float16), "bias")
    shape = [1, TOKENS, WIDTH]
    inputs = [helper.make_tensor_value_info(n, query_type, shape) for n in ("q", "k", "v")]
    nodes = [
        helper.make_node("Attention", ["q", "k", "v"], ["attended"], q_num_heads=HEADS, kv_num_heads=HEADS, name="att"),
        helper.make_node("Cast", ["bias"], ["bias_cast"], to=query_type),
        helper.make_node("Add", ["attended", "bias_cast"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("out", query_type, shape)],
        initializer=[bias],
        value_info=[helper.make_tensor_value_info("attended", query_type, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _reference(feeds: dict[str, np.ndarray], bias: np.ndarray) -> np.ndarray:
    """Multi-head attention in float64 from the FP16 inputs."""
    q, k, v = (feeds[n].astype(np.float64).reshape(TOKENS, HEADS, -1).transpose(1, 0, 2) for n in "qkv")
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).transpose(1, 0, 2).reshape(1, TOKENS, WIDTH) + bias.astype(np.float64)


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {n: rng.standard_normal((1, TOKENS, WIDTH)).astype(np.float16) for n in "qkv"}


@pytest.mark.parametrize("external", [False, True], ids=["embedded", "external-data"])
def test_fp16_attention_runs_in_fp32_on_cpu(tmp_path: Path, external: bool) -> None:
    model = _fp16_attention_graph()
    bias = numpy_helper.to_array(model.graph.initializer[0])  # before saving moves it out
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=external, location="model.onnx.data", size_threshold=0)
    on_disk = path.read_bytes()
    feeds = _feeds()
    expected = _reference(feeds, bias)

    widened = OnnxRuntimeBackend(path, ["out"], ["cpu"], reduced_precision=True)
    assert widened.attention_in_fp32 == 1
    assert "1 FP16 attention cores run in FP32" in widened.description
    as_is = OnnxRuntimeBackend(path, ["out"], ["cpu"])
    assert as_is.attention_in_fp32 == 0

    fast, slow = widened.run(feeds)["out"], as_is.run(feeds)["out"]
    assert fast.dtype == np.float16
    # One FP16 rounding of the attention output and one of the sum: 2 half-ulps of values below 4.
    step = 2.0**-9
    assert np.abs(fast.astype(np.float64) - expected).max() <= 2 * step
    assert np.abs(fast.astype(np.float64) - slow.astype(np.float64)).max() <= 4 * step
    assert path.read_bytes() == on_disk  # the rewrite never touches the file


def test_only_fp16_attention_is_rewritten() -> None:
    fp32 = _fp16_attention_graph(TensorProto.FLOAT)
    assert attention_in_fp32(fp32) == 0
    assert [n.op_type for n in fp32.graph.node] == ["Attention", "Cast", "Add"]

    fp16 = _fp16_attention_graph()
    assert attention_in_fp32(fp16) == 1
    ops = [n.op_type for n in fp16.graph.node]
    assert ops == ["Cast", "Cast", "Cast", "Attention", "Cast", "Cast", "Add"]
    attention = fp16.graph.node[3]
    # The core's three inputs are widened, its output narrowed back under the original name.
    assert all(name.endswith(f"fp32_in{i}") for i, name in enumerate(attention.input))
    assert fp16.graph.node[4].output[0] == "attended"
    onnx.checker.check_model(fp16, full_check=True)


def _fp16_quantize_graph(input_type: int = TensorProto.FLOAT16) -> onnx.ModelProto:
    """x -> QuantizeLinear (scale of x's type, int8 zero point) -> int8 q."""
    dtype = np.float16 if input_type == TensorProto.FLOAT16 else np.float32
    scale = numpy_helper.from_array(np.array(1 / 127, dtype), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quantize")],
        "g",
        [helper.make_tensor_value_info("x", input_type, [64])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [64])],
        initializer=[scale, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_fp16_quantize_rounds_to_nearest_even_on_cpu(tmp_path: Path) -> None:
    """ONNX says round(x / scale) to nearest even; ONNX Runtime's CPU FP16 kernel truncated toward zero."""
    path = tmp_path / "quantize.onnx"
    onnx.save(_fp16_quantize_graph(), str(path))
    scale = np.float32(np.float16(1 / 127))
    steps = np.linspace(-20.75, 20.75, 64)  # x / scale lands on every kind of fraction, ties included
    x = (steps * scale).astype(np.float16)
    expected = np.clip(np.round(x.astype(np.float32) / scale), -128, 127).astype(np.int8)  # numpy: half to even
    backend = OnnxRuntimeBackend(path, ["q"], ["cpu"], reduced_precision=True)
    assert backend.quantize_in_fp32 == 1 and backend.attention_in_fp32 == 0
    assert "1 FP16 QuantizeLinear run in FP32" in backend.description
    np.testing.assert_array_equal(backend.run({"x": x})["q"], expected)


def test_only_fp16_quantize_is_rewritten() -> None:
    fp32 = _fp16_quantize_graph(TensorProto.FLOAT)
    assert quantize_in_fp32(fp32) == 0
    fp16 = _fp16_quantize_graph()
    assert quantize_in_fp32(fp16) == 1
    assert [n.op_type for n in fp16.graph.node] == ["Cast", "Cast", "QuantizeLinear"]
    assert list(fp16.graph.node[2].input) == ["quantize/fp32_in0", "quantize/fp32_in1", "zero"]
    onnx.checker.check_model(fp16, full_check=True)
