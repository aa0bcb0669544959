"""Benchmark variants: each says whether it can run here (and why not) and builds a Backend.

Every target in the registry (btdeploy/backends/targets.py) brings its own variants; the
harness reads nothing else. ONNX Runtime's transformer optimizer is added here as a peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from btdeploy.artifacts.files import staged_directory
from btdeploy.artifacts.manifest import Manifest
from btdeploy.artifacts.onnx_files import PROTOBUF_LIMIT, serialized_bytes
from btdeploy.backends.base import Backend
from btdeploy.backends.targets import (
    TARGETS,
    BenchVariant,
    RunOptions,
    Target,
    bench_skip_reason,
    bench_variants,
    variant_graph,
    with_machine,
)
from btdeploy.model.heads import get_head
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
    opt_out: str | None = None  # what a user gives up to run it (BenchVariant.opt_out)


def _from_target(target: Target, variant: BenchVariant) -> Variant:
    """A bench variant of a registered target: available when the target runs here and its artifact exists."""

    def options(env: BenchEnv) -> RunOptions:
        return with_machine(target, variant.options, env.threads, env.device)

    def unavailable(manifest: Manifest, env: BenchEnv) -> str | None:
        return bench_skip_reason(target, variant, manifest, options(env))

    def build(manifest: Manifest, env: BenchEnv) -> Backend:
        return target.make(manifest, options(env))

    graph = variant_graph(target, variant.options)
    precision = str(variant.options.precision)
    return Variant(variant.name, target.name, precision, unavailable, build, graph, variant.opt_out)


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
        large = serialized_bytes(optimized.model) > PROTOBUF_LIMIT if hasattr(optimized.model, "ByteSize") else True
        optimized.save_model_to_file(str(staging / HF_OPTIMIZED), use_external_data_format=large)
    return target


def _hf_optimizer_options(env: BenchEnv) -> RunOptions:
    """The options of the plain ONNX Runtime variant, which this one runs like."""
    return with_machine(TARGETS["onnxruntime"], RunOptions(), env.threads, env.device)


def _build_hf_optimizer(manifest: Manifest, env: BenchEnv) -> Backend:
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend

    options = _hf_optimizer_options(env)
    path = hf_optimized_path(manifest)
    return OnnxRuntimeBackend(path, get_head(manifest.head).output_names, options.providers, options.threads)


def _hf_optimizer_unavailable(manifest: Manifest, env: BenchEnv) -> str | None:
    return TARGETS["onnxruntime"].unavailable(_hf_optimizer_options(env))


# ONNX Runtime's own transformer optimizer: a peer, not a btdeploy target; listed after the plain export.
_HF_OPTIMIZER = Variant("ort-hf-optimizer", "onnxruntime", "fp32", _hf_optimizer_unavailable, _build_hf_optimizer)
VARIANTS: dict[str, Variant] = {}
for _name, (_target, _variant) in bench_variants().items():
    VARIANTS[_name] = _from_target(_target, _variant)
    if _name == "ort":
        VARIANTS[_HF_OPTIMIZER.name] = _HF_OPTIMIZER

BASELINES = ("torch-eager", "ort-hf-optimizer")  # every ratio is against these, measured in the same run
# What a user would pick instead of btdeploy; the report sets btdeploy's best against the best of these.
PEER_ENGINES = ("torch", "openvino")
PEER_VARIANTS = ("ort-hf-optimizer",)


def is_peer(name: str) -> bool:
    return name in PEER_VARIANTS or VARIANTS[name].engine in PEER_ENGINES


REDUCED_FLOAT = "16-bit float"


def precision_class(name: str) -> str:
    """fp32, int8 or 16-bit float: peers are compared with btdeploy at the same kind of precision.
    fp16 and bf16 are one class: a user picks whichever 16-bit float is fastest on the machine and
    passes its own tolerance (TensorRT fp16 against torch bf16 on a GPU, ort-fp16 against torch or
    OpenVINO bf16 on a CPU with native bfloat16)."""
    precision = VARIANTS[name].precision
    if precision.startswith("int8"):
        return "int8"
    return REDUCED_FLOAT if precision in ("fp16", "bf16") else precision
