"""`btdeploy.load`: an exported head behind the transformers calling convention."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest
from btdeploy.backends.base import Backend
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.runtime.outputs import HeadOutput
from btdeploy.runtime.split_runtime import Features, SplitRuntimeMixin, build_split_backend
from btdeploy.runtime.validation import prepare_inputs


class Runtime:
    """Callable like the transformers model: `runtime(**processor(image, text, return_tensors="pt"))`."""

    def __init__(self, manifest: Manifest, backend: Backend) -> None:
        self.manifest = manifest
        self.head: HeadSpec = get_head(manifest.head)
        self.config = manifest.config
        self.backend = backend

    def __call__(self, encoding: Mapping[str, Any] | None = None, /, **inputs: Any) -> HeadOutput:
        if encoding is not None:
            inputs = {**dict(encoding), **inputs}
        prepared = prepare_inputs(self.head, self.config, inputs)
        values: dict[str, Any] = self.backend.run(prepared.feeds)
        if prepared.torch_device is not None:
            import torch

            values = {k: torch.from_numpy(v).to(prepared.torch_device) for k, v in values.items()}
        return HeadOutput(self.head.name, {name: values[name] for name in self.head.output_names})

    def __repr__(self) -> str:
        return f"btdeploy.Runtime(head={self.head.name}, backend={self.backend.description})"


def _onnxruntime(manifest: Manifest, **options: Any) -> Backend:
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend

    path = manifest.graph_path(options.get("flavour"), options.get("precision"))
    return OnnxRuntimeBackend(
        path, get_head(manifest.head).output_names, options.get("providers"), options.get("threads")
    )


def _torch(manifest: Manifest, **options: Any) -> Backend:
    from btdeploy.backends.torch_reference import TorchBackend

    return TorchBackend.from_manifest(manifest, options.get("device") or "cpu")


def _tensorrt(manifest: Manifest, **options: Any) -> Backend:
    from btdeploy.backends.tensorrt.engines import ENGINE_PRECISIONS
    from btdeploy.backends.tensorrt.runner import TensorRTBackend

    precision = options.get("precision") or "fp16"
    if precision not in ENGINE_PRECISIONS:
        raise BtDeployError(f"the tensorrt backend runs {', '.join(ENGINE_PRECISIONS)} engines, not {precision}")
    output_names = get_head(manifest.head).output_names
    return TensorRTBackend(manifest, precision, output_names, bool(options.get("cuda_graphs")))


BACKENDS: dict[str, Callable[..., Backend]] = {"onnxruntime": _onnxruntime, "torch": _torch, "tensorrt": _tensorrt}


class SplitRuntime(SplitRuntimeMixin, Runtime):
    """A Runtime over the split graphs, with encode_images, encode_texts and score."""


def find_head(path: str | Path, head: str | None = None) -> Manifest:
    """The manifest of one head, from an export folder plus a head name, or from a head folder."""
    folders = head_folders(Path(path), [head] if head else None)
    if len(folders) > 1:
        names = ", ".join(read_manifest(f).head for f in folders)
        raise BtDeployError(f"{path} holds several heads ({names}): pass head=...")
    return read_manifest(folders[0])


def build_backend(manifest: Manifest, backend: str = "onnxruntime", split: bool = False, **options: Any) -> Backend:
    """The backend that runs one head: by name, or the split graphs (ONNX Runtime only)."""
    if backend not in BACKENDS:
        raise BtDeployError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if split:
        if backend != "onnxruntime":
            raise BtDeployError("split=True runs the split graphs on ONNX Runtime: use backend='onnxruntime'")
        return build_split_backend(manifest, **options)
    return BACKENDS[backend](manifest, **options)


def load(
    path: str | Path,
    head: str | None = None,
    backend: str = "onnxruntime",
    providers: list[str] | None = None,
    **options: Any,
) -> Runtime:
    """Load an exported head. `backend`: onnxruntime (default), torch (the reference) or
    tensorrt (an engine from btdeploy build; `precision="fp16"|"int8"`, `cuda_graphs=True`).

    With `flavour="ort"` or `"trt"`, ONNX Runtime runs that optimized graph (btdeploy optimize)
    instead of the plain export; with `split=True` it runs the text, vision and fusion graphs
    (export --split) and adds encode_images, encode_texts and score; with `precision="fp16"`,
    `"int8"` or `"int8-dynamic"` it runs that flavour's quantized graph (btdeploy quantize)."""
    if backend not in BACKENDS:
        raise BtDeployError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    manifest = find_head(path, head)
    split = bool(options.pop("split", False))
    built = build_backend(manifest, backend, split, providers=providers, **options)
    return SplitRuntime(manifest, built) if split else Runtime(manifest, built)


__all__ = ["load", "build_backend", "Runtime", "SplitRuntime", "Features", "HeadOutput", "BACKENDS", "find_head"]
