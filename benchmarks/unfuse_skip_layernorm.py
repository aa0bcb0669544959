"""A graph with every SkipLayerNormalization written back as ONNX's Add + LayerNormalization.

    python benchmarks/unfuse_skip_layernorm.py DIR/itm/model.ort.int8-dynamic.onnx /tmp/unfused.onnx
    python benchmarks/graph_ab.py DIR/itm/model.ort.int8-dynamic.onnx /tmp/unfused.onnx --head-dir DIR/itm

btdeploy's ort flavour holds every residual and bridge Add + LayerNorm pair as one
com.microsoft.SkipLayerNormalization (optimize/passes/layernorm.py). Its CPU kernel took 5x longer
from ONNX Runtime 1.30.0 on (base-peers-cpu, twenty-seventh look); this writes each one back as the
pair it replaced (input + skip, + its bias where it has one, then LayerNormalization; its sum
output, where a later residual reads it, from the last Add), the same arithmetic in two standard
kernels (optimize/passes/layernorm.py's `split_skip_layernorm`, which also writes the trt INT8
graphs' pairs back). Timed against the original with graph_ab.py under each ONNX Runtime release
(run the script with that venv's python), the ratio says which form the release runs faster.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from btdeploy.artifacts.onnx_files import load_graph, save_graph_atomically
from btdeploy.cli import script_entry
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.layernorm import is_skip_layernorm, split_skip_layernorm


def unfused(model: onnx.ModelProto) -> int:
    """Write every SkipLayerNormalization of `model` back as its pair, in place; how many."""
    graph = Graph(model)
    found = [n for n in graph.graph.node if is_skip_layernorm(n)]
    for fused in found:
        split_skip_layernorm(graph, fused)  # refuses one whose mean or inverse deviation is read
    return len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph", type=Path, help="an ort-flavour graph of one head (optimized or quantized)")
    parser.add_argument("out", type=Path, help="where to write the graph with the pairs unfused")
    args = parser.parse_args()
    model = load_graph(args.graph, "give an optimized graph of an exported head")
    count = unfused(model)
    if not count:
        raise BtDeployError(f"{args.graph} holds no SkipLayerNormalization: give an ort-flavour graph")
    save_graph_atomically(model, args.out)
    print(f"{args.out}: {count} SkipLayerNormalization written back as Add + LayerNormalization")


if __name__ == "__main__":
    script_entry(main)
