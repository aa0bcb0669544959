"""Where two INT8 graphs quantize their activations differently: the scale of every INT8 MatMul's
input, set side by side.

    python benchmarks/activation_scales.py A.onnx B.onnx [--tolerance 1e-3] [--json FILE]

A and B are INT8 graphs btdeploy wrote (`model.<flavour>.int8.onnx`): two flavours of one head (trt
against trt-compat), or one graph before and after a change to the passes or the quantizer. Each
INT8 MatMul, a Q/DQ MatMul (trt, trt-compat) or ONNX Runtime's integer GEMM (ort), is named by the
int8 weight it multiplies (a weight several MatMuls read: by their order in the graph), which
every flavour of one export keeps. Scales that differ by more than the tolerance (relative; the trt
graphs store their scales in FP16, about 1e-3 apart) are listed with the operator that makes the
quantized tensor in each graph: a pass that moved a bias or a normalization across that tensor
changes its range, and so its scale, where the rest stay as calibrated.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from btdeploy.artifacts.onnx_files import load_graph
from btdeploy.cli import script_entry
from btdeploy.errors import BtDeployError

INTEGER_GEMM = "MatMulIntegerToFloat"
PASS_THROUGH = {"Cast", "QuantizeLinear", "DequantizeLinear"}  # between a tensor's maker and the INT8 MatMul


@dataclass
class QuantizedInput:
    matmul: str  # the MatMul's node name
    scale: float
    made_by: str  # the operator that makes the quantized tensor


def quantized_inputs(model: onnx.ModelProto) -> dict[tuple[str, int], QuantizedInput]:
    """(weight, k-th INT8 reader of it) -> the scale of that MatMul's activation and what makes it."""
    constants = {t.name: t for t in model.graph.initializer}
    producer = {name: node for node in model.graph.node for name in node.output}
    found: dict[tuple[str, int], QuantizedInput] = {}
    readers: Counter[str] = Counter()
    for node in model.graph.node:
        if node.op_type == INTEGER_GEMM:
            weight, scale = node.input[1], node.input[2]
            activation = producer.get(node.input[0])
        elif node.op_type == "MatMul":
            activation, weight_dq = producer.get(node.input[0]), producer.get(node.input[1])
            if not (_is(activation, "DequantizeLinear") and _is(weight_dq, "DequantizeLinear")):
                continue
            weight, scale = weight_dq.input[0], activation.input[1]  # type: ignore[union-attr]
        else:
            continue
        if weight not in constants or scale not in constants:
            continue
        key = (weight, readers[weight])
        readers[weight] += 1
        value = float(numpy_helper.to_array(constants[scale]).astype(np.float64).reshape(-1)[0])
        found[key] = QuantizedInput(node.name, value, _maker(activation, producer))
    return found


def _is(node: onnx.NodeProto | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type


def _maker(node: onnx.NodeProto | None, producer: dict[str, onnx.NodeProto]) -> str:
    while node is not None and node.op_type in PASS_THROUGH:
        node = producer.get(node.input[0])
    return "graph input" if node is None else node.op_type


def compare(a: Path, b: Path, tolerance: float) -> dict[str, Any]:
    sides = []
    for path in (a, b):
        inputs = quantized_inputs(load_graph(path, "give an INT8 graph btdeploy wrote", load_weights=False))
        if not inputs:
            raise BtDeployError(
                f"{path} holds no INT8 MatMul with a stored scale (Q/DQ or {INTEGER_GEMM}): give a "
                "model.<flavour>.int8.onnx graph (int8-dynamic graphs find their scales at run time)"
            )
        sides.append(inputs)
    first, second = sides
    shared = [key for key in first if key in second]
    rows: list[dict[str, Any]] = []
    for key in shared:
        x, y = first[key], second[key]
        ratio = y.scale / x.scale
        rows.append({
            "weight": key[0], "reader": key[1], "matmul_a": x.matmul, "matmul_b": y.matmul,
            "scale_a": x.scale, "scale_b": y.scale, "ratio": ratio,
            "made_by_a": x.made_by, "made_by_b": y.made_by, "differs": abs(ratio - 1) > tolerance,
        })  # fmt: skip
    differ = [r for r in rows if r["differs"]]
    agree = [abs(r["ratio"] - 1) for r in rows if not r["differs"]]
    return {
        "a": str(a), "b": str(b), "tolerance": tolerance,
        "int8_matmuls": [len(first), len(second)], "matched": len(shared),
        "only_in_a": len(first) - len(shared), "only_in_b": len(second) - len(shared),
        "agree": len(agree), "largest_agreeing_deviation": max(agree, default=0.0),
        "differ": len(differ),
        "differ_by_maker": dict(Counter(f"{r['made_by_a']} -> {r['made_by_b']}" for r in differ)),
        "rows": rows,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="an INT8 graph")
    parser.add_argument("b", type=Path, help="the INT8 graph to set against it")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="relative difference taken as equal")
    parser.add_argument("--json", type=Path, help="also write every MatMul's row here")
    args = parser.parse_args(argv)
    if not args.tolerance >= 0:
        raise BtDeployError(f"--tolerance {args.tolerance}: give a relative difference of 0 or more")

    report = compare(args.a, args.b, args.tolerance)
    a_count, b_count = report["int8_matmuls"]
    print(f"A: {args.a} ({a_count} INT8 MatMuls)\nB: {args.b} ({b_count} INT8 MatMuls)")
    print(
        f"matched by weight: {report['matched']} (only in A: {report['only_in_a']}, only in B: {report['only_in_b']})"
    )
    print(f"scales equal within {args.tolerance:g}: {report['agree']} "
          f"(largest difference {report['largest_agreeing_deviation']:.2e}); differ: {report['differ']}")  # fmt: skip
    for makers, count in report["differ_by_maker"].items():
        print(f"  input made by {makers}: {count}")
    differing = [r for r in report["rows"] if r["differs"]]
    if differing:
        ratios = [float(r["ratio"]) for r in differing]
        print(f"  B/A: {min(ratios):.3f} to {max(ratios):.3f}, median {float(np.median(ratios)):.3f}; "
              f"wider in B: {sum(r > 1 for r in ratios)} of {len(ratios)}")  # fmt: skip
        print(f"\n{'MatMul (A)':<64} {'scale A':>10} {'scale B':>10} {'B/A':>7}")
        for row in differing:
            print(f"{row['matmul_a'][-64:]:<64} {row['scale_a']:>10.3e} {row['scale_b']:>10.3e} {row['ratio']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    script_entry(main)
