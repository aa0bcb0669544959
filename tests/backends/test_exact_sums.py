"""exact_sums: the integer GEMMs' int8 weights recoded to uint8, so ONNX Runtime sums exactly on any CPU."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from btdeploy.backends.exact_sums import unsigned_weights
from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
from btdeploy.backends.targets import TARGETS, integer_sums
from btdeploy.cpu import sums_saturate_here, u8s8_gemm
from btdeploy.errors import BtDeployError

ROWS, DEPTH, COLUMNS = 6, 64, 8
A_ZERO = 3


def _weights() -> np.ndarray:
    """int8 weights whose neighbouring products with large uint8 activations pass 32767 in pairs."""
    rng = np.random.default_rng(0)
    sign = rng.choice([-1, 1], size=(DEPTH // 2, 1, COLUMNS))
    pairs = sign * rng.integers(90, 128, size=(DEPTH // 2, 2, COLUMNS))  # one sign per pair
    return pairs.reshape(DEPTH, COLUMNS).astype(np.int8)


def _activations() -> np.ndarray:
    return np.random.default_rng(1).integers(180, 256, size=(ROWS, DEPTH)).astype(np.uint8)


def _exact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.int64) - A_ZERO) @ b.astype(np.int64)


def _model(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], out_type: int, initializers: list[onnx.TensorProto]
) -> onnx.ModelProto:
    output = helper.make_tensor_value_info("y", out_type, [ROWS, COLUMNS])
    graph = helper.make_graph(nodes, "g", inputs, [output], initializer=initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _matmul_integer(weight_zero: bool = True) -> onnx.ModelProto:
    """uint8 a (zero point 3) x int8 weight -> int32 y."""
    initializers = [
        numpy_helper.from_array(_weights(), "w"),
        numpy_helper.from_array(np.array(A_ZERO, np.uint8), "a_zero"),
    ]
    inputs = ["a", "w", "a_zero"]
    if weight_zero:
        initializers.append(numpy_helper.from_array(np.array(0, np.int8), "w_zero"))
        inputs.append("w_zero")
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [ROWS, DEPTH])
    return _model([helper.make_node("MatMulInteger", inputs, ["y"])], [a], TensorProto.INT32, initializers)


def _matmul_integer_to_float() -> onnx.ModelProto:
    """The static ort INT8 graphs' form: sums times both scales, plus a bias, in one operator."""
    initializers = [
        numpy_helper.from_array(_weights(), "w"),
        numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(0.003, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(A_ZERO, np.uint8), "a_zero"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        numpy_helper.from_array(np.linspace(-1, 1, COLUMNS).astype(np.float32), "bias"),
    ]
    node = helper.make_node(
        "MatMulIntegerToFloat",
        ["a", "w", "a_scale", "w_scale", "a_zero", "w_zero", "bias"],
        ["y"],
        domain="com.microsoft",
    )
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [ROWS, DEPTH])
    return _model([node], [a], TensorProto.FLOAT, initializers)


def _run(model: onnx.ModelProto, tmp_path: Path, exact_sums: bool = False, name: str = "m.onnx") -> np.ndarray:
    path = tmp_path / name
    onnx.save(model, str(path))
    return OnnxRuntimeBackend(path, ["y"], exact_sums=exact_sums).run({"a": _activations()})["y"]


def test_the_weights_saturate_in_pairs_so_the_two_kinds_of_sums_differ() -> None:
    # Without this, a recoding that did nothing would pass every test below on an AVX2 CPU.
    a, b = _activations(), _weights()
    exact = u8s8_gemm(a, b, saturate=False, a_zero=A_ZERO)
    saturating = u8s8_gemm(a, b, saturate=True, a_zero=A_ZERO)
    assert np.array_equal(exact, _exact(a, b))
    assert np.abs(exact - saturating).max() > 1000


@pytest.mark.parametrize("weight_zero", [True, False], ids=["zero-point", "no-zero-point"])
def test_recoded_matmul_integer_sums_exactly_on_any_cpu(tmp_path: Path, weight_zero: bool) -> None:
    model = _matmul_integer(weight_zero)
    as_written = _run(model, tmp_path, name="written.onnx")
    assert unsigned_weights(model) == 1
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight_zero_name = model.graph.node[0].input[3]
    assert initializers["w"].dtype == np.uint8 and np.array_equal(initializers["w"], _weights().astype(np.int16) + 128)
    assert initializers[weight_zero_name].dtype == np.uint8 and int(initializers[weight_zero_name]) == 128
    onnx.checker.check_model(model)
    assert np.array_equal(_run(model, tmp_path), _exact(_activations(), _weights()))
    # As written, ONNX Runtime sums as this CPU's kernel does (saturating without VNNI).
    expected = u8s8_gemm(_activations(), _weights(), sums_saturate_here(), a_zero=A_ZERO)
    assert np.array_equal(as_written, expected)


def test_recoded_matmul_integer_to_float_is_the_exact_product(tmp_path: Path) -> None:
    model = _matmul_integer_to_float()
    assert unsigned_weights(model) == 1
    got = _run(model, tmp_path)
    exact = _exact(_activations(), _weights()) * np.float64(np.float32(0.02)) * np.float64(np.float32(0.003))
    exact += np.linspace(-1, 1, COLUMNS).astype(np.float32)
    assert np.abs(got - exact).max() <= 1e-6 * np.abs(exact).max()


def test_a_weight_also_read_with_int8_activations_stays_int8() -> None:
    # ONNX Runtime has no int8 x uint8 kernel, and one initializer cannot be both types.
    model = _matmul_integer()
    signed = helper.make_tensor_value_info("s", TensorProto.INT8, [ROWS, DEPTH])
    model.graph.input.append(signed)
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), "s_zero"))
    model.graph.node.append(helper.make_node("MatMulInteger", ["s", "w", "s_zero", "w_zero"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.INT32, [ROWS, COLUMNS]))
    assert unsigned_weights(model) == 0
    assert all(t.data_type == TensorProto.INT8 for t in model.graph.initializer if t.name in ("w", "w_zero"))


def test_the_backend_recodes_only_where_the_sums_saturate_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    model = _matmul_integer_to_float()
    onnx.save(model, str(path), save_as_external_data=True, size_threshold=0, location="model.onnx.data")
    before = hashlib.sha256(path.read_bytes() + (tmp_path / "model.onnx.data").read_bytes()).hexdigest()
    backend = OnnxRuntimeBackend(path, ["y"], exact_sums=True)
    recoded = 1 if sums_saturate_here() else 0  # a VNNI or AMX CPU sums exactly already
    assert backend.unsigned_weights == recoded
    assert ("int8 weights recoded to uint8" in backend.description) == bool(recoded)
    got = backend.run({"a": _activations()})["y"]
    exact = _exact(_activations(), _weights()) * np.float64(np.float32(0.02)) * np.float64(np.float32(0.003))
    exact += np.linspace(-1, 1, COLUMNS).astype(np.float32)
    assert np.abs(got - exact).max() <= 1e-6 * np.abs(exact).max()
    assert hashlib.sha256(path.read_bytes() + (tmp_path / "model.onnx.data").read_bytes()).hexdigest() == before


def test_exact_sums_is_the_default_and_only_onnx_runtime_takes_it_off() -> None:
    assert TARGETS["onnxruntime"].resolve({"precision": "int8-dynamic"}).exact_sums is True
    assert TARGETS["onnxruntime"].resolve({"exact_sums": True}).exact_sums is True  # said, on any graph
    resolved = TARGETS["onnxruntime"].resolve({"precision": "int8-dynamic", "exact_sums": False})
    assert resolved.exact_sums is False and resolved.flavour == "ort"
    assert TARGETS["torch"].resolve({"exact_sums": True}).exact_sums is True  # the default, not asked of it
    with pytest.raises(BtDeployError, match="the torch backend .* does not take 'exact_sums'"):
        TARGETS["torch"].resolve({"exact_sums": False})


@pytest.mark.parametrize("flags", [["avx512_vnni"], []], ids=["vnni-cpu", "avx2-cpu"])
def test_reports_say_how_the_integer_products_were_summed(monkeypatch: pytest.MonkeyPatch, flags: list[str]) -> None:
    from btdeploy import cpu

    monkeypatch.setattr(cpu, "exact_integer_sums", lambda: flags)
    resolve = TARGETS["onnxruntime"].resolve
    as_is, recoded = (resolve({"precision": "int8", "exact_sums": e}) for e in (False, True))
    if flags:
        assert integer_sums(as_is) == integer_sums(recoded) == "exact (avx512_vnni)"
    else:
        assert (integer_sums(as_is) or "").startswith("saturating int16 pairs"), integer_sums(as_is)
        assert integer_sums(recoded) == "exact (exact_sums: int8 weights recoded to uint8)"
    # graphs without uint8 x int8 GEMMs: the Q/DQ trt graph (int8 x int8), FP32
    assert integer_sums(resolve({"precision": "int8", "flavour": "trt"})) is None
    assert integer_sums(resolve({})) is None
