"""ONNX Runtime's SkipLayerNormalization kernel alone, on the shape of base's vision residuals.

    python benchmarks/skip_layernorm_kernel.py [--rows 1300] [--width 768] [--threads 2] [--runs 200]

Prints the ONNX Runtime this interpreter imports and the median time of one SkipLayerNormalization
(input + skip, then LayerNorm) with and without its bias and its sum output, as btdeploy's fused graphs
hold it (every residual Add + LayerNorm pair), and of the pair it replaces (ONNX's Add, then
LayerNormalization), with the largest difference between the two pairs' outputs; the five forms
take turns, run by run, on huge pages as btdeploy's commands run models. Run it under another
venv's python to compare ONNX Runtime releases: on a Xeon with AMX, 1.30.0 and later took 5x
1.24-1.29's time for SkipLayerNormalization (base-peers-cpu, twenty-seventh look).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from btdeploy.backends.onnxruntime import session_options
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages

WARMUP = 10
Form = tuple[str, bool, bool]  # kernel, bias, sum output
UNFUSED: Form = ("Add + LayerNormalization", False, True)  # the Add's output is the sum


def _model(rows: int, width: int, nodes: list[onnx.NodeProto], outputs: list[str]) -> bytes:
    shape = [1, rows, width]
    rng = np.random.default_rng(0)
    used = {name for node in nodes for name in node.input}
    weights = [
        helper.make_tensor(n, TensorProto.FLOAT, [width], rng.random(width, np.float32)) for n in "gbc" if n in used
    ]
    feeds = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")]
    results = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in outputs]
    graph = helper.make_graph(nodes, "skip_layernorm", feeds, results, weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _fused(rows: int, width: int, bias: bool, sum_output: bool) -> bytes:
    inputs = ["x", "skip", "g", "b"] + (["c"] if bias else [])
    outputs = ["y"] + (["", "", "sum"] if sum_output else [])  # mean and inv_std_var left out
    node = helper.make_node("SkipLayerNormalization", inputs, outputs, domain="com.microsoft", epsilon=1e-5)
    return _model(rows, width, [node], [n for n in outputs if n])


def _unfused(rows: int, width: int) -> bytes:
    """The pair that SkipLayerNormalization replaces: ONNX's Add, then LayerNormalization."""
    add = helper.make_node("Add", ["x", "skip"], ["sum"])
    norm = helper.make_node("LayerNormalization", ["sum", "g", "b"], ["y"], axis=-1, epsilon=1e-5)
    return _model(rows, width, [add, norm], ["y", "sum"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1300, help="batch x tokens (base vision at batch 4: 4 x 325)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    feeds = {n: rng.random((1, args.rows, args.width), np.float32) for n in ("x", "skip")}
    print(f"onnxruntime {ort.__version__}, {args.rows} x {args.width}, {args.threads} threads")
    options = session_options(args.threads)
    models: dict[Form, bytes] = {
        ("SkipLayerNormalization", bias, sum_output): _fused(args.rows, args.width, bias, sum_output)
        for bias in (False, True)
        for sum_output in (False, True)
    }
    models[UNFUSED] = _unfused(args.rows, args.width)
    # ONNX Runtime's optimizer fuses an Add + LayerNormalization pair into SkipLayerNormalization at
    # its extended level: the unfused form runs at the basic level, so that it stays two nodes.
    plain = session_options(args.threads)
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sessions = {
        form: ort.InferenceSession(model, plain if form == UNFUSED else options, providers=["CPUExecutionProvider"])
        for form, model in models.items()
    }
    seconds: dict[Form, list[float]] = {form: [] for form in sessions}
    for run in range(WARMUP + args.runs):
        for form, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            if run >= WARMUP:
                seconds[form].append(time.perf_counter() - start)
    print("| kernel | bias | sum output | median us |\n|---|---|---|---:|")
    for (kernel, bias, sum_output), samples in seconds.items():
        print(f"| {kernel} | {bias} | {sum_output} | {1e6 * statistics.median(samples):.1f} |")
    # The same sum and LayerNorm both ways (no bias): how far apart float32 leaves them.
    fused_y = sessions[("SkipLayerNormalization", False, True)].run(["y"], feeds)[0]
    unfused_y = sessions[UNFUSED].run(["y"], feeds)[0]
    difference = float(np.abs(fused_y - unfused_y).max())
    print(f"largest |y| difference, SkipLayerNormalization against Add + LayerNormalization: {difference:.2e}")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
