"""The export hands torch's exporter no weights and writes them itself, from torch's tensors: the
files are the ones torch writes with its weights, inline and as external data, and torch never
encodes a weight."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from btdeploy.artifacts.onnx_files import save_graph_atomically
from btdeploy.errors import BtDeployError
from btdeploy.export import exporter
from btdeploy.export.held_weights import ExportedGraph, HeldWeights, weights_held_back
from btdeploy.model.checkpoints import resolve_model


class _WeightsLeftToTorch:
    """What the export did before: torch encodes the weights into the graph it writes."""

    def graph(self, model: onnx.ModelProto) -> ExportedGraph:
        return ExportedGraph(model, {})


@contextmanager
def _torch_writes_the_weights() -> Iterator[_WeightsLeftToTorch]:
    yield _WeightsLeftToTorch()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".onnx", ".data")}


@pytest.mark.parametrize("external", [False, True])
def test_the_export_writes_the_files_torch_writes_with_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    """Every graph of a split export of tiny itm, byte for byte: one file each, or (external data
    forced by a low threshold) each graph and its `.data` file."""
    if external:
        monkeypatch.setenv("BTDEPLOY_EXTERNAL_DATA_BYTES", "4096")
    exporter.export_head(resolve_model("tiny"), "itm", tmp_path / "held", split=True)
    monkeypatch.setattr(exporter, "weights_held_back", _torch_writes_the_weights)
    exporter.export_head(resolve_model("tiny"), "itm", tmp_path / "torch", split=True)
    held, torch_own = _files(tmp_path / "held" / "itm"), _files(tmp_path / "torch" / "itm")
    data = sorted(name for name in held if name.endswith(".data"))
    assert data == (["fusion.onnx.data", "model.onnx.data", "text.onnx.data", "vision.onnx.data"] if external else [])
    assert sorted(held) == sorted(torch_own) and len(held) == 4 + len(data)
    assert [name for name in held if held[name] != torch_own[name]] == []


def test_torch_encodes_no_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's encoder is handed no parameters, so it never holds the model in one protobuf; every
    weight it was handed is an initializer of the written graph."""
    import torch

    handed: list[int] = []
    encode = torch._C.Graph._export_onnx  # type: ignore[attr-defined]  # private, not in torch's stubs

    def spy(graph: Any, params: Any, *rest: Any) -> Any:
        handed.append(len(params))
        return encode(graph, params, *rest)

    monkeypatch.setattr(torch._C.Graph, "_export_onnx", spy)
    held_counts: list[int] = []
    real_graph = HeldWeights.graph

    def counted(self: HeldWeights, model: onnx.ModelProto) -> ExportedGraph:
        held_counts.append(len(self.tensors or {}))
        return real_graph(self, model)

    monkeypatch.setattr(HeldWeights, "graph", counted)
    exporter.export_head(resolve_model("tiny"), "itm", tmp_path, exporter="torchscript")  # its encoder is spied on
    model = onnx.load(str(tmp_path / "itm" / "model.onnx"))
    assert handed == [0]
    assert held_counts == [len(model.graph.initializer)] and held_counts[0] > 50
    assert torch._C.Graph._export_onnx is spy  # type: ignore[attr-defined]  # the swap was undone


# torch.onnx.export called directly, as btdeploy's exporter calls it under its own filter: torch's notices
# that its TorchScript exporter is deprecated say nothing about what is tested here
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.onnx")
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
def test_weights_of_every_type_and_shape_come_out_as_torch_writes_them(tmp_path: Path) -> None:
    """float32, float16, bfloat16, int64 and bool buffers, a 0-d tensor, a transposed (folded)
    weight: the written graph is torch's own file with its weights, and computes the same."""
    import torch

    class Module(torch.nn.Module):
        keep: torch.Tensor  # a buffer

        def __init__(self) -> None:
            super().__init__()
            generator = torch.Generator().manual_seed(0)
            self.linear = torch.nn.Linear(24, 40)
            self.register_buffer("halves", torch.randn(40, generator=generator).half())
            self.register_buffer("brains", torch.randn(40, generator=generator).bfloat16())
            self.register_buffer("index", torch.arange(40, dtype=torch.int64).flip(0))
            self.register_buffer("keep", torch.rand(40, generator=generator) > 0.5)
            self.register_buffer("scale", torch.tensor(1.5))
            self.weight = torch.nn.Parameter(torch.randn(40, 24, generator=generator))

        def forward(self, x: Any) -> Any:
            y = self.linear(x) + x @ self.weight.t() * self.scale
            y = (y.half() + self.halves).float() + (y.bfloat16() * self.brains).float()  # not folded to FP32
            return torch.where(self.keep, y, y[..., self.index])

    module = Module().eval()
    x = torch.randn(3, 24)

    def export(target: Any) -> None:
        torch.onnx.export(module, (x,), target, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])

    export(str(tmp_path / "torch.onnx"))
    with weights_held_back() as held:
        export(str(tmp_path / "light.onnx"))
    graph = held.graph(onnx.load(str(tmp_path / "light.onnx")))
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.model.graph.initializer}
    assert {"FLOAT", "FLOAT16", "BFLOAT16", "INT64", "BOOL"} <= types, types
    assert all(not t.HasField("raw_data") for t in graph.model.graph.initializer)
    save_graph_atomically(graph.model, tmp_path / "held.onnx", apart=graph.weights)
    assert (tmp_path / "held.onnx").read_bytes() == (tmp_path / "torch.onnx").read_bytes()


def test_a_torch_whose_exporter_hands_over_no_weights_is_named(tmp_path: Path) -> None:
    """If a torch release stopped calling the encoder btdeploy holds the weights back at, the export
    says so and what to do, rather than writing a graph without weights."""
    held = HeldWeights(torch_version="9.9")
    with pytest.raises(BtDeployError, match=r"torch 9\.9's ONNX exporter did not hand btdeploy the weights.*pyproject"):
        held.graph(onnx.ModelProto())


def test_a_tensor_unlike_its_declared_input_is_an_error() -> None:
    """The graph input torch declared for a weight must have the tensor's size."""
    import torch

    def written() -> onnx.ModelProto:
        value = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4])
        return onnx.helper.make_model(onnx.helper.make_graph([], "g", [value], []))

    with pytest.raises(RuntimeError, match="w: the graph declares 16 bytes, the tensor holds 20"):
        HeldWeights(tensors={"w": torch.zeros(5)}).graph(written())
    exported = HeldWeights(tensors={"w": torch.arange(4, dtype=torch.float32)}).graph(written())
    assert [t.name for t in exported.model.graph.initializer] == ["w"] and list(exported.model.graph.input) == []
    np.testing.assert_array_equal(np.frombuffer(exported.weights["w"], np.float32), [0, 1, 2, 3])
