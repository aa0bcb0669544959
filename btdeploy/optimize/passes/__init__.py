"""Graph passes, run in order, each counting what it fused; one file per pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx

from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.attention import fuse_attention
from btdeploy.optimize.passes.base import FLAVOURS, PassResult
from btdeploy.optimize.passes.cleanup import cleanup
from btdeploy.optimize.passes.cls_rows import compute_cls_rows
from btdeploy.optimize.passes.gelu import fuse_gelu
from btdeploy.optimize.passes.layernorm import fuse_bridge_layernorm, fuse_residual_layernorm

# Order matters: [CLS]-only rows first (it rewrites the canonical pattern, which the attention
# pass then fuses), attention next (it reads the raw bias Adds of the Q/K/V projections),
# then the Add+LayerNorm pairs (which fold the remaining dense biases), then GELU (which
# folds the FFN's first bias), then cleanup of whatever lost its last user.
PASSES: list[tuple[str, Callable[[Graph, str], PassResult]]] = [
    ("cls_rows", compute_cls_rows),
    ("attention", fuse_attention),
    ("bridge_layernorm", fuse_bridge_layernorm),
    ("residual_layernorm", fuse_residual_layernorm),
    ("gelu", fuse_gelu),
    ("cleanup", cleanup),
]

ATTENTION_OPSET = 23  # ONNX Attention


def expected_attention_blocks(config: Any, head: str) -> int:
    """Every attention block the head's outputs depend on: text tower and vision tower (which
    run in step, so vision layers past the text layer count are never used) and, per cross
    layer, self + cross attention in both stacks. The masked-LM head reads only text
    features, so the last image-side cross layer is dead and exporters prune it."""
    layers = int(config.text_config.num_hidden_layers)
    cross = int(config.num_hidden_layers)
    total = 2 * layers + 4 * cross
    return total - 2 if head == "mlm" else total


def expected_bridges(config: Any) -> int:
    """One link tower per modality between consecutive cross layers."""
    return 2 * (int(config.num_hidden_layers) - 1)


def optimize_graph(model: onnx.ModelProto, flavour: str) -> tuple[onnx.ModelProto, list[PassResult]]:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}")
    from onnx import version_converter

    # Both flavours use the ONNX Attention operator, so both graphs move to its opset.
    model = version_converter.convert_version(model, ATTENTION_OPSET)
    graph = Graph(model)
    results = []
    for _, run in PASSES:
        results.append(run(graph, flavour))
    graph.toposort()
    return graph.model, results


__all__ = ["FLAVOURS", "PASSES", "PassResult", "expected_attention_blocks", "expected_bridges", "optimize_graph"]
