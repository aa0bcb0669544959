"""Benchmark variants: each says whether it can run here (and why not) and builds a Backend.

Later steps (fused graphs, precision, TensorRT) add their variants to VARIANTS; the
harness reads nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from btdeploy.artifacts.files import staged_directory
from btdeploy.artifacts.manifest import Manifest, precision_file
from btdeploy.backends.base import Backend
from btdeploy.model.heads import PRECISIONS
from btdeploy.progress import step


@dataclass(frozen=True)
class BenchEnv:
    threads: int
    device: str  # "cpu" or "cuda"


@dataclass(frozen=True)
class Variant:
    name: str
    engine: str  # for the CSV: torch, onnxruntime, tensorrt
    precision: str
    unavailable: Callable[[Manifest, BenchEnv], str | None]  # the reason it cannot run, or None
    build: Callable[[Manifest, BenchEnv], Backend]
    graph: str | None = None  # the file in the head folder an ONNX Runtime variant runs


def _always(manifest: Manifest, env: BenchEnv) -> str | None:
    return None


def _needs_gpu(manifest: Manifest, env: BenchEnv) -> str | None:
    return None if env.device == "cuda" else "needs a CUDA GPU for fp16/bf16 PyTorch (none on this machine)"


def _torch(dtype: str) -> Callable[[Manifest, BenchEnv], Backend]:
    def build(manifest: Manifest, env: BenchEnv) -> Backend:
        from btdeploy.backends.torch_reference import TorchBackend

        return TorchBackend.from_manifest(manifest, env.device, dtype)

    return build


def _ort_providers(env: BenchEnv) -> list[str]:
    return ["cuda", "cpu"] if env.device == "cuda" else ["cpu"]


def _ort_file(filename: str) -> Callable[[Manifest, BenchEnv], Backend]:
    def build(manifest: Manifest, env: BenchEnv) -> Backend:
        from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
        from btdeploy.model.heads import get_head

        return OnnxRuntimeBackend(
            manifest.folder / filename, get_head(manifest.head).output_names, _ort_providers(env), env.threads
        )

    return build


HF_OPTIMIZED = "model.hf-optimizer.onnx"


def hf_optimized_path(manifest: Manifest) -> Path:
    """ONNX Runtime's own transformer optimizer (model_type bert) on the export: the anchor a user
    would otherwise reach for. Made once and kept beside the export."""
    target = manifest.folder / "hf-optimizer" / HF_OPTIMIZED
    if target.is_file():
        return target
    from onnxruntime.transformers.optimizer import optimize_model

    config = manifest.config
    with (
        step(f"{manifest.head}: ONNX Runtime transformer optimizer (bert, {config.num_attention_heads} heads)"),
        staged_directory(target.parent) as staging,
    ):
        optimized = optimize_model(
            str(manifest.model_path),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
        )
        large = optimized.model.ByteSize() > 2**31 - 1 if hasattr(optimized.model, "ByteSize") else True
        optimized.save_model_to_file(str(staging / HF_OPTIMIZED), use_external_data_format=large)
    return target


def _build_hf_optimizer(manifest: Manifest, env: BenchEnv) -> Backend:
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
    from btdeploy.model.heads import get_head

    return OnnxRuntimeBackend(
        hf_optimized_path(manifest), get_head(manifest.head).output_names, _ort_providers(env), env.threads
    )


def _needs_file(filename: str, how: str) -> Callable[[Manifest, BenchEnv], str | None]:
    def reason(manifest: Manifest, env: BenchEnv) -> str | None:
        if (manifest.folder / filename).is_file():
            return None
        return f"{manifest.head}/{filename} not found: {how}"

    return reason


def _needs_engine(precision: str) -> Callable[[Manifest, BenchEnv], str | None]:
    def reason(manifest: Manifest, env: BenchEnv) -> str | None:
        from btdeploy.backends.tensorrt.engines import engine_file
        from btdeploy.backends.tensorrt.environment import INSTALL_TENSORRT, gpu, tensorrt_version

        found = gpu()
        if env.device != "cuda" or found is None:
            return "TensorRT needs an NVIDIA GPU (none on this machine)"
        version = tensorrt_version()
        if version is None:
            return f"TensorRT is not installed ({INSTALL_TENSORRT})"
        name = engine_file(precision, version, found[1])
        if not (manifest.folder / name).is_file():
            return f"{manifest.head}/{name} not found: run btdeploy build DIR --precision {precision}"
        return None

    return reason


def _tensorrt(precision: str, cuda_graphs: bool) -> Callable[[Manifest, BenchEnv], Backend]:
    def build(manifest: Manifest, env: BenchEnv) -> Backend:
        from btdeploy.backends.tensorrt.runner import TensorRTBackend
        from btdeploy.model.heads import get_head

        return TensorRTBackend(manifest, precision, get_head(manifest.head).output_names, cuda_graphs)

    return build


def _ort_variant(name: str, precision: str, graph: str, how: str) -> Variant:
    """An ONNX Runtime variant that runs `graph` from the head folder, unavailable until it exists."""
    return Variant(name, "onnxruntime", precision, _needs_file(graph, how), _ort_file(graph), graph=graph)


_QUANTIZE = "run btdeploy quantize DIR --flavour ort --precision {}"
_OPTIMIZE_ORT = "run btdeploy optimize DIR --flavour ort"
_OPTIMIZE_TRT = "run btdeploy optimize DIR --flavour trt"

VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("torch-eager", "torch", "fp32", _always, _torch("fp32")),
        Variant("torch-eager-fp16", "torch", "fp16", _needs_gpu, _torch("fp16")),
        Variant("torch-eager-bf16", "torch", "bf16", _needs_gpu, _torch("bf16")),
        Variant("ort", "onnxruntime", "fp32", _always, _ort_file("model.onnx"), graph="model.onnx"),
        Variant("ort-hf-optimizer", "onnxruntime", "fp32", _always, _build_hf_optimizer),
        _ort_variant("ort-fused", "fp32", precision_file("ort", "fp32"), _OPTIMIZE_ORT),
        # The TensorRT-flavour graph (standard ONNX operators only) run by ONNX Runtime: what the
        # trt graph costs before TensorRT compiles it, and proof that it runs.
        _ort_variant("trt-graph", "fp32", precision_file("trt", "fp32"), _OPTIMIZE_TRT),
        *(
            _ort_variant(f"ort-{precision}", precision, precision_file("ort", precision), _QUANTIZE.format(precision))
            for precision in PRECISIONS
        ),
        *(
            Variant(
                f"trt-{precision}{suffix}",
                "tensorrt",
                precision,
                _needs_engine(precision),
                _tensorrt(precision, graphs),
            )
            for precision in ("fp16", "int8")
            for suffix, graphs in (("", False), ("-cudagraph", True))
        ),
    )
}

BASELINES = ("torch-eager", "ort-hf-optimizer")  # every ratio is against these, measured in the same run
