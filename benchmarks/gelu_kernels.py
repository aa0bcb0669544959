"""The GELU kernels of ONNX Runtime's CPU provider against the cheapest element-wise pass, at the
size of one base FFN activation: how much a faster GELU could take off the ort graphs at most.

    python benchmarks/gelu_kernels.py [--shape 4x325x3072] [--threads 2] [--rounds 15]

OpenVINO folds each GELU into the GEMM before it; ONNX Runtime runs it as a pass of its own over
the FFN activation (`com.microsoft.Gelu` for the erf GELU, `QuickGelu` for CLIP's). Every kernel
below is one such pass over the same tensor, timed in turns round by round. `Sigmoid` is the
cheapest unary pass ONNX Runtime has, so "GELU minus Sigmoid" is the most any GELU kernel could
save per element; the approximations are listed with their largest error against the exact GELU
(computed in float64 by torch), which is why btdeploy does not write them in place of it.
Prints the median per kernel, ns per element, and the error; times compare within one run only.
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
import torch
from onnx import TensorProto, helper

from btdeploy.backends.onnxruntime import session_options
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages


def _session(node: Any, shape: list[int], threads: int, initializers: list[Any]) -> Any:
    tensor = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in ("x", "y")]
    graph = helper.make_graph([node], "pass", [tensor[0]], [tensor[1]], initializer=initializers)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def kernels() -> dict[str, tuple[Any, list[Any], bool]]:
    """name -> (node, initializers, whether it computes GELU and so gets an error against it)."""
    ms = "com.microsoft"
    three_halves = helper.make_tensor("a", TensorProto.FLOAT, [], [1.5])
    return {
        "Sigmoid (cheapest unary pass)": (helper.make_node("Sigmoid", ["x"], ["y"]), [], False),
        "Mul by a scalar": (helper.make_node("Mul", ["x", "a"], ["y"]), [three_halves], False),
        "Erf alone": (helper.make_node("Erf", ["x"], ["y"]), [], False),
        "com.microsoft.Gelu (what the ort graphs hold)": (helper.make_node("Gelu", ["x"], ["y"], domain=ms), [], True),
        "Gelu, ONNX opset 20": (helper.make_node("Gelu", ["x"], ["y"]), [], True),
        "com.microsoft.QuickGelu (CLIP's GELU)": (
            helper.make_node("QuickGelu", ["x"], ["y"], domain=ms, alpha=1.702),
            [],
            False,
        ),
        "Gelu tanh approximation, ONNX": (helper.make_node("Gelu", ["x"], ["y"], approximate="tanh"), [], True),
        "com.microsoft.FastGelu (tanh approximation)": (
            helper.make_node("FastGelu", ["x"], ["y"], domain=ms),
            [],
            True,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4x325x3072", help="the activation: batch x tokens x FFN width")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    shape = [int(part) for part in args.shape.split("x")]
    x = (np.random.default_rng(0).standard_normal(shape) * 2).astype(np.float32)
    exact = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    built = kernels().items()
    sessions = {name: (_session(node, shape, args.threads, inits), gelu) for name, (node, inits, gelu) in built}
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(args.rounds):
        for name, (session, _) in sessions.items():
            start = time.perf_counter()
            session.run(None, {"x": x})
            seconds[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
    print(f"one pass over {args.shape} float32 ({x.size / 1e6:.1f} M elements), {args.threads} thread(s), CPU provider")
    print("| kernel | median ms | ns per element | largest error against exact GELU |\n|---|---:|---:|---:|")
    for name, (session, gelu) in sessions.items():
        median = statistics.median(seconds[name][2:])  # the first two rounds warm the arena
        error = f"{float(np.abs(session.run(None, {'x': x})[0] - exact).max()):.2e}" if gelu else ""
        print(f"| {name} | {1e3 * median:.3f} | {1e9 * median / x.size:.2f} | {error} |")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
