"""torch's exporter writes the graph; btdeploy writes the weights, from torch's own tensors.

torch.onnx.export (TorchScript) encodes the whole model into one protobuf in C++, weights
included, hands it to Python as bytes, parses those again to look for functions and writes them:
on base itm 48 s of the export's 59 s, and the step peaked at 5.5 GB where the traced graph had
needed 2.1. Past 2 GB it writes a file per weight instead, which had to be read back whole and
gathered into one. Here its `_export_onnx` is handed no parameters (what `export_params=False`
hands it), so it encodes the graph alone, each weight left a graph input with its type and dims.
The tensors it was handed are kept; each such input becomes an initializer stub again, and
btdeploy's writers put the tensor's own memory in its place, a weight at a time
(`artifacts/streamed_proto.py`). The file is the one torch writes with its weights in it, byte for
byte (tests/export/test_held_weights.py); past 2 GB, where torch had also named the tensor of each
Constant node, they are unnamed as below it, the weights the same bytes. Base itm's export takes
23-24 s and peaks at 2.8 GB (benchmarks/results/base-main-job/README.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import onnx

from btdeploy.artifacts.weightless import WeightBytes, size_from_dims
from btdeploy.errors import BtDeployError
from btdeploy.swaps import replaced


@dataclass
class ExportedGraph:
    """An exported graph, each weight a stub (name, type, dims), and the weights' bytes apart."""

    model: onnx.ModelProto
    weights: WeightBytes


@dataclass
class HeldWeights:
    """The parameters torch's exporter was handed for the graph it encoded, by initializer name."""

    tensors: dict[str, Any] | None = None
    torch_version: str = field(default="")

    def graph(self, model: onnx.ModelProto) -> ExportedGraph:
        """`model`, the graph torch wrote without its weights, each weight it held back an
        initializer stub again (in the order of the graph inputs it had made of them), with their bytes."""
        if self.tensors is None:
            raise BtDeployError(
                f"torch {self.torch_version}'s ONNX exporter did not hand btdeploy the weights it exports "
                "(its TorchScript exporter changed): install a torch that pyproject.toml admits"
            )
        inputs = list(model.graph.input)
        del model.graph.input[:]
        weights: dict[str, memoryview] = {}
        for value in inputs:
            tensor = self.tensors.get(value.name)
            if tensor is None:
                model.graph.input.append(value)
                continue
            stub = model.graph.initializer.add()
            stub.name = value.name
            stub.data_type = value.type.tensor_type.elem_type
            stub.dims.extend(dim.dim_value for dim in value.type.tensor_type.shape.dim)
            weights[value.name] = tensor_bytes(tensor)
            _same_size(stub, weights[value.name])
        self.tensors = None  # the memoryviews keep what is written alive; nothing else needs the rest
        return ExportedGraph(model, weights)


@contextmanager
def weights_held_back() -> Iterator[HeldWeights]:
    """For the block, torch's exporter encodes graphs without their weights and hands them here:
    the block calls torch.onnx.export and then `held.graph` on the graph it wrote."""
    import torch

    held = HeldWeights(torch_version=torch.__version__)
    encode = torch._C.Graph._export_onnx  # type: ignore[attr-defined]

    def encode_without_weights(graph: Any, params: Any, *rest: Any, **named: Any) -> Any:
        if isinstance(params, dict):
            held.tensors = dict(params)
            params = {}
        return encode(graph, params, *rest, **named)

    with replaced((torch._C.Graph, "_export_onnx", encode_without_weights)):
        yield held


def tensor_bytes(tensor: Any) -> memoryview:
    """The tensor's bytes as they lie in memory (ONNX's raw_data is little-endian, as torch's CPUs
    are): a view, not a copy, unless the tensor was not contiguous."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _same_size(stub: onnx.TensorProto, data: memoryview) -> None:
    """The stub's type and dims (torch's graph input) must describe the tensor handed over."""
    expected = size_from_dims(stub)
    if expected is not None and expected != data.nbytes:  # None: a type numpy does not hold
        raise RuntimeError(f"{stub.name}: the graph declares {expected} bytes, the tensor holds {data.nbytes}")
