"""The ort INT8 graphs' integer GEMMs recoded so that ONNX Runtime sums every product exactly.

ONNX Runtime multiplies the ort INT8 graphs' uint8 activations by int8 weights. On a CPU without
VNNI or AMX its kernel adds two neighbouring products in a saturating int16 first (btdeploy/cpu.py),
so the same graph answers differently there than on a VNNI server. Its uint8 x uint8 kernel widens
both sides to 16 bits and sums in 32 bits on every CPU. A weight w in int8 with zero point z is
the same number as w + 128 in uint8 with zero point z + 128, so recoding the weights changes the
kernel, not the model: the answers become the exact sums a VNNI CPU computes. It is the default
(`RunOptions.exact_sums`; large itm's static graph failed the INT8 cosine floor with saturating
sums), applied only where the sums saturate, and costs time there (on a 2-core Zen 3, base itm
1.19-1.29x; benchmarks/results/int8-without-vnni); `exact_sums=False` keeps ONNX Runtime's own
kernel. The graph on disk is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# The integer GEMMs the ort INT8 graphs hold on disk (int8-dynamic: MatMulInteger; int8:
# MatMulIntegerToFloat): the positions of the activation, its zero point, the weight and its zero point.
INTEGER_GEMMS = {
    ("", "MatMulInteger"): {"a": 0, "b": 1, "a_zero": 2, "b_zero": 3},
    ("com.microsoft", "MatMulIntegerToFloat"): {"a": 0, "b": 1, "a_zero": 4, "b_zero": 5},
}
# Producers of uint8 activations: the recoded GEMM must be uint8 x uint8, a kernel ONNX Runtime has.
_UINT8_PRODUCERS = ("DynamicQuantizeLinear",)


def _positions(node: onnx.NodeProto) -> dict[str, int] | None:
    return INTEGER_GEMMS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))


def _input(node: onnx.NodeProto, position: int) -> str:
    """The node's input at `position`, or "" where it is left out (an optional input)."""
    return node.input[position] if len(node.input) > position else ""


def _activation_is_uint8(
    node: onnx.NodeProto, where: dict[str, int], producers: dict[str, onnx.NodeProto], types: dict[str, int]
) -> bool:
    zero = _input(node, where["a_zero"])
    if zero in types:  # the activation's zero point has the activation's type
        return types[zero] == TensorProto.UINT8
    producer = producers.get(node.input[where["a"]])
    return producer is not None and producer.op_type in _UINT8_PRODUCERS


def _weight_names(node: onnx.NodeProto, where: dict[str, int]) -> list[str]:
    """The weight and, where given, its zero point."""
    return [name for role in ("b", "b_zero") if (name := _input(node, where[role]))]


def unsigned_weights(model: onnx.ModelProto, base_dir: str = "") -> int:
    """Recode in place every int8 weight of an integer GEMM whose activation is uint8 (and the
    weight's zero point, added where it was left out) into uint8 + 128, held in the graph; a weight
    stored as external data is read from `base_dir`. A weight or zero point also read by anything
    else is left as it is. Returns how many weights were recoded."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    types = {name: tensor.data_type for name, tensor in initializers.items()}
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    graph_outputs = {output.name for output in graph.output}

    def only_read_as(name: str, role: str) -> bool:
        """Whether every reader of `name` is an integer GEMM reading it as `role`."""
        if name in graph_outputs:
            return False
        return all((where := _positions(n)) is not None and where.get(role) == i for n, i in readers.get(name, []))

    chosen = []
    for node in graph.node:
        where = _positions(node)
        if where is None:
            continue
        weight, zero = _input(node, where["b"]), _input(node, where["b_zero"])
        if types.get(weight) != TensorProto.INT8 or not only_read_as(weight, "b"):
            continue
        if zero and (types.get(zero) != TensorProto.INT8 or not only_read_as(zero, "b_zero")):
            continue
        if _activation_is_uint8(node, where, producers, types):
            chosen.append((node, where))
    # A weight or zero point also read by a GEMM that cannot be recoded stays int8 for every reader.
    while True:
        ids = {id(node) for node, _ in chosen}
        kept = [
            (node, where)
            for node, where in chosen
            if all(id(reader) in ids for name in _weight_names(node, where) for reader, _ in readers[name])
        ]
        if len(kept) == len(chosen):
            break
        chosen = kept
    recoded: set[str] = set()
    for node, where in chosen:
        for role in ("b", "b_zero"):
            name = _input(node, where[role])
            if not name:  # a missing weight zero point is 0: 128 in uint8
                name = f"{node.input[where['b']]}_unsigned_zero_point"
                if name not in initializers:
                    initializers[name] = numpy_helper.from_array(np.array(128, np.uint8), name)
                    graph.initializer.append(initializers[name])
                while len(node.input) <= where[role]:
                    node.input.append("")
                node.input[where[role]] = name
                continue
            if name in recoded:
                continue
            values = numpy_helper.to_array(initializers[name], base_dir).astype(np.int16) + 128
            initializers[name].CopyFrom(numpy_helper.from_array(values.astype(np.uint8), name))
            recoded.add(name)
    return len({node.input[where["b"]] for node, where in chosen})
