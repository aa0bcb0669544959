"""btdeploy's linear-time redundant-Cast removal against Model Optimizer's own, on every pattern it handles."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from btdeploy.quantize.redundant_casts import remove_redundant_casts

FLOAT, FLOAT16, DOUBLE = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE


def _cast(name: str, source: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [name], to=to, name=name)


def _every_pattern() -> onnx.ModelProto:
    """A graph with each kind of Cast Model Optimizer removes, and ones it must keep:
    - same: FP32 -> FP32 (does nothing);
    - up, then down: FP16 -> FP32 -> FP16 (the first does nothing);
    - down, then up: FP32 -> FP16 -> FP32 (changes values: kept);
    - a Constant read only by a Cast (folded into the Constant);
    - a Constant read by a Cast and another node (kept);
    - a Cast that writes a network output while its input has two readers;
    - a Cast that writes a network output from a single-reader input."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        _cast("same", "a", FLOAT),
        helper.make_node("Neg", ["same"], ["b"], name="neg"),
        _cast("half", "b", FLOAT16),
        _cast("up", "half", FLOAT),
        _cast("down_again", "up", FLOAT16),
        _cast("wide", "down_again", FLOAT),
        _cast("wider", "wide", DOUBLE),
        helper.make_node("Cast", ["wider"], ["c"], to=FLOAT, name="back"),
        helper.make_node("Constant", [], ["k"], name="k", value=helper.make_tensor("k", DOUBLE, [2], [1.5, -2.25])),
        _cast("k_float", "k", FLOAT),
        helper.make_node("Add", ["c", "k_float"], ["d"], name="add"),
        helper.make_node("Constant", [], ["shared"], name="shared", value=helper.make_tensor("s", DOUBLE, [2], [3, 4])),
        _cast("shared_float", "shared", FLOAT),
        helper.make_node("Identity", ["shared"], ["shared_copy"], name="copy"),
        helper.make_node("Mul", ["d", "shared_float"], ["e"], name="mul"),
        helper.make_node("Sigmoid", ["e"], ["f"], name="sigmoid"),
        helper.make_node("Tanh", ["f"], ["g"], name="tanh"),
        _cast("out_cast", "f", FLOAT),
        helper.make_node("Exp", ["g"], ["h"], name="exp"),
        _cast("out_single", "h", FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "casts",
        [helper.make_tensor_value_info("x", FLOAT, [2])],
        [
            helper.make_tensor_value_info(name, elem, [2])
            for name, elem in (("out_cast", FLOAT), ("g", FLOAT), ("out_single", FLOAT), ("shared_copy", DOUBLE))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return onnx.shape_inference.infer_shapes(model)


def test_the_same_casts_go_and_the_graph_is_model_optimizers_byte_for_byte() -> None:
    from modelopt.onnx import utils as modelopt_utils

    original = _every_pattern()
    onnx.checker.check_model(original)
    theirs = modelopt_utils.remove_redundant_casts(onnx.ModelProto.FromString(original.SerializeToString()))
    ours = remove_redundant_casts(onnx.ModelProto.FromString(original.SerializeToString()))
    casts_before = sum(node.op_type == "Cast" for node in original.graph.node)
    casts_after = sum(node.op_type == "Cast" for node in ours.graph.node)
    left = {node.name for node in ours.graph.node if node.op_type == "Cast"}
    assert {"same", "up", "k_float", "out_cast", "out_single"}.isdisjoint(left)
    assert {"half", "shared_float"} <= left
    assert casts_after < casts_before - 4
    assert ours.SerializeToString() == theirs.SerializeToString()
    onnx.checker.check_model(ours)
