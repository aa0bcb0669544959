"""One attention block at base's image shape (325 tokens, 768 wide, 12 heads) on ONNX Runtime's CPU
provider: the kernels btdeploy's graphs can use, and INT8 in the attention core.

    python benchmarks/attention_core.py [--threads 2] [--runs 30]

- `Attention` (ONNX, opset 23) in FP32: what the ort and trt graphs hold;
- `com.microsoft.MultiHeadAttention` in FP32: ONNX Runtime's own;
- `Attention` in FP16: ONNX Runtime's CPU kernel for it (what a trt.int8 graph ran on before
  backends/cpu_fp16.py);
- INT8 core: Q.K^T and P.V as MatMulIntegerToFloat on dynamically quantized uint8 operands (P on
  the fixed step 1/255), softmax in FP32; and INT8 Q.K^T with P.V in FP32 (no coarse step on P).
  Their error is measured against the FP32 block on the same inputs, once with N(0, 1) queries
  (flat attention) and once with queries x4 (peaked attention).

Prints the median per block and the error; times compare within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from btdeploy.backends.onnxruntime import session_options
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages

TOKENS, WIDTH, HEADS = 325, 768, 12


def _session(nodes: list[Any], dtype: int, threads: int, initializers: list[Any] | None = None) -> Any:
    shape = [1, TOKENS, WIDTH]
    inputs = [helper.make_tensor_value_info(n, dtype, shape) for n in ("q", "k", "v")]
    graph = helper.make_graph(
        nodes, "block", inputs, [helper.make_tensor_value_info("o", dtype, shape)], initializer=initializers or []
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    options = session_options(threads)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _integer_matmul(left: str, right: str, left_step: str, out: str) -> Any:
    """MatMulIntegerToFloat of two uint8 operands named `<x>8`, with their `<x>_zero` zero points."""
    inputs = [f"{left}8", f"{right}8", left_step, f"{right}_step", f"{left}_zero", f"{right}_zero"]
    return helper.make_node("MatMulIntegerToFloat", inputs, [out], domain="com.microsoft")


def _int8_core_nodes(int8_values: bool = True) -> tuple[list[Any], list[Any]]:
    """Q.K^T on uint8 operands; P.V on uint8 too, or in FP32 when `int8_values` is False."""
    head = WIDTH // HEADS
    initializers = [
        helper.make_tensor("heads", TensorProto.INT64, [4], [1, -1, HEADS, head]),
        helper.make_tensor("merged", TensorProto.INT64, [3], [1, -1, WIDTH]),
        helper.make_tensor("p_step", TensorProto.FLOAT, [], [1 / 255]),
        helper.make_tensor("p_zero", TensorProto.UINT8, [], [0]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(head)]),
    ]
    nodes = [
        helper.make_node("Reshape", ["q", "heads"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["k", "heads"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["v", "heads"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("DynamicQuantizeLinear", ["qt"], ["q8", "q_step", "q_zero"]),
        helper.make_node("DynamicQuantizeLinear", ["kt"], ["k8", "k_step", "k_zero"]),
        helper.make_node("Mul", ["q_step", "scale"], ["qk_step"]),
        _integer_matmul("q", "k", "qk_step", "logits"),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
    ]
    if int8_values:
        nodes += [
            helper.make_node("QuantizeLinear", ["p", "p_step", "p_zero"], ["p8"]),
            helper.make_node("DynamicQuantizeLinear", ["vt"], ["v8", "v_step", "v_zero"]),
            _integer_matmul("p", "v", "p_step", "ot"),
        ]
    else:
        nodes.append(helper.make_node("MatMul", ["p", "vt"], ["ot"]))
    nodes += [
        helper.make_node("Transpose", ["ot"], ["o4"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o4", "merged"], ["o"]),
    ]
    return nodes, initializers


def _median_ms(session: Any, feeds: dict[str, np.ndarray], runs: int) -> float:
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    attention = [helper.make_node("Attention", ["q", "k", "v"], ["o"], q_num_heads=HEADS, kv_num_heads=HEADS)]
    mha = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=HEADS)]
    int8_nodes, int8_initializers = _int8_core_nodes()
    scores_nodes, scores_initializers = _int8_core_nodes(int8_values=False)
    fp32 = _session(attention, TensorProto.FLOAT, args.threads)
    sessions = {
        "Attention FP32": (fp32, np.float32, args.runs),
        "MultiHeadAttention FP32": (_session(mha, TensorProto.FLOAT, args.threads), np.float32, args.runs),
        "Attention FP16 (CPU kernel)": (_session(attention, TensorProto.FLOAT16, args.threads), np.float16, 3),
        "INT8 core": (_session(int8_nodes, TensorProto.FLOAT, args.threads, int8_initializers), np.float32, args.runs),
        "INT8 Q.K^T, FP32 P.V": (
            _session(scores_nodes, TensorProto.FLOAT, args.threads, scores_initializers),
            np.float32,
            args.runs,
        ),
    }
    rng = np.random.default_rng(0)
    base = {n: rng.standard_normal((1, TOKENS, WIDTH)).astype(np.float32) for n in "qkv"}
    print(f"one attention block, 1 x {TOKENS} x {WIDTH}, {HEADS} heads, {args.threads} thread(s), CPU provider")
    for name, (session, dtype, runs) in sessions.items():
        cast = {n: value.astype(dtype) for n, value in base.items()}
        line = f"  {name:<30} {_median_ms(session, cast, runs):9.3f} ms"
        if name.startswith("INT8"):
            for label, query_scale in (("flat", 1.0), ("peaked", 4.0)):
                feeds = {**base, "q": base["q"] * query_scale}
                want, got = fp32.run(None, feeds)[0].ravel(), session.run(None, feeds)[0].ravel()
                cosine = float(want @ got / np.linalg.norm(want) / np.linalg.norm(got))
                line += f"; {label}: max_abs {np.abs(got - want).max():.3g} of range {np.abs(want).max():.3g}, "
                line += f"cosine {cosine:.5f}"
        print(line)


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
