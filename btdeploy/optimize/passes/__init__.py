"""Graph passes, run in order, each counting what it fused; one file per pass."""

from __future__ import annotations

import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.weightless import weightless_copy, with_structure_of
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.attention import ATTENTION
from btdeploy.optimize.passes.base import GraphPass, PassResult
from btdeploy.optimize.passes.cleanup import CLEANUP
from btdeploy.optimize.passes.cls_rows import CLS_ROWS
from btdeploy.optimize.passes.gelu import GELU
from btdeploy.optimize.passes.layernorm import BRIDGE_LAYERNORM, RESIDUAL_LAYERNORM
from btdeploy.optimize.passes.no_op_casts import NO_OP_CASTS
from btdeploy.optimize.passes.shared_weights import SHARED_WEIGHTS
from btdeploy.optimize.passes.weight_layouts import WEIGHT_LAYOUTS

# Order matters: weight layouts and shared weights first (every other pass finds weights and
# biases as constants only), then no-op casts (a Cast between two nodes hides their pattern from
# the fusions), [CLS]-only rows next (it rewrites the canonical pattern, which the attention
# pass then fuses), attention next (it reads the raw bias Adds of the Q/K/V projections),
# then the Add+LayerNorm pairs (which fold the remaining dense biases), then GELU (which
# folds the FFN's first bias), then cleanup of whatever lost its last user.
PASSES: tuple[GraphPass, ...] = (
    WEIGHT_LAYOUTS,
    SHARED_WEIGHTS,
    NO_OP_CASTS,
    CLS_ROWS,
    ATTENTION,
    BRIDGE_LAYERNORM,
    RESIDUAL_LAYERNORM,
    GELU,
    CLEANUP,
)

# The least opset of an export the passes take: the bridge and residual passes fuse ONNX
# LayerNormalization, which opset 17 introduced (below it the exporter writes LayerNorm out as
# ReduceMean, Sub, Pow, Sqrt, Div, which no pass matches).
LEAST_SOURCE_OPSET = 17

# The opset each flavour's graphs are written in: ort and trt use the ONNX Attention operator
# (opset 23); trt-compat keeps the export's opset (17, at most 20 for TensorRT 10.3's parser).
FLAVOUR_OPSET: dict[Flavour, int | None] = {Flavour.ORT: 23, Flavour.TRT: 23, Flavour.TRT_COMPAT: None}


def optimize_graph(model: onnx.ModelProto, flavour: Flavour) -> tuple[onnx.ModelProto, dict[str, PassResult]]:
    """Every pass in order; the results keyed by pass name."""
    opset = FLAVOUR_OPSET[flavour]
    if opset is not None:
        model = convert_opset(model, opset)
    graph = Graph(model)
    results = {graph_pass.name: graph_pass.run(graph, flavour) for graph_pass in PASSES}
    graph.toposort()
    return graph.model, results


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """ONNX's version converter without the weights: it copies the whole model through C++ twice
    (on base, 1.3 GB of weights became a 10 GB peak). Upgrading an opset rewrites operators and
    their attributes, never a stored weight, so it runs on a weightless copy and `model` takes the
    converted graph's structure, its weights staying where they are."""
    from onnx import version_converter

    return with_structure_of(model, version_converter.convert_version(weightless_copy(model), opset))


__all__ = ["LEAST_SOURCE_OPSET", "PASSES", "GraphPass", "PassResult", "optimize_graph"]
