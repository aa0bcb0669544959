"""The ort flavour's INT8 graph with ONNX Runtime's integer GEMMs written in (bias folded in, as
btdeploy writes it) against the same graph as Q/DQ (what ONNX Runtime fuses itself at load, the
bias Adds left apart), timed by benchmarks/graph_ab.py: each graph alone in its own process, the
processes alternating.

    python benchmarks/integer_matmul_bias.py DIR [--head itm] [--shapes 1x16,4x40] [--repeats 8] [--runs 8]

The Q/DQ form is made by btdeploy's own pass (optimize/passes/integer_matmul.py, the raise that
the trt flavours use) and written to a temporary folder, so the two graphs differ in that form
only. Prints graph_ab's table: A is the Q/DQ form, B btdeploy's; A / B above 1 means btdeploy's
form is faster.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from btdeploy.artifacts.graph_names import Flavour, Precision
from btdeploy.artifacts.onnx_files import load_graph
from btdeploy.cli import script_entry
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.integer_matmul import INTEGER_MATMULS
from btdeploy.runtime.runtime import find_head


def write_qdq_form(path: Path, out: Path) -> None:
    graph = Graph(load_graph(path, "quantize it again: btdeploy quantize --flavour ort --precision int8"))
    raised = INTEGER_MATMULS.run(graph, Flavour.TRT)  # Q/DQ again, still in ONNX Runtime's uint8 code
    print(f"{path.name}: {raised.fused} integer MatMuls, {raised.details['biases_unfolded']} with their bias",
          file=sys.stderr)  # fmt: skip
    onnx.save(graph.model, str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--head", default="itm")
    parser.add_argument("--shapes", default="1x16,4x40", help="batch x text length, comma list")
    parser.add_argument("--repeats", type=int, default=8, help="processes per graph")
    parser.add_argument("--runs", type=int, default=8, help="timed runs per shape in each process")
    args = parser.parse_args()
    head = find_head(args.export, args.head)
    path = head.graph_path(Flavour.ORT, Precision.INT8)
    with tempfile.TemporaryDirectory() as scratch:
        qdq = Path(scratch) / "model.ort.int8.qdq.onnx"
        write_qdq_form(path, qdq)
        graph_ab = Path(__file__).with_name("graph_ab.py")
        command = [sys.executable, str(graph_ab), str(qdq), str(path), "--head-dir", str(head.folder)]
        timing = ["--shapes", args.shapes, "--repeats", str(args.repeats), "--runs", str(args.runs)]
        subprocess.run([*command, *timing], check=True)


if __name__ == "__main__":
    script_entry(main)
