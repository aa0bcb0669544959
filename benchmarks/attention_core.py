"""One attention block at base's image shape (325 tokens, 768 wide, 12 heads) on ONNX Runtime's CPU
provider: the kernels btdeploy's graphs can use, INT8 in the attention core, and OpenVINO on the
same block.

    python benchmarks/attention_core.py [--batch 1] [--tokens 325] [--threads 2] [--runs 30]

- `Attention` (ONNX, opset 23) in FP32: what the ort and trt graphs hold;
- `com.microsoft.MultiHeadAttention` in FP32: ONNX Runtime's own;
- `Attention` in FP16: ONNX Runtime's CPU kernel for it (what a trt.int8 graph ran on before
  backends/cpu_fp16.py);
- INT8 core: Q.K^T and P.V as MatMulIntegerToFloat on dynamically quantized uint8 operands (P on
  the fixed step 1/255), softmax in FP32; and INT8 Q.K^T with P.V in FP32 (no coarse step on P).
  Their error is measured against the FP32 block on the same inputs, once with N(0, 1) queries
  (flat attention) and once with queries x4 (peaked attention);
- OpenVINO (f32 inference precision, the bench's settings) on the FP32 `Attention` block: the
  peer's attention kernel on the same graph, where the peers extra is installed.

Every form is timed in the same interleaved rounds (FP16 in the first 3 only, it is slow) and the
median printed, with its ratio to ONNX Runtime's FP32 `Attention`; times compare within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from btdeploy.backends.onnxruntime import session_options
from btdeploy.backends.openvino import compile_on_cpu, compile_settings, import_openvino, openvino_problem
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages

TOKENS, WIDTH, HEADS = 325, 768, 12


Run = Callable[[dict[str, np.ndarray]], np.ndarray]  # feeds -> the block's output


def _block(nodes: list[Any], dtype: int, initializers: list[Any] | None = None) -> bytes:
    shape: list[str | int] = ["batch", "tokens", WIDTH]
    inputs = [helper.make_tensor_value_info(n, dtype, shape) for n in ("q", "k", "v")]
    graph = helper.make_graph(
        nodes, "block", inputs, [helper.make_tensor_value_info("o", dtype, shape)], initializer=initializers or []
    )
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def _session(nodes: list[Any], dtype: int, threads: int, initializers: list[Any] | None = None) -> Run:
    options = session_options(threads)
    session = ort.InferenceSession(_block(nodes, dtype, initializers), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def _openvino(nodes: list[Any], threads: int) -> Run:
    core = import_openvino().Core()
    with tempfile.TemporaryDirectory() as folder:  # OpenVINO reads ONNX from a file
        path = Path(folder) / "block.onnx"
        path.write_bytes(_block(nodes, TensorProto.FLOAT))
        compiled = compile_on_cpu(core, core.read_model(str(path)), compile_settings(threads))
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)[0]


def _integer_matmul(left: str, right: str, left_step: str, out: str) -> Any:
    """MatMulIntegerToFloat of two uint8 operands named `<x>8`, with their `<x>_zero` zero points."""
    inputs = [f"{left}8", f"{right}8", left_step, f"{right}_step", f"{left}_zero", f"{right}_zero"]
    return helper.make_node("MatMulIntegerToFloat", inputs, [out], domain="com.microsoft")


def _int8_core_nodes(int8_values: bool = True) -> tuple[list[Any], list[Any]]:
    """Q.K^T on uint8 operands; P.V on uint8 too, or in FP32 when `int8_values` is False."""
    head = WIDTH // HEADS
    initializers = [
        helper.make_tensor("heads", TensorProto.INT64, [4], [0, -1, HEADS, head]),  # 0: the batch as it comes
        helper.make_tensor("merged", TensorProto.INT64, [3], [0, -1, WIDTH]),
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


def _interleaved_ms(forms: dict[str, tuple[Run, dict[str, np.ndarray], int]], runs: int) -> dict[str, float]:
    """Median ms of each form, all timed in the same rounds (a form with fewer runs in the first ones)."""
    times: dict[str, list[float]] = {name: [] for name in forms}
    for run, feeds, _ in forms.values():
        run(feeds)  # warm-up, excluded
    for round_index in range(runs):
        for name, (run, feeds, form_runs) in forms.items():
            if round_index < form_runs:
                started = time.perf_counter()
                run(feeds)
                times[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="images in the block's batch (default 1)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help=f"tokens per row (default {TOKENS}, base's image)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    for name in ("batch", "tokens", "threads", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    attention = [helper.make_node("Attention", ["q", "k", "v"], ["o"], q_num_heads=HEADS, kv_num_heads=HEADS)]
    mha = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=HEADS)]
    int8_nodes, int8_initializers = _int8_core_nodes()
    scores_nodes, scores_initializers = _int8_core_nodes(int8_values=False)
    fp32 = _session(attention, TensorProto.FLOAT, args.threads)
    forms: dict[str, tuple[Run, type[np.floating], int]] = {
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
    peer_problem = openvino_problem()
    if peer_problem is None:
        forms["OpenVINO Attention FP32"] = (_openvino(attention, args.threads), np.float32, args.runs)
    rng = np.random.default_rng(0)
    base = {n: rng.standard_normal((args.batch, args.tokens, WIDTH)).astype(np.float32) for n in "qkv"}
    shape = f"{args.batch} x {args.tokens} x {WIDTH}"
    print(f"one attention block, {shape}, {HEADS} heads, {args.threads} thread(s), {args.runs} interleaved rounds")
    cast = {name: {n: value.astype(dtype) for n, value in base.items()} for name, (_, dtype, _) in forms.items()}
    medians = _interleaved_ms({name: (run, cast[name], runs) for name, (run, _, runs) in forms.items()}, args.runs)
    for name, (run, _, _) in forms.items():
        line = f"  {name:<30} {medians[name]:9.3f} ms  {medians[name] / medians['Attention FP32']:5.2f}x"
        if name.startswith("INT8") or name.startswith("OpenVINO"):
            for label, query_scale in (("flat", 1.0), ("peaked", 4.0)):
                feeds = {**base, "q": base["q"] * query_scale}
                want, got = fp32(feeds).ravel(), run(feeds).ravel()
                cosine = float(want @ got / np.linalg.norm(want) / np.linalg.norm(got))
                line += f"; {label}: max_abs {np.abs(got - want).max():.3g} of range {np.abs(want).max():.3g}, "
                line += f"cosine {cosine:.5f}"
        print(line)
    if peer_problem is not None:
        print(f"  OpenVINO Attention FP32: not timed ({peer_problem})")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
