"""A graph with every GELU taken out: how much faster it could be if its GELU passes cost nothing.

    python benchmarks/gelu_ceiling.py DIR/itm/model.ort.int8.onnx /tmp/no_gelu.onnx
    python benchmarks/graph_ab.py DIR/itm/model.ort.int8.onnx /tmp/no_gelu.onnx --head-dir DIR/itm

OpenVINO folds each GELU into the GEMM before it; ONNX Runtime's CPU provider runs it as a pass of
its own, and nothing in its operator set folds it. Here each GELU and QuickGELU (fused, or as
exported) is replaced by its input, so its consumers read the pre-activation: the outputs are wrong,
every other kernel and shape is the same. Timed against the original with graph_ab.py, the ratio is
the ceiling of any faster GELU kernel or GELU-in-GEMM fusion. Prints what it took out.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import onnx

from btdeploy.artifacts.onnx_files import load_graph, save_graph_atomically
from btdeploy.cli import script_entry
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.gelu import every_gelu


def _kind(nodes: list[onnx.NodeProto]) -> str:
    if len(nodes) == 1:
        return nodes[0].op_type
    for op_type, kind in (("Erf", "Erf chain"), ("Tanh", "tanh chain")):
        if any(n.op_type == op_type for n in nodes):
            return kind
    return "QuickGELU chain"


def without_gelus(model: onnx.ModelProto) -> Counter[str]:
    """Take every GELU out of `model` in place; how many of each kind."""
    graph = Graph(model)
    found = every_gelu(graph)
    source_of = {output: x for x, _, output in found}
    graph.replace([n for _, nodes, _ in found for n in nodes], [])
    for node in graph.graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = source_of.get(name, name)
    graph.remove_dead()  # a BiasGelu's bias
    return Counter(_kind(nodes) for _, nodes, _ in found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path, help="an optimized or quantized graph of one head")
    parser.add_argument("out", type=Path, help="where to write the graph without GELUs")
    args = parser.parse_args()
    model = load_graph(args.graph, "give an optimized graph of an exported head")
    removed = without_gelus(model)
    save_graph_atomically(model, args.out)
    kinds = ", ".join(f"{count} {kind}" for kind, count in removed.items())
    print(f"{args.out}: took out {sum(removed.values())} GELUs ({kinds})")


if __name__ == "__main__":
    script_entry(main)
