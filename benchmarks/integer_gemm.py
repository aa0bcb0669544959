"""One INT8 weight GEMM of base at a time, ONNX Runtime against OpenVINO: the kernels themselves.

    python benchmarks/integer_gemm.py [--rows 325,1300] [--rounds 20] [--threads 2]

Each case is one dense layer of base (768 -> 768 for Q/K/V and the output projections, 768 -> 3072
and 3072 -> 768 for the FFN, the first also with its GELU) on `rows` tokens (325: one image,
1300: four), with the forms the INT8 graphs hold:

- ort: QuantizeLinear -> com.microsoft.MatMulIntegerToFloat with the bias inside (the ort INT8
  graph's form, passes/integer_matmul.py), then com.microsoft.Gelu where the case has one; and the
  integer GEMM alone on an already quantized input;
- openvino: the standard Q/DQ form (QuantizeLinear -> DequantizeLinear -> MatMul with a
  DequantizeLinear'd int8 weight -> Add bias [-> Gelu]), what OpenVINO reads from the trt INT8 graph,
  at f32 inference precision; and its GEMM kernel's own time from its profiling counters (in a
  whole graph OpenVINO folds the input's quantization into the operator that writes it).

Weights are int8 with per-column scales, activations 8-bit with one scale (uint8 for ONNX Runtime,
int8 for OpenVINO), as in btdeploy's graphs. Every case runs in interleaved rounds; prints the
median ms, the multiply-adds per second, and OpenVINO's time over ONNX Runtime's for the same work
(above 1: ONNX Runtime is faster). Times compare within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper

from btdeploy.backends.onnxruntime import session_options
from btdeploy.backends.openvino import compile_on_cpu, compile_settings, import_openvino
from btdeploy.bench.runner import interleaved_order
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages

# (name, K, N, with GELU): base's dense layers.
LAYERS = (("Q/K/V, output 768x768", 768, 768, False), ("FFN in 768x3072", 768, 3072, False),
          ("FFN in + GELU", 768, 3072, True), ("FFN out 3072x768", 3072, 768, False))  # fmt: skip
ENGINES = ("ort", "ort GEMM alone", "openvino", "openvino GEMM kernel")
COMPARED = {"openvino": "ort", "openvino GEMM kernel": "ort GEMM alone"}  # the ratio's two sides
INPUT_STEP, ORT_ZERO = 0.02, 128  # ort graphs quantize activations to uint8; trt graphs to int8, zero point 0


def _dense_model(nodes: list[Any], k: int, n: int, seed: int, source: int, activation_zero: np.ndarray) -> ModelProto:
    """One dense layer y = x W + b on `rows` tokens: int8 weights with per-column steps, as calibrated."""
    rng = np.random.default_rng(seed)
    initializers = [
        numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w"),
        numpy_helper.from_array((rng.random(n) * 0.01 + 0.001).astype(np.float32), "w_step"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array(INPUT_STEP, np.float32), "x_step"),
        numpy_helper.from_array(activation_zero, "x_zero"),
    ]
    source_name = "x" if source == TensorProto.FLOAT else "x8"
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info(source_name, source, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def ort_model(k: int, n: int, gelu: bool, seed: int, quantized_input: bool = False) -> ModelProto:
    """The ort INT8 graph's form: [QuantizeLinear ->] MatMulIntegerToFloat with the bias [-> Gelu]."""
    gemm_inputs = ["x8", "w", "x_step", "w_step", "x_zero", "w_zero", "bias"]
    nodes = [helper.make_node("MatMulIntegerToFloat", gemm_inputs, ["pre" if gelu else "y"], domain="com.microsoft")]
    if not quantized_input:
        nodes.insert(0, helper.make_node("QuantizeLinear", ["x", "x_step", "x_zero"], ["x8"]))
    if gelu:
        nodes.append(helper.make_node("Gelu", ["pre"], ["y"], domain="com.microsoft"))
    source = TensorProto.UINT8 if quantized_input else TensorProto.FLOAT
    return _dense_model(nodes, k, n, seed, source, np.array(ORT_ZERO, np.uint8))


def qdq_model(k: int, n: int, gelu: bool, seed: int) -> ModelProto:
    """The trt INT8 graph's standard Q/DQ form, which OpenVINO reads."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_step", "x_zero"], ["x8"]),
        helper.make_node("DequantizeLinear", ["x8", "x_step", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["w", "w_step", "w_zero"], ["wq"], axis=1),
        helper.make_node("MatMul", ["xq", "wq"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["pre" if gelu else "y"]),
    ]
    if gelu:
        nodes.append(helper.make_node("Gelu", ["pre"], ["y"]))
    return _dense_model(nodes, k, n, seed, TensorProto.FLOAT, np.array(0, np.int8))


Feeds = dict[str, np.ndarray]
Timer = Callable[[int], float]  # runs the case n times, returns ms per call


def _wall_clock(run: Callable[[], object]) -> Timer:
    def timer(calls: int) -> float:
        run()
        started = time.perf_counter()
        for _ in range(calls):
            run()
        return (time.perf_counter() - started) / calls * 1e3

    return timer


def ort_session(model: ModelProto, threads: int) -> Callable[[Feeds], np.ndarray]:
    options = session_options(threads)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)[0]


def openvino_request(model: ModelProto, threads: int, profile: bool = False) -> Any:
    core = import_openvino().Core()
    settings = compile_settings(threads, profile)
    return compile_on_cpu(core, core.read_model(model.SerializeToString(), b""), settings).create_infer_request()


def openvino_run(request: Any, feeds: Feeds) -> np.ndarray:
    # Shared buffers: no copies of the input and output around the call, which ONNX Runtime's run does not make.
    return request.infer(feeds, share_inputs=True, share_outputs=True)[0]


def openvino_gemm_kernel(request: Any, feeds: Feeds) -> Timer:
    """OpenVINO's own counter for its GEMM kernel (FullyConnected*), without the FakeQuantize pass
    before it, which in a whole graph it folds into the operator that writes the input."""

    def timer(calls: int) -> float:
        kernel_ms = []
        for _ in range(calls + 1):
            openvino_run(request, feeds)
            kernel_ms.append(sum(
                info.real_time.total_seconds() * 1e3
                for info in request.get_profiling_info()
                if info.node_type.startswith("FullyConnected")
            ))  # fmt: skip
        return statistics.fmean(kernel_ms[1:])

    return timer


def _rate_text(gmacs: float) -> str:
    """Three significant digits: a few rows on a slow machine run below 1 GMAC/s, which `:.0f` printed as 0."""
    return f"{gmacs:.0f}" if gmacs >= 100 else f"{gmacs:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="325,1300", help="comma list of token counts (325: one image)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5, help="calls timed together in each round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]

    rng = np.random.default_rng(0)
    cases: dict[tuple[int, str, str], Timer] = {}
    for m in rows:
        for seed, (layer, k, n, gelu) in enumerate(LAYERS):
            x = rng.standard_normal((m, k)).astype(np.float32)
            x8 = np.clip(np.round(x / INPUT_STEP) + ORT_ZERO, 0, 255).astype(np.uint8)
            ours = ort_session(ort_model(k, n, gelu, seed), args.threads)
            request = openvino_request(qdq_model(k, n, gelu, seed), args.threads)
            want, got = ours({"x": x}), openvino_run(request, {"x": x})
            error = float(np.abs(want - got).max() / np.abs(want).max())
            if error > 1e-3:  # both engines must compute the same layer
                raise SystemExit(f"{layer} at {m} rows: the engines disagree (max error {error:.2g} of range)")
            cases[(m, layer, "ort")] = _wall_clock(partial(ours, {"x": x}))
            cases[(m, layer, "openvino")] = _wall_clock(partial(openvino_run, request, {"x": x}))
            if not gelu:
                alone = ort_session(ort_model(k, n, gelu, seed, quantized_input=True), args.threads)
                cases[(m, layer, "ort GEMM alone")] = _wall_clock(partial(alone, {"x8": x8}))
                profiled = openvino_request(qdq_model(k, n, gelu, seed), args.threads, profile=True)
                cases[(m, layer, "openvino GEMM kernel")] = openvino_gemm_kernel(profiled, {"x": x})

    times: dict[tuple[int, str, str], list[float]] = {key: [] for key in cases}
    keys = list(cases)
    for index in range(args.rounds):
        print(f"round {index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for key in interleaved_order(keys, index):
            times[key].append(cases[key](args.calls))

    print(f"one dense layer of base, {args.threads} thread(s), median of {args.rounds} rounds x {args.calls} calls\n")
    print("| rows | layer | engine | ms | GMAC/s | openvino / ort |")
    print("|---:|---|---|---:|---:|---:|")
    for m in rows:
        for layer, k, n, _ in LAYERS:
            medians = {
                engine: statistics.median(times[(m, layer, engine)])
                for engine in ENGINES
                if (m, layer, engine) in times
            }
            for engine, ms in medians.items():
                baseline = COMPARED.get(engine)
                ratio = f"{ms / medians[baseline]:.2f}" if baseline else ""
                print(f"| {m} | {layer} | {engine} | {ms:.3f} | {_rate_text(m * k * n / ms / 1e6)} | {ratio} |")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
