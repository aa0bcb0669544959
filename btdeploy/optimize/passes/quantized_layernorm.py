"""Each flavour's form of the Add + LayerNorm pairs of an INT8 graph (run on quantized graphs).

The INT8 graphs are calibrated on the trt graph, whose pairs are Add -> LayerNormalization in
standard ONNX. ONNX Runtime fuses such a pair into SkipLayerNormalization itself only where the
sum has no other reader; in the pre-LN vision tower and the cross-modal layers it also feeds the
next residual Add, so 78 of base itm's pairs ran as two kernels. For the ort flavour this pass
writes SkipLayerNormalization, the sum from its fourth output, as the optimize pass does for the
FP32 graph (passes/layernorm.py), except that no bias is folded here: the bias of every INT8
MatMul already rides in its integer GEMM (passes/integer_matmul.py), and a pair that folded none
can be written back exactly. The outputs are the same to the bit; the speed is level within
the noise on a 2-core Xeon (each graph alone in its own process, 20 processes each: the split
form took 0.96-1.01x this form's time, `benchmarks/graph_ab.py`; an earlier 1.02-1.04x had both
graphs in one process, where the build order decides more than this change). It runs one kernel
where ONNX Runtime would run two, and gives the INT8 graph the form the FP32 graph has.

For the trt flavours, which TensorRT reads, the pass writes each SkipLayerNormalization back as
Add -> LayerNormalization (the trt INT8 graph can be made from the ort one: quantize/int8.py).
"""

from __future__ import annotations

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.passes.base import MS_DOMAIN, GraphPass, PassResult
from btdeploy.optimize.passes.layernorm import (
    fuse_add_layernorm,
    is_add_layernorm,
    is_skip_layernorm,
    split_skip_layernorm,
)


def fuse_pairs(graph: Graph) -> PassResult:
    """ort: every Add -> LayerNormalization pair as one SkipLayerNormalization, no bias folded."""
    result = PassResult("quantized add+LayerNorm")
    for node in graph.each_once(lambda n: is_add_layernorm(graph, n)):
        result.fused += int(fuse_add_layernorm(graph, node, fold_bias=False))
    if result.fused:
        graph.set_opset(MS_DOMAIN, 1)
    result.details = {"skip_layernorms": result.fused}
    return result


def split_pairs(graph: Graph) -> PassResult:
    """trt: every SkipLayerNormalization back to Add -> LayerNormalization."""
    result = PassResult("quantized add+LayerNorm")
    for node in graph.each_once(is_skip_layernorm):
        if len(node.input) > 4 and node.input[4]:
            raise ValueError(f"{node.name} folds a bias: it was not written by the quantized add+LayerNorm pass")
        split_skip_layernorm(graph, node)
        result.fused += 1
    result.details = {"skip_layernorms_split": result.fused}
    return result


QUANTIZED_LAYERNORMS = GraphPass(
    "quantized add+LayerNorm", {Flavour.ORT: fuse_pairs, Flavour.TRT: split_pairs, Flavour.TRT_COMPAT: split_pairs}
)
