"""The ort flavour's INT8 graph with ONNX Runtime's integer GEMMs written in (bias folded in, as
btdeploy writes it) against the same graph as Q/DQ (what ONNX Runtime fuses itself at load, the
bias Adds left apart): one interleaved run, same session options, same inputs.

    python benchmarks/integer_matmul_bias.py DIR [--head itm] [--shapes 1x16,4x40] [--rounds 10]

The Q/DQ form is made in memory by btdeploy's own pass (optimize/passes/integer_matmul.py, the
raise that the trt flavours use), so the two graphs differ in that form only. Prints per shape
the median of each and the ratio, and the largest difference between their outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from btdeploy.artifacts.graph_names import Flavour, Precision
from btdeploy.artifacts.onnx_files import load_graph
from btdeploy.backends.onnxruntime import session_options
from btdeploy.model.inputs import sample_inputs
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.integer_matmul import INTEGER_MATMULS
from btdeploy.runtime.runtime import find_head


def _sessions(path: Path, threads: int) -> dict[str, ort.InferenceSession]:
    integer = load_graph(path, "quantize it again: btdeploy quantize --flavour ort --precision int8")
    qdq = Graph(onnx.ModelProto.FromString(integer.SerializeToString()))
    raised = INTEGER_MATMULS.run(qdq, Flavour.TRT)  # Q/DQ again, still in ONNX Runtime's uint8 code
    print(f"{path.name}: {raised.fused} integer MatMuls, {raised.details['biases_unfolded']} with their bias",
          file=sys.stderr)  # fmt: skip
    options = session_options(threads)
    return {
        "integer GEMM + bias (btdeploy)": ort.InferenceSession(integer.SerializeToString(), options,
                                                               providers=["CPUExecutionProvider"]),
        "Q/DQ (ONNX Runtime fuses)": ort.InferenceSession(qdq.model.SerializeToString(), options,
                                                          providers=["CPUExecutionProvider"]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--head", default="itm")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="0: every core")
    args = parser.parse_args()
    head = find_head(args.export, args.head)
    path = head.graph_path(Flavour.ORT, Precision.INT8)
    sessions = _sessions(path, args.threads)
    print(f"{path}, {args.rounds} interleaved rounds after one warm-up, median ms")
    print("| batch x length | " + " | ".join(sessions) + " | ratio | max abs difference |")
    print("|---|" + "---:|" * (len(sessions) + 2))
    for shape in args.shapes.split(","):
        batch, length = (int(part) for part in shape.split("x"))
        feeds = sample_inputs(head.config, batch, length, pad=False)
        outputs = {name: s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()}) for name, s in sessions.items()}
        first, second = outputs.values()
        worst = max(float(np.abs(a - b).max()) for a, b in zip(first, second, strict=True))
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for round_index in range(args.rounds):
            for name, session in sessions.items():
                inputs = {i.name: feeds[i.name] for i in session.get_inputs()}
                started = time.perf_counter()
                session.run(None, inputs)
                times[name].append(1e3 * (time.perf_counter() - started))
            print(f"{shape}: round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        medians = [statistics.median(values) for values in times.values()]
        cells = " | ".join(f"{m:.1f}" for m in medians)
        print(f"| {batch} x {length} | {cells} | {medians[1] / medians[0]:.2f}x | {worst:.2e} |")


if __name__ == "__main__":
    main()
