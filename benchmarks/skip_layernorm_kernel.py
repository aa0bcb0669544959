"""ONNX Runtime's SkipLayerNormalization kernel alone, on the shape of base's vision residuals.

    python benchmarks/skip_layernorm_kernel.py [--rows 1300] [--width 768] [--threads 2] [--runs 200]

Prints the ONNX Runtime this interpreter imports and the median time of one SkipLayerNormalization
(input + skip, then LayerNorm) with and without its bias and its sum output, as btdeploy's fused graphs
hold it (every residual Add + LayerNorm pair). Run it under another venv's python to compare ONNX
Runtime releases: on a Xeon with AMX, 1.30.0 and later took 5x 1.24-1.29's time (base-peers-cpu,
twenty-seventh look).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

from btdeploy.backends.onnxruntime import session_options
from btdeploy.cli import script_entry


def _graph(rows: int, width: int, bias: bool, sum_output: bool) -> bytes:
    shape = [1, rows, width]
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(n, TensorProto.FLOAT, [width], rng.random(width, np.float32)) for n in "gbc"]
    inputs = ["x", "skip", "g", "b"] + (["c"] if bias else [])
    outputs = ["y"] + (["", "", "sum"] if sum_output else [])  # mean and inv_std_var left out
    node = helper.make_node("SkipLayerNormalization", inputs, outputs, domain="com.microsoft", epsilon=1e-5)
    feeds = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")]
    results = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in outputs if n]
    graph = helper.make_graph([node], "skip_layernorm", feeds, results, weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return onnx.helper.make_model(graph, opset_imports=opsets).SerializeToString()


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
    print("| bias | sum output | median us |\n|---|---|---:|")
    for bias in (False, True):
        for sum_output in (False, True):
            graph = _graph(args.rows, args.width, bias, sum_output)
            session = ort.InferenceSession(graph, session_options(args.threads), providers=["CPUExecutionProvider"])
            for _ in range(10):
                session.run(None, feeds)
            samples = []
            for _ in range(args.runs):
                start = time.perf_counter()
                session.run(None, feeds)
                samples.append(time.perf_counter() - start)
            print(f"| {bias} | {sum_output} | {1e6 * statistics.median(samples):.1f} |")


if __name__ == "__main__":
    script_entry(main)
