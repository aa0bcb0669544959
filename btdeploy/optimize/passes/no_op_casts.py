"""No-op casts: a Cast to the type its input already has is dropped, its readers reading its input.

The TorchScript export writes the model's `.to(dtype)` calls as Casts even where the tensor is
already of that type: FP32 to FP32 on the pixels (twice), and on the residual sum of each vision
layer whose output a bridge reads, and itc's heads end in one on two of their outputs. Between
such a sum and its LayerNorm the Cast hides the Add + LayerNorm pair from the residual pass (on
base, six of the vision tower's pairs), and every one of them is a copy at run time.
"""

from __future__ import annotations

import onnx

from btdeploy.artifacts.weightless import weightless_copy
from btdeploy.optimize.graph import Graph, attribute
from btdeploy.optimize.passes.base import GraphPass, PassResult


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor ONNX's type inference can tell (weights' bytes not read)."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model)).graph
    types = {tensor.name: tensor.data_type for tensor in inferred.initializer}
    for info in [*inferred.input, *inferred.value_info, *inferred.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def read_through_no_op_casts(graph: Graph) -> PassResult:
    result = PassResult("no-op casts", details={"no_op_casts_bypassed": 0, "output_casts_dropped": 0})
    casts = [node for node in graph.graph.node if node.op_type == "Cast" and node.domain in ("", "ai.onnx")]
    if not casts:
        return result
    types = _element_types(graph.model)
    result.unmatched = [
        f"{node.name}: its input's type is not known to ONNX's inference"
        for node in casts
        if node.input[0] not in types
    ]
    outputs = graph.output_names
    # Any order serves a chain of them (the pixels' two): each hands its readers to its own input.
    for cast in [node for node in casts if types.get(node.input[0]) == attribute(node, "to")]:
        source, target = cast.input[0], cast.output[0]
        producer = graph.producer.get(source)
        if target not in outputs:
            _rename_reads(graph, target, source)
            graph.replace([cast], [])
            result.details["no_op_casts_bypassed"] += 1
        elif producer is not None and source not in outputs:
            # A graph output (itc's embeddings): the source's producer writes it under the output's name.
            graph.replace([cast], [])
            _rename_reads(graph, source, target)
            graph.set_output(producer, list(producer.output).index(source), target)
            result.details["output_casts_dropped"] += 1
    result.fused = sum(result.details.values())
    return result


def _rename_reads(graph: Graph, name: str, new_name: str) -> None:
    for reader in list(graph.consumers.get(name, [])):
        for index, read in enumerate(reader.input):
            if read == name:
                graph.set_input(reader, index, new_name)


NO_OP_CASTS = GraphPass.every_flavour("no-op casts", read_through_no_op_casts)
