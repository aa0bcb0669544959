"""`btdeploy.load`: an exported head behind the transformers calling convention."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, overload

from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest
from btdeploy.backends.base import Backend
from btdeploy.backends.targets import get_target
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HeadSpec, get_head
from btdeploy.model.media import export_processor
from btdeploy.progress import warn
from btdeploy.runtime.outputs import HeadOutput
from btdeploy.runtime.split_runtime import Features, SplitRuntimeMixin
from btdeploy.runtime.validation import call_inputs, prepare_inputs


class Runtime:
    """Callable like the transformers model: `runtime(**processor(image, text, return_tensors="pt"))`."""

    def __init__(self, manifest: Manifest, backend: Backend, check_finite: bool = True) -> None:
        self.manifest = manifest
        self.head: HeadSpec = get_head(manifest.head)
        self.config = manifest.config
        self.backend = backend
        self.check_finite = check_finite  # refuse NaN/Inf pixels instead of propagating them
        self.load_arguments: tuple[Any, ...] | None = None  # set by load(): how to load it again

    def __call__(self, *args: Any, **keywords: Any) -> Any:
        """`runtime(**encoding)`, `runtime(encoding)` or positional tensors in transformers' order;
        `return_dict=False` returns the outputs as a tuple, as transformers does."""
        inputs, return_dict = call_inputs(self.head, args, keywords)
        prepared = prepare_inputs(self.head, self.config, inputs, self.check_finite)
        values: dict[str, Any] = self.backend.run(prepared.feeds)
        if prepared.torch_device is not None:
            import torch

            values = {k: torch.from_numpy(v).to(prepared.torch_device) for k, v in values.items()}
        outputs = HeadOutput(self.head.name, {name: values[name] for name in self.head.output_names})
        return outputs if return_dict else outputs.to_tuple()

    forward = __call__  # some code calls model.forward(...) directly

    # What code written for a torch module calls on the model it loaded. The backend chose where
    # the graph runs when it was loaded; outputs come back where the inputs were.
    def eval(self) -> Runtime:
        return self

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu")

    @property
    def dtype(self) -> Any:
        """What `processor(...).to(model.device, model.dtype)` casts the pixels to: every graph
        takes float32 pixels (an fp16 or int8 graph converts inside; other float pixels are cast)."""
        import torch

        return torch.float32

    def to(self, device: Any) -> Runtime:
        if str(device).split(":")[0] != "cpu":
            raise BtDeployError(
                f"a loaded runtime does not move to {device}: the backend chooses the device when it loads, "
                "e.g. btdeploy.load(path, providers=['cuda']) or backend='tensorrt'; outputs come back on "
                "the device of the tensors you pass"
            )
        return self

    def cpu(self) -> Runtime:
        return self.to("cpu")

    def cuda(self, device: Any = None) -> Runtime:
        return self.to("cuda" if device is None else f"cuda:{device}" if isinstance(device, int) else device)

    def half(self) -> Runtime:
        raise BtDeployError(
            "a loaded runtime does not change precision: load the graph of the precision you want, "
            "e.g. btdeploy.load(path, precision='fp16') (or 'int8', 'int8-dynamic')"
        )

    def __repr__(self) -> str:
        return f"btdeploy.Runtime(head={self.head.name}, backend={self.backend.description})"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as the way it was loaded (sessions and engines do not pickle): a worker process
        or a Ray task that receives it loads the same graph again."""
        arguments = self.load_arguments
        if arguments is None:
            raise BtDeployError("this runtime was not made by btdeploy.load, so it cannot be pickled: pass its folder")
        return (_load_again, arguments)


class SplitRuntime(SplitRuntimeMixin, Runtime):
    """A Runtime over the split graphs, with encode_images, encode_texts and score."""


def find_head(path: str | Path, head: str | None = None) -> Manifest:
    """The manifest of one head, from an export folder plus a head name, or from a head folder."""
    folders = head_folders(Path(path), [head] if head else None)
    if len(folders) > 1:
        names = ", ".join(read_manifest(f).head for f in folders)
        raise BtDeployError(
            f"{path} holds several heads ({names}): choose one (head=... in Python, --head on the command line)"
        )
    return read_manifest(folders[0])


# With split=True the result has encode_images, encode_texts and score, and the overloads say so
# to a type checker, so that user code calling them checks without a cast.
@overload
def load(
    path: str | Path,
    head: str | None = None,
    backend: str = "onnxruntime",
    *,
    split: Literal[True],
    check_finite: bool = True,
    **options: Any,
) -> SplitRuntime: ...


@overload
def load(
    path: str | Path,
    head: str | None = None,
    backend: str = "onnxruntime",
    *,
    split: bool = False,
    check_finite: bool = True,
    **options: Any,
) -> Runtime: ...


def load(
    path: str | Path,
    head: str | None = None,
    backend: str = "onnxruntime",
    *,
    split: bool = False,
    check_finite: bool = True,
    **options: Any,
) -> Runtime:
    """Load an exported head. `backend`: onnxruntime (default), openvino (the plain or trt graph,
    `precision="int8"|"bf16"`), torch (the reference) or tensorrt (an engine from btdeploy build;
    `precision="fp16"|"int8"`, `cuda_graphs=True`).

    With `flavour="ort"` or `"trt"`, ONNX Runtime runs that optimized graph (btdeploy optimize)
    instead of the plain export; with `split=True` it runs the text, vision and fusion graphs
    (export --split) and adds encode_images, encode_texts and score; with `precision="fp16"`,
    `"int8"` or `"int8-dynamic"` it runs that flavour's quantized graph (btdeploy quantize).
    Options a backend does not take, and graphs it cannot run, are refused with one line.
    Inputs holding NaN or Inf are refused unless `check_finite=False`."""
    target = get_target(backend)
    if split:
        options["split"] = split
    resolved = target.resolve(options)  # before reading anything, so a typo fails at once
    manifest = find_head(path, head)
    built = target.make(manifest, resolved)
    missing = manifest.data["model"].get("missing_weights") or []
    if missing:
        warn(
            f"the {manifest.head} head in {manifest.folder} was exported from a checkpoint without its weights "
            f"({len(missing)} parameter(s) drawn at random): its answers are meaningless"
        )
    runtime_class = SplitRuntime if resolved.split else Runtime
    runtime = runtime_class(manifest, built, check_finite)
    runtime.load_arguments = (str(manifest.folder), backend, check_finite, dict(options))
    return runtime


def load_processor(path: str | Path, head: str | None = None) -> Any:
    """The processor export kept beside a head, called as transformers' BridgeTowerProcessor is
    (`model(**processor(image, text, return_tensors="np"))`): read without transformers, so
    with `load` images and texts run through a head without importing torch
    (model/preprocessor; transformers reads the rare folder that reading does not cover)."""
    return export_processor(find_head(path, head))


def _load_again(folder: str, backend: str, check_finite: bool, options: dict[str, Any]) -> Runtime:
    return load(folder, None, backend, check_finite=check_finite, **options)


__all__ = ["load", "Runtime", "SplitRuntime", "Features", "HeadOutput", "find_head"]
