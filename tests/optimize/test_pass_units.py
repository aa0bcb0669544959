"""Each graph pass alone, on a small hand-built graph: what it rewrites, what it counts, why it
does not match, and that the rewritten graph computes the same numbers on ONNX Runtime."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.cpu import sums_saturate_here, u8s8_gemm
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.attention import ATTENTION
from btdeploy.optimize.passes.base import GraphPass, PassResult
from btdeploy.optimize.passes.cleanup import CLEANUP
from btdeploy.optimize.passes.cls_rows import CLS_ROWS
from btdeploy.optimize.passes.gelu import GELU
from btdeploy.optimize.passes.integer_matmul import INTEGER_MATMULS
from btdeploy.optimize.passes.layernorm import BRIDGE_LAYERNORM, RESIDUAL_LAYERNORM, split_skip_layernorm
from btdeploy.optimize.passes.no_op_casts import NO_OP_CASTS
from btdeploy.optimize.passes.qdq_islands import QDQ_ISLANDS
from btdeploy.optimize.passes.shared_weights import SHARED_WEIGHTS
from btdeploy.optimize.passes.weight_layouts import WEIGHT_LAYOUTS

WIDTH, HEADS = 8, 2
RNG = np.random.default_rng(7)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _weight(name: str, rows: int = WIDTH, cols: int = WIDTH) -> list[onnx.TensorProto]:
    w = RNG.standard_normal((rows, cols)).astype(np.float32) * 0.3
    b = RNG.standard_normal(cols).astype(np.float32) * 0.1
    return [_init(f"{name}_w", w), _init(f"{name}_b", b)]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           initializers: list[onnx.TensorProto], opset: int = 23) -> onnx.ModelProto:  # fmt: skip
    graph = helper.make_graph(
        nodes, "unit", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _float(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _rewrite(
    model: onnx.ModelProto, graph_pass: GraphPass, flavour: Flavour = Flavour.ORT
) -> tuple[onnx.ModelProto, PassResult]:
    graph = Graph(onnx.ModelProto.FromString(model.SerializeToString()))
    result = graph_pass.run(graph, flavour)
    graph.toposort()
    return graph.model, result


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --- attention ------------------------------------------------------------------------------


def _attention_model(
    cross: bool, mask: bool, scale_constant: bool = True, one_row: bool = False, projected: bool = False
) -> onnx.ModelProto:
    """The canonical exported block: projections, scale on Q, head reshapes, (mask), softmax; with
    `one_row`, the query is row 0 of x (as the cls_rows pass leaves it); with `projected`, an
    output projection MatMul + bias reads the block."""
    head = WIDTH // HEADS
    kv = "m" if cross else "x"
    inits = [*_weight("q"), *_weight("k"), *_weight("v")]
    inits += [_init("heads_shape", np.array([0, 0, HEADS, head])), _init("flat", np.array([0, 0, WIDTH]))]
    nodes = []
    query_source = "x"
    if one_row:
        inits += [_init("row_start", np.array([0])), _init("row_end", np.array([1])), _init("row_axis", np.array([1]))]
        nodes.append(helper.make_node("Slice", ["x", "row_start", "row_end", "row_axis"], ["x_row0"]))
        query_source = "x_row0"
    for name, source in (("q", query_source), ("k", kv), ("v", kv)):
        nodes += [
            helper.make_node("MatMul", [source, f"{name}_w"], [f"{name}_mm"]),
            helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [f"{name}_biased"]),
        ]
    if scale_constant:
        inits.append(_init("scale", np.array(head**-0.5, dtype=np.float32)))
    nodes += [
        helper.make_node("Mul", ["q_biased", "scale"], ["q_scaled"]),
        helper.make_node("Reshape", ["q_scaled", "heads_shape"], ["q_heads"]),
        helper.make_node("Transpose", ["q_heads"], ["q_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k_biased", "heads_shape"], ["k_heads"]),
        helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v_biased", "heads_shape"], ["v_heads"]),
        helper.make_node("Transpose", ["v_heads"], ["v_t"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
    ]
    inputs = [_float("x", ["b", "s", WIDTH])] + ([_float("m", ["b", "l", WIDTH])] if cross else [])
    probs_in = "scores"
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "l"]))
        inits += [_init("one", np.array(1.0, np.float32)), _init("fill", np.array(-10000.0, np.float32))]
        inits.append(_init("axes12", np.array([1, 2])))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "axes12"], ["mask_4d"]),
            helper.make_node("Sub", ["one", "mask_4d"], ["inverted"]),
            helper.make_node("Mul", ["inverted", "fill"], ["additive"]),
            helper.make_node("Add", ["scores", "additive"], ["masked"]),
        ]
        probs_in = "masked"
    nodes += [
        helper.make_node("Softmax", [probs_in], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["merged"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["merged", "flat"], ["y" if not projected else "context_flat"]),
    ]
    if projected:
        inits += _weight("o")
        nodes += [
            helper.make_node("MatMul", ["context_flat", "o_w"], ["o_mm"]),
            helper.make_node("Add", ["o_b", "o_mm"], ["y"]),
        ]
    if not scale_constant:
        inputs.append(_float("scale", []))
    return _model(nodes, inputs, ["y"], inits)


def _attention_feeds(cross: bool, mask: bool) -> dict[str, np.ndarray]:
    feeds = {"x": RNG.standard_normal((2, 5, WIDTH)).astype(np.float32)}
    length = 3 if cross else 5
    if cross:
        feeds["m"] = RNG.standard_normal((2, length, WIDTH)).astype(np.float32)
    if mask:
        feeds["attention_mask"] = np.array([[1] * length, [1] * (length - 1) + [0]], dtype=np.int64)
    return feeds


@pytest.mark.parametrize(("cross", "mask"), [(False, False), (False, True), (True, True), (True, False)])
def test_attention_fuses_self_and_cross_blocks(cross: bool, mask: bool) -> None:
    model = _attention_model(cross, mask)
    fused, result = _rewrite(model, ATTENTION)
    assert result.fused == 1 and result.unmatched == []
    assert result.details == {"self": int(not cross), "cross": int(cross), "one_row_absorbed": 0}
    assert _ops(fused).count("Attention") == 1 and "Softmax" not in _ops(fused)
    feeds = _attention_feeds(cross, mask)
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(model, feeds)[0], atol=1e-5)


@pytest.mark.parametrize("flavour", [Flavour.ORT, Flavour.TRT])
@pytest.mark.parametrize("projected", [False, True])
def test_attention_drops_the_key_bias_and_moves_the_value_bias(flavour: Flavour, projected: bool) -> None:
    # The softmax ignores q . bk, and p . (v + bv) = p . v + bv: no bias Add runs over the keys;
    # bv joins the output projection's bias where one reads the block, else one Add on the context.
    model = _attention_model(cross=True, mask=True, projected=projected)
    fused, result = _rewrite(model, ATTENTION, flavour)
    assert result.fused == 1
    producers = {o: n for n in fused.graph.node for o in n.output}
    attention = next(n for n in fused.graph.node if n.op_type == "Attention")
    assert [producers[name].op_type for name in attention.input[:3]] == ["Add", "MatMul", "MatMul"]
    assert _ops(fused).count("Add") == 2  # the query bias and, after the block, the value bias or bo + bv Wo
    feeds = _attention_feeds(cross=True, mask=True)
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(model, feeds)[0], atol=1e-5)


@pytest.mark.parametrize(("cross", "mask"), [(False, False), (False, True), (True, True), (True, False)])
def test_a_one_row_query_attends_to_the_unprojected_keys_in_the_ort_flavour(cross: bool, mask: bool) -> None:
    model = _attention_model(cross, mask, one_row=True, projected=True)
    feeds = _attention_feeds(cross, mask)
    expected = _run(model, feeds)[0]
    assert expected.shape == (2, 1, WIDTH)
    fused, result = _rewrite(model, ATTENTION, Flavour.ORT)
    # Its query reads row 0 and its keys every row: counted as cross-attention, as cls_rows says.
    assert result.details == {"self": 0, "cross": 1, "one_row_absorbed": 1}
    # No projection of the keys' source remains: the Attention reads it as one head of its width.
    source = "m" if cross else "x"
    assert [n.op_type for n in fused.graph.node if source in n.input] == (
        ["Unsqueeze"] if cross else ["Slice", "Unsqueeze"]
    )
    attention = next(n for n in fused.graph.node if n.op_type == "Attention")
    assert attention.input[1] == attention.input[2]
    np.testing.assert_allclose(_run(fused, feeds)[0], expected, atol=1e-5)
    # The trt flavour keeps a K and a V projection per head.
    standard, result = _rewrite(model, ATTENTION, Flavour.TRT)
    assert result.details["one_row_absorbed"] == 0
    assert sum(n.op_type == "MatMul" and source in n.input for n in standard.graph.node) == 2
    np.testing.assert_allclose(_run(standard, feeds)[0], expected, atol=1e-5)


def test_attention_says_why_a_block_does_not_match() -> None:
    model = _attention_model(cross=False, mask=False, scale_constant=False)
    fused, result = _rewrite(model, ATTENTION)
    assert result.fused == 0 and "Softmax" in _ops(fused)
    assert len(result.unmatched) == 1 and "not scaled by a constant Mul" in result.unmatched[0]


# --- add + LayerNorm ------------------------------------------------------------------------


def _add_layernorm_model(bridge: bool) -> onnx.ModelProto:
    gamma = (1 + 0.1 * RNG.standard_normal(WIDTH)).astype(np.float32)
    beta = (0.1 * RNG.standard_normal(WIDTH)).astype(np.float32)
    inits = [*_weight("dense"), _init("gamma", gamma), _init("beta", beta)]
    name = "/cross_modal_text_link_tower.0/LayerNorm" if bridge else "/encoder/layer.0/output/LayerNorm"
    nodes = [
        helper.make_node("MatMul", ["h", "dense_w"], ["dense_mm"]),
        helper.make_node("Add", ["dense_mm", "dense_b"], ["dense_out"]),
        helper.make_node("Add", ["dense_out", "residual"], ["summed"]),
        helper.make_node("LayerNormalization", ["summed", "gamma", "beta"], ["y"], name=name, axis=-1, epsilon=1e-5),
    ]
    return _model(nodes, [_float("h", ["b", "s", WIDTH]), _float("residual", ["b", "s", WIDTH])], ["y"], inits)


@pytest.mark.parametrize("bridge", [True, False])
def test_add_layernorm_becomes_skip_layernorm_in_ort_and_is_counted_in_trt(bridge: bool) -> None:
    model = _add_layernorm_model(bridge)
    mine, other = (BRIDGE_LAYERNORM, RESIDUAL_LAYERNORM) if bridge else (RESIDUAL_LAYERNORM, BRIDGE_LAYERNORM)
    fused, result = _rewrite(model, mine, Flavour.ORT)
    assert result.fused == 1 and _ops(fused) == ["MatMul", "SkipLayerNormalization"]  # the bias folded in
    feeds = {n: RNG.standard_normal((2, 4, WIDTH)).astype(np.float32) for n in ("h", "residual")}
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(model, feeds)[0], atol=1e-5)
    assert _rewrite(model, other, Flavour.ORT)[1].fused == 0  # a bridge is not a residual, and back
    kept, counted = _rewrite(model, mine, Flavour.TRT)
    assert counted.fused == 1 and _ops(kept) == _ops(model)


# --- GELU -----------------------------------------------------------------------------------


def _gelu_model() -> onnx.ModelProto:
    inits = [*_weight("ffn"), _init("sqrt2", np.array(np.sqrt(2), np.float32))]
    inits += [_init("one", np.array(1.0, np.float32)), _init("half", np.array(0.5, np.float32))]
    inits.append(_init("alpha", np.array(1.702, np.float32)))
    nodes = [
        helper.make_node("MatMul", ["h", "ffn_w"], ["mm"]),
        helper.make_node("Add", ["mm", "ffn_b"], ["x"]),
        helper.make_node("Div", ["x", "sqrt2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["plus_one"]),
        helper.make_node("Mul", ["x", "plus_one"], ["times_x"]),
        helper.make_node("Mul", ["times_x", "half"], ["gelu"]),
        helper.make_node("Mul", ["gelu", "alpha"], ["quick_in"]),
        helper.make_node("Sigmoid", ["quick_in"], ["gate"]),
        helper.make_node("Mul", ["gelu", "gate"], ["y"]),
    ]
    return _model(nodes, [_float("h", ["b", WIDTH])], ["y"], inits)


@pytest.mark.parametrize(
    ("flavour", "ops"),
    [
        (Flavour.ORT, ["MatMul", "BiasGelu", "QuickGelu"]),
        (Flavour.TRT, ["MatMul", "Add", "Gelu", "Mul", "Sigmoid", "Mul"]),
    ],
)
def test_gelu_and_quick_gelu(flavour: Flavour, ops: list[str]) -> None:
    model = _gelu_model()
    fused, result = _rewrite(model, GELU, flavour)
    assert _ops(fused) == ops
    assert result.details["gelu"] == 1 and result.details["quick_gelu"] == int(flavour == Flavour.ORT)
    feeds = {"h": RNG.standard_normal((3, WIDTH)).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(model, feeds)[0], atol=1e-5)


def _scalars(**values: float) -> list[onnx.TensorProto]:
    return [_init(name, np.array(value, np.float32)) for name, value in values.items()]


def _nodes(*lines: str) -> list[onnx.NodeProto]:
    """Nodes written as "Op input input -> output"."""
    nodes = []
    for line in lines:
        op_type, *inputs = line.split(" -> ")[0].split()
        nodes.append(helper.make_node(op_type, inputs, [line.split(" -> ")[1]]))
    return nodes


# Each way a model's code writes its activation, as the exporter emits it: nodes from "x" to "y"
# (x = MatMul + bias), the scalars they read, and what the GELU pass must find.
_ROOT_2_OVER_PI = float(np.sqrt(2 / np.pi))
_TANH_POW = _nodes(
    "Mul half x -> half_x",
    "Pow x three -> cube",
    "Mul cube c -> scaled_cube",
    "Add x scaled_cube -> inner",
    "Mul inner root -> arg",
    "Tanh arg -> tanh",
    "Add tanh one -> plus_one",
    "Mul half_x plus_one -> y",
)
# Each form: its nodes, its scalar initializers, and the kind of GELU it is (None: not one).
GELU_FORMS: dict[str, tuple[list[onnx.NodeProto], list[onnx.TensorProto], str | None]] = {
    "gelu_python: x * 0.5 * (1 + erf(x / sqrt 2))": (
        _nodes(
            "Mul x half -> half_x",
            "Div x sqrt2 -> scaled",
            "Erf scaled -> erf",
            "Add erf one -> plus_one",
            "Mul half_x plus_one -> y",
        ),
        _scalars(half=0.5, sqrt2=float(np.sqrt(2)), one=1.0),
        "gelu",
    ),
    "gelu_new: Pow(x, 3)": (
        _TANH_POW,
        _scalars(half=0.5, three=3.0, c=0.044715, root=_ROOT_2_OVER_PI, one=1.0),
        "gelu_tanh",
    ),
    "gelu_pytorch_tanh: x * x * x": (
        _nodes(
            "Mul x x -> square",
            "Mul square x -> cube",
            "Mul cube c -> scaled_cube",
            "Add x scaled_cube -> inner",
            "Mul inner root -> arg",
            "Tanh arg -> tanh",
            "Add one tanh -> plus_one",
            "Mul x half -> half_x",
            "Mul half_x plus_one -> y",
        ),
        _scalars(c=0.044715, root=_ROOT_2_OVER_PI, one=1.0, half=0.5),
        "gelu_tanh",
    ),
    "gelu_fast: tanh(x * 0.79788 * (1 + 0.044715 x^2))": (
        _nodes(
            "Mul x x -> square",
            "Mul square c -> scaled_square",
            "Add scaled_square one -> factor",
            "Mul x root -> rooted",
            "Mul rooted factor -> arg",
            "Tanh arg -> tanh",
            "Add tanh one -> plus_one",
            "Mul x plus_one -> x_plus",
            "Mul x_plus half -> y",
        ),
        _scalars(c=0.044715, root=0.7978845608, one=1.0, half=0.5),
        "gelu_tanh",
    ),
    "ONNX Gelu, approximate tanh (opset 20 export)": (
        [helper.make_node("Gelu", ["x"], ["y"], approximate="tanh")],
        [],
        "gelu_tanh",
    ),
    "ONNX Gelu (opset 20 export)": (_nodes("Gelu x -> y"), [], "gelu"),
    "silu: x * sigmoid(x)": (
        _nodes("Sigmoid x -> gate", "Mul gate x -> y"),
        [],
        "quick_gelu",
    ),
    # Not a GELU: the tanh form with another constant, and a pooler's tanh.
    "tanh form with 0.05 for 0.044715": (
        _TANH_POW,
        _scalars(half=0.5, three=3.0, c=0.05, root=_ROOT_2_OVER_PI, one=1.0),
        None,
    ),
    "tanh alone": (_nodes("Tanh x -> y"), [], None),
}

# What each flavour makes of each kind, after the MatMul (None: as it was).
_FUSED_OPS: dict[Flavour, dict[str | None, list[str] | None]] = {
    Flavour.ORT: {"gelu": ["BiasGelu"], "gelu_tanh": ["FastGelu"], "quick_gelu": ["Add", "QuickGelu"], None: None},
    Flavour.TRT: {"gelu": ["Add", "Gelu"], "gelu_tanh": ["Add", "Gelu"], "quick_gelu": None, None: None},
    Flavour.TRT_COMPAT: {"gelu": None, "gelu_tanh": None, "quick_gelu": None, None: None},
}


@pytest.mark.parametrize("flavour", list(Flavour))
@pytest.mark.parametrize("form", list(GELU_FORMS))
def test_every_form_of_gelu_is_found_by_what_it_computes(form: str, flavour: Flavour) -> None:
    """gelu_new and the other tanh forms had stayed as exported (eight operators, each a pass over
    the FFN's activations) and so had gelu_python's erf arrangement and the ONNX Gelu of an opset-20
    export, whose bias then stayed a separate Add in the ort graph."""
    nodes, scalars, kind = GELU_FORMS[form]
    opset = 20 if nodes[0].op_type == "Gelu" else 17
    model = _model(
        [helper.make_node("MatMul", ["h", "ffn_w"], ["mm"]), helper.make_node("Add", ["mm", "ffn_b"], ["x"]), *nodes],
        [_float("h", ["b", WIDTH])], ["y"], [*_weight("ffn"), *scalars], opset=opset,
    )  # fmt: skip
    fused, result = _rewrite(model, GELU, flavour)
    expected = _FUSED_OPS[flavour][kind]
    assert _ops(fused) == (_ops(model) if expected is None else ["MatMul", *expected])
    counted = {k: result.details[k] for k in ("gelu", "gelu_tanh", "quick_gelu")}
    rewritten_quick = flavour == Flavour.ORT and kind == "quick_gelu"
    assert counted == {k: int(k == kind and (k != "quick_gelu" or rewritten_quick)) for k in counted}
    assert result.details["bias_folded"] == int(flavour == Flavour.ORT and kind in ("gelu", "gelu_tanh"))
    if kind == "quick_gelu" and flavour == Flavour.ORT:
        assert fused.graph.node[-1].attribute[0].f == pytest.approx(1.0, abs=1e-6)  # SiLU is QuickGELU at alpha 1
    feeds = {"h": (3 * RNG.standard_normal((4, WIDTH))).astype(np.float32)}
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_a_gelu_whose_inner_value_is_read_elsewhere_stays() -> None:
    """Fusing would remove a tensor another node reads: the island is left as it is."""
    nodes, scalars, _ = GELU_FORMS["gelu_new: Pow(x, 3)"]
    model = _model(
        [helper.make_node("MatMul", ["h", "ffn_w"], ["mm"]), helper.make_node("Add", ["mm", "ffn_b"], ["x"]), *nodes,
         helper.make_node("Add", ["y", "tanh"], ["z"])],
        [_float("h", ["b", WIDTH])], ["z"], [*_weight("ffn"), *scalars],
    )  # fmt: skip
    for flavour in (Flavour.ORT, Flavour.TRT):
        fused, result = _rewrite(model, GELU, flavour)
        assert result.details["gelu_tanh"] == 0 and _ops(fused) == _ops(model)


# --- cleanup and [CLS] rows -----------------------------------------------------------------


def test_shared_weights_are_read_directly_and_cleanup_drops_dead_nodes() -> None:
    inits = _weight("shared")
    nodes = [
        helper.make_node("Identity", ["shared_w"], ["copy"]),
        helper.make_node("MatMul", ["h", "copy"], ["y"]),
        helper.make_node("Relu", ["h"], ["dead"]),
    ]
    model = _model(nodes, [_float("h", ["b", WIDTH])], ["y"], inits)
    direct, shared = _rewrite(model, SHARED_WEIGHTS)
    assert _ops(direct) == ["Identity", "MatMul", "Relu"] and direct.graph.node[1].input[1] == "shared_w"
    assert shared.details == {"weight_identities_bypassed": 1} and shared.fused == 1
    cleaned, result = _rewrite(direct, CLEANUP)
    assert _ops(cleaned) == ["MatMul"] and cleaned.graph.node[0].input[1] == "shared_w"
    assert result.details["nodes_removed"] == 2
    assert result.details["initializers_removed"] == 1  # the unused bias
    feeds = {"h": RNG.standard_normal((2, WIDTH)).astype(np.float32)}
    np.testing.assert_allclose(_run(cleaned, feeds)[0], _run(model, feeds)[0], atol=1e-6)


def test_no_op_casts_are_dropped_and_the_pair_behind_one_fuses() -> None:
    # As the TorchScript export writes them: the pixels through two Casts to FP32 in a row, a
    # bridge-read vision layer's residual sum through one before its LayerNorm, and itc's
    # embeddings through one into the graph's output.
    gamma = (1 + 0.1 * RNG.standard_normal(WIDTH)).astype(np.float32)
    beta = (0.1 * RNG.standard_normal(WIDTH)).astype(np.float32)
    to_float: dict[str, Any] = {"to": TensorProto.FLOAT}
    layer_norm = "/encoder/layer.0/output/LayerNorm"
    nodes = [
        helper.make_node("Cast", ["x"], ["x_cast"], name="pixels_cast", **to_float),
        helper.make_node("Cast", ["x_cast"], ["x_cast_again"], name="pixels_cast_again", **to_float),
        helper.make_node("Add", ["x_cast_again", "residual"], ["summed"], name="/resblocks.1/Add_4"),
        helper.make_node("Cast", ["summed"], ["summed_cast"], name="sum_cast", **to_float),
        helper.make_node("LayerNormalization", ["summed_cast", "gamma", "beta"], ["y"], name=layer_norm, axis=-1),
        helper.make_node("Cast", ["y"], ["y_out"], name="output_cast", **to_float),
        helper.make_node("Relu", ["y"], ["y_relu"], name="other_reader"),  # reads what the output Cast read
        helper.make_node("Cast", ["ids"], ["ids_float"], name="real_cast", **to_float),  # int64 to FP32: kept
        helper.make_node("Cast", ["x"], ["x_out"], name="input_to_output", **to_float),  # input to output: kept
    ]
    inputs = [
        _float("x", ["b", WIDTH]),
        _float("residual", ["b", WIDTH]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", WIDTH]),
    ]
    outputs = ["y_out", "y_relu", "ids_float", "x_out"]
    model = _model(nodes, inputs, outputs, [_init("gamma", gamma), _init("beta", beta)])
    assert _rewrite(model, RESIDUAL_LAYERNORM)[1].fused == 0  # the Cast hides the pair
    direct, result = _rewrite(model, NO_OP_CASTS)
    assert result.details == {"no_op_casts_bypassed": 3, "output_casts_dropped": 1} and result.fused == 4
    assert result.unmatched == []
    nodes_by_name = {node.name: node for node in direct.graph.node}
    assert sorted(name for name, node in nodes_by_name.items() if node.op_type == "Cast") == [
        "input_to_output",
        "real_cast",
    ]
    assert list(nodes_by_name["/resblocks.1/Add_4"].input) == ["x", "residual"]
    assert nodes_by_name[layer_norm].input[0] == "summed" and list(nodes_by_name[layer_norm].output) == ["y_out"]
    assert list(nodes_by_name["other_reader"].input) == ["y_out"]
    assert [o.name for o in direct.graph.output] == outputs  # the graph's interface unchanged
    fused, residual = _rewrite(direct, RESIDUAL_LAYERNORM)
    assert residual.fused == 1 and "SkipLayerNormalization" in _ops(fused)
    feeds: dict[str, np.ndarray] = {
        "x": RNG.standard_normal((3, WIDTH)).astype(np.float32),
        "residual": RNG.standard_normal((3, WIDTH)).astype(np.float32),
        "ids": RNG.integers(0, 50, (3, WIDTH)),
    }
    for got, want in zip(_run(fused, feeds), _run(model, feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_weights_behind_layout_operators_become_initializers() -> None:
    # The dynamo exporter's packed in-projection: MatMul(x, Transpose(Slice(packed))); and a Transpose
    # of an activation, which must stay.
    packed = RNG.standard_normal((3 * WIDTH, WIDTH)).astype(np.float32)
    inits = [
        _init("packed", packed),
        *(_init(n, np.array([v])) for n, v in (("start", WIDTH), ("end", 2 * WIDTH), ("axis", 0))),
    ]
    nodes = [
        helper.make_node("Slice", ["packed", "start", "end", "axis"], ["k_rows"]),
        helper.make_node("Transpose", ["k_rows"], ["k_w"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "k_w"], ["k"]),
        helper.make_node("Transpose", ["k"], ["y"], perm=[1, 0]),
    ]
    model = _model(nodes, [_float("h", ["b", WIDTH])], ["y"], inits, opset=17)
    folded, result = _rewrite(model, WEIGHT_LAYOUTS)
    assert _ops(folded) == ["MatMul", "Transpose"]
    assert result.fused == 2 and result.details == {"transpose_folded": 1, "slice_folded": 1}
    assert [t.name for t in folded.graph.initializer] == ["packed", "start", "end", "axis", "k_w"]  # not k_rows
    weight = Graph(folded).constant("k_w")
    assert weight is not None
    np.testing.assert_array_equal(weight, packed[WIDTH : 2 * WIDTH].T)  # the folding is exact
    feeds = {"h": RNG.standard_normal((2, WIDTH)).astype(np.float32)}
    np.testing.assert_array_equal(_run(folded, feeds)[0], _run(model, feeds)[0])
    assert _rewrite(folded, WEIGHT_LAYOUTS)[1].fused == 0  # nothing left to fold


def test_folding_a_weight_leaves_no_node_of_the_graph_in_a_reference_cycle() -> None:
    """A node held by a reference cycle keeps its whole model's memory until the cyclic collector
    runs, which it did not between the pipeline's steps after a dynamo export: base's graph stayed
    resident (+1.4 GB) through every later step."""
    inits = [_init("w", RNG.standard_normal((WIDTH, 2 * WIDTH)).astype(np.float32))]
    nodes = [
        helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "w_t"], ["y"]),
    ]
    model = _model(nodes, [_float("h", ["b", 2 * WIDTH])], ["y"], inits, opset=17)
    graph = Graph(model)
    own = [*graph.graph.node, *graph.graph.initializer]  # held: protobuf keeps one wrapper per message
    gc.collect()
    gc.disable()
    try:
        result = WEIGHT_LAYOUTS.run(graph, Flavour.ORT)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        held = [type(o).__name__ for o in gc.garbage if any(r is m for r in gc.get_referents(o) for m in own)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert result.fused == 1
    assert held == []


# The activations a config's hidden_act exports as besides the GELUs; Clip with its optional min
# left out ("") as a clamp with only a max exports.
_ACTIVATIONS = {
    "none": [],
    "Clip without a min": [helper.make_node("Clip", ["dense", "", "six"], ["activated"])],
    "Softplus (mish)": [helper.make_node("Softplus", ["dense"], ["activated"])],
    "LeakyRelu": [helper.make_node("LeakyRelu", ["dense"], ["activated"], alpha=0.1)],
}


@pytest.mark.parametrize("activation", list(_ACTIVATIONS))
def test_cls_rows_compute_only_the_row_the_pooler_reads(activation: str) -> None:
    """With relu6, gelu_10, mish or leaky_relu in a config, the element-wise operator between the
    dense layer and the pooler had stopped the pass: every row was computed."""
    inits = [*_weight("dense"), _init("zero", np.array(0)), _init("six", np.array(6.0, np.float32))]
    inits += [_init("gamma", np.ones(WIDTH, np.float32)), _init("beta", np.zeros(WIDTH, np.float32))]
    between = _ACTIVATIONS[activation]
    nodes = [
        helper.make_node("MatMul", ["h", "dense_w"], ["mm"]),
        helper.make_node("Add", ["mm", "dense_b"], ["dense"]),
        *between,
        helper.make_node("LayerNormalization", ["activated" if between else "dense", "gamma", "beta"], ["normed"]),
        helper.make_node("Gather", ["normed", "zero"], ["y"], axis=1),
    ]
    model = _model(nodes, [_float("h", ["b", "s", WIDTH])], ["y"], inits)
    rewritten, result = _rewrite(model, CLS_ROWS)
    assert result.details["poolers"] == 1
    matmul = next(n for n in rewritten.graph.node if n.op_type == "MatMul")
    producer = {o: n for n in rewritten.graph.node for o in n.output}[matmul.input[0]]
    assert producer.op_type == "Slice"  # the dense layer now sees one row
    feeds = {"h": RNG.standard_normal((2, 6, WIDTH)).astype(np.float32)}
    np.testing.assert_allclose(_run(rewritten, feeds)[0], _run(model, feeds)[0], atol=1e-5)


# --- Q/DQ islands ---------------------------------------------------------------------------


def test_layernorm_reads_the_full_precision_tensor_after_quantization() -> None:
    inits = [*_weight("q"), _init("s", np.array(0.05, np.float32)), _init("zp", np.array(0, np.int8))]
    inits += [_init("gamma", np.ones(WIDTH, np.float32)), _init("beta", np.zeros(WIDTH, np.float32))]
    nodes = [
        helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["h_q"]),
        helper.make_node("DequantizeLinear", ["h_q", "s", "zp"], ["h_dq"]),
        helper.make_node("MatMul", ["h_dq", "q_w"], ["projected"]),
        helper.make_node("LayerNormalization", ["h_dq", "gamma", "beta"], ["normed"], axis=-1),
        helper.make_node("Add", ["projected", "normed"], ["y"]),
    ]
    model = _model(nodes, [_float("h", ["b", WIDTH])], ["y"], inits)
    rewritten, result = _rewrite(model, QDQ_ISLANDS)
    assert result.details == {"inputs_restored": 1}
    by_op = {n.op_type: n for n in rewritten.graph.node}
    assert by_op["LayerNormalization"].input[0] == "h" and by_op["MatMul"].input[0] == "h_dq"


def _int8_matmuls_model(k: int = WIDTH, n: int = WIDTH) -> onnx.ModelProto:
    """Two INT8 MatMuls (k x n weights) reading one rounded activation (uint8, zero point 128: the
    ort flavour's code): one followed by its bias Add, one by an Add of another tensor; and one
    FP32 MatMul."""
    weights = [RNG.integers(-127, 128, (k, n)).astype(np.int8) for _ in range(2)]
    inits = [_init(f"w{i}", w) for i, w in enumerate(weights)]
    inits += [_init(f"w{i}_scale", RNG.uniform(0.01, 0.02, n).astype(np.float32)) for i in range(2)]
    inits += [_init(f"w{i}_zero_point", np.zeros(n, np.int8)) for i in range(2)]
    inits += [_init("s", np.array(0.03, np.float32)), _init("zp", np.array(128, np.uint8))]
    inits += [_init("bias", RNG.standard_normal(n).astype(np.float32)), *_weight("fp", k, n)]
    nodes = [
        helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["h_q"]),
        helper.make_node("DequantizeLinear", ["h_q", "s", "zp"], ["h_dq"]),
        *[helper.make_node("DequantizeLinear", [f"w{i}", f"w{i}_scale", f"w{i}_zero_point"], [f"w{i}_dq"], axis=1)
          for i in range(2)],
        helper.make_node("MatMul", ["h_dq", "w0_dq"], ["p0"], name="proj0"),
        helper.make_node("Add", ["p0", "bias"], ["y0"]),
        helper.make_node("MatMul", ["h_dq", "w1_dq"], ["p1"], name="proj1"),
        helper.make_node("Add", ["p1", "other"], ["y1"]),
        helper.make_node("MatMul", ["h", "fp_w"], ["y2"], name="fp32"),
    ]  # fmt: skip
    return _model(nodes, [_float("h", ["b", "t", k]), _float("other", ["b", "t", n])], ["y0", "y1", "y2"], inits)


def _int8_feeds(batch: int, tokens: int, k: int = WIDTH, n: int = WIDTH) -> dict[str, np.ndarray]:
    return {
        "h": RNG.standard_normal((batch, tokens, k)).astype(np.float32),
        "other": RNG.standard_normal((batch, tokens, n)).astype(np.float32),
    }


def test_int8_matmuls_become_onnx_runtimes_integer_gemm_with_the_bias_and_back() -> None:
    model = _int8_matmuls_model()
    feeds = _int8_feeds(2, 3)
    want = _run(model, feeds)
    lowered, result = _rewrite(model, INTEGER_MATMULS, Flavour.ORT)
    # Width 8 is padded to 16 (the AMX kernel's tile, passes/integer_width.py) and sliced back.
    assert result.details == {"integer_matmuls": 2, "biases_folded": 1, "gemms_padded": 2, "columns_added": 16}
    assert result.unmatched == ["fp32: an input is not dequantized"]
    assert sorted(_ops(lowered)) == ["Add", "MatMul", "MatMulIntegerToFloat", "MatMulIntegerToFloat",
                                     "QuantizeLinear", "Slice", "Slice"]  # fmt: skip
    by_name = {n.name: n for n in lowered.graph.node}
    assert len(by_name["proj0"].input) == 7 and by_name["proj0"].input[6] == "bias_padded16"
    assert len(by_name["proj1"].input) == 6  # an Add of another tensor is not a bias
    for got, expected in zip(_run(lowered, feeds), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # TensorRT's flavours read Q/DQ: the same pass raises the integer MatMuls again, unpadded.
    raised, back = _rewrite(lowered, INTEGER_MATMULS, Flavour.TRT)
    assert back.details == {"matmuls_raised": 2, "biases_unfolded": 1, "gemms_unpadded": 2}
    assert sorted(_ops(raised)) == sorted(_ops(model))
    assert {n.name for n in raised.graph.node if n.op_type == "MatMul"} == {"proj0", "proj1", "fp32"}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for tensor in raised.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), original[tensor.name], err_msg=tensor.name)
    for got, expected in zip(_run(raised, feeds), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # A Q/DQ graph has nothing to raise.
    assert _rewrite(model, INTEGER_MATMULS, Flavour.TRT_COMPAT)[1].fused == 0


def test_integer_gemms_are_exact_at_a_width_that_is_not_a_multiple_of_16() -> None:
    """64 rows and 20 output columns: ONNX Runtime 1.24's AMX kernel got this GEMM wrong on a 2-core
    Xeon (largest error 6.6e5 unpadded); padded to 32 columns it is exact on every CPU."""
    k, n = 96, 20
    model = _int8_matmuls_model(k, n)
    feeds = _int8_feeds(4, 16, k, n)
    lowered, result = _rewrite(model, INTEGER_MATMULS, Flavour.ORT)
    assert result.details["gemms_padded"] == 2 and result.details["columns_added"] == 24
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    uint8 = np.clip(np.round(feeds["h"] / np.float32(0.03)) + 128, 0, 255).astype(np.uint8)
    # The sums this CPU's uint8 x int8 kernel makes (saturating int16 pairs without VNNI), zero point off.
    sums = [u8s8_gemm(uint8, values[f"w{i}"], sums_saturate_here(), a_zero=128) for i in range(2)]
    wanted = [sums[i] * (values[f"w{i}_scale"].astype(np.float64) * 0.03) for i in range(2)]
    wanted = [wanted[0] + values["bias"], wanted[1] + feeds["other"]]
    got = _run(lowered, feeds)
    for index in range(2):
        np.testing.assert_allclose(got[index], wanted[index], rtol=1e-4, atol=1e-4)


def test_int8_dynamic_integer_gemms_are_padded_to_whole_tiles() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from btdeploy.optimize.passes.integer_width import INTEGER_WIDTHS

    k, n = 96, 20
    nodes = [helper.make_node("MatMul", ["h", "w_w"], ["p"]), helper.make_node("Add", ["p", "w_b"], ["y"])]
    model = _model(nodes, [_float("h", ["b", "t", k])], ["y"], _weight("w", k, n), opset=17)
    with tempfile.TemporaryDirectory() as folder:
        onnx.save(model, f"{folder}/fp32.onnx")
        quantize_dynamic(f"{folder}/fp32.onnx", f"{folder}/int8.onnx", weight_type=QuantType.QInt8)
        dynamic = onnx.load(f"{folder}/int8.onnx")
    padded, result = _rewrite(dynamic, INTEGER_WIDTHS, Flavour.ORT)
    assert result.details == {"gemms_padded": 1, "columns_added": 12}
    integer = next(node for node in padded.graph.node if node.op_type == "MatMulInteger")
    weight = next(t for t in padded.graph.initializer if t.name == integer.input[1])
    assert list(weight.dims) == [k, 32]
    feeds = {"h": RNG.standard_normal((4, 16, k)).astype(np.float32)}
    exact = feeds["h"] @ numpy_helper.to_array(model.graph.initializer[0]) + numpy_helper.to_array(
        model.graph.initializer[1]
    )
    # The activation's code, step and zero point as ONNX Runtime computes them, read beside the output.
    quantizer = next(node for node in padded.graph.node if node.op_type == "DynamicQuantizeLinear")
    padded.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in quantizer.output)
    got, codes, step, zero = _run(padded, feeds)
    assert got.shape == exact.shape and codes.dtype == np.uint8
    original = {t.name: numpy_helper.to_array(t) for t in dynamic.graph.initializer}
    weights = original["w_w_quantized"]
    assert original["w_w_zero_point"] == 0
    sums = {saturate: u8s8_gemm(codes, weights, saturate, a_zero=int(zero)) for saturate in (False, True)}
    dense = {key: value * (step * original["w_w_scale"]) + original["w_b"] for key, value in sums.items()}
    # Exact integer sums: INT8 rounding of both operands, within 2 % of the outputs' range.
    assert np.abs(dense[False] - exact).max() <= 0.02 * np.abs(exact).max()
    # The padded graph gives this CPU's sums (saturating int16 pairs without VNNI) wherever it tiles.
    want = dense[sums_saturate_here()]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert INTEGER_WIDTHS.rewrites.keys() == {Flavour.ORT}  # the trt flavours never read int8-dynamic


def test_the_opset_upgrade_without_weights_equals_the_version_converter(tiny_export: Path) -> None:
    """convert_opset runs ONNX's converter on a weightless copy (it copies the whole model twice)
    and keeps the weights where they are: the graph it returns is the converter's, byte for byte."""
    from onnx import version_converter

    from btdeploy.optimize.passes import convert_opset

    source = str(tiny_export / "itm" / "model.onnx")
    expected = version_converter.convert_version(onnx.load(source), 23)
    lifted = onnx.load(source)
    weights = sum(len(t.raw_data) >= 1024 for t in lifted.graph.initializer)
    assert weights > 10
    assert convert_opset(lifted, 23).SerializeToString() == expected.SerializeToString()


# --- Add + LayerNorm of the INT8 graphs -----------------------------------------------------------


def _pre_ln_model() -> onnx.ModelProto:
    """A pre-LN residual step: the sum feeds its LayerNorm and the next residual Add; then a pair
    whose sum nothing else reads, with a dense bias Add in front (which stays apart here)."""
    gamma, beta = RNG.standard_normal(WIDTH).astype(np.float32), RNG.standard_normal(WIDTH).astype(np.float32)
    inits = [_init("gamma", gamma), _init("beta", beta), *_weight("dense")]
    nodes = [
        helper.make_node("Add", ["x", "h"], ["summed"], name="residual_add"),
        helper.make_node("LayerNormalization", ["summed", "gamma", "beta"], ["normed"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["normed", "dense_w"], ["dense"]),
        helper.make_node("Add", ["dense", "dense_b"], ["dense_biased"]),
        helper.make_node("Add", ["summed", "dense_biased"], ["next_sum"], name="next_residual_add"),
        helper.make_node("LayerNormalization", ["next_sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-6),
    ]
    return _model(nodes, [_float("x", ["b", "t", WIDTH]), _float("h", ["b", "t", WIDTH])], ["y"], inits)


def test_int8_layernorm_pairs_become_skip_layernorm_for_ort_and_back() -> None:
    from btdeploy.optimize.passes.quantized_layernorm import QUANTIZED_LAYERNORMS

    model = _pre_ln_model()
    feeds = {name: RNG.standard_normal((2, 3, WIDTH)).astype(np.float32) for name in ("x", "h")}
    want = _run(model, feeds)
    fused, result = _rewrite(model, QUANTIZED_LAYERNORMS, Flavour.ORT)
    assert result.details == {"skip_layernorms": 2}
    assert sorted(_ops(fused)) == ["Add", "MatMul", "SkipLayerNormalization", "SkipLayerNormalization"]
    first, second = (n for n in fused.graph.node if n.op_type == "SkipLayerNormalization")
    assert list(first.output) == ["normed", "", "", "summed"]  # the sum, still read by the next residual
    assert list(second.input) == ["summed", "dense_biased", "gamma", "beta"]  # no bias folded
    np.testing.assert_allclose(_run(fused, feeds)[0], want[0], rtol=1e-5, atol=1e-5)
    # TensorRT's flavours: written back as the pairs they were, computing the same numbers.
    split, back = _rewrite(fused, QUANTIZED_LAYERNORMS, Flavour.TRT)
    assert back.details == {"skip_layernorms_split": 2}
    assert sorted(_ops(split)) == sorted(_ops(model))
    norms = [n for n in split.graph.node if n.op_type == "LayerNormalization"]
    assert [float(helper.get_attribute_value(n.attribute[-1])) for n in norms] == pytest.approx([1e-5, 1e-6])
    np.testing.assert_array_equal(_run(split, feeds)[0], want[0])
    # A SkipLayerNormalization with a folded bias was not written by this pass: refused.
    with_bias, _ = _rewrite(model, RESIDUAL_LAYERNORM, Flavour.ORT)
    with pytest.raises(ValueError, match="folds a bias"):
        _rewrite(with_bias, QUANTIZED_LAYERNORMS, Flavour.TRT)
    # One whose mean is read has no Add + LayerNormalization form: refused before anything changes.
    graph = Graph(fused)
    node = next(n for n in graph.graph.node if n.op_type == "SkipLayerNormalization")
    node.output[1] = "mean"
    before = fused.SerializeToString()
    with pytest.raises(BtDeployError, match="writes its mean or inverse deviation"):
        split_skip_layernorm(graph, node)
    assert fused.SerializeToString() == before
