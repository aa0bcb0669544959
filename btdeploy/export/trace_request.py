"""What one call to a torch exporter exports: the module, the inputs it is traced on, the graph's
names and dynamic axes. Both exporters (exporter's TorchScript call and torch_export's torch.export
one) take it, so the whole head and each split graph describe their export once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TraceRequest:
    module: Any  # a torch.nn.Module in eval mode
    tensors: tuple[Any, ...]  # in the order of input_names: torch tensors (numpy arrays until _trace)
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    what: str  # "the itm head", "the itm text graph": how errors name it
