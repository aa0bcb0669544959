"""The target registry: one object per execution target, and the only way backends are built.

A target ties together its backend, the graphs it runs (flavour and precision), the options it
takes, whether it can run on this machine, the artifact it runs (a graph, or an engine built
from one) and the step that builds it, the graph checks its flavour must pass, and its bench
variants. Adding a backend is one `Target` here plus one backend module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import onnx

from btdeploy.artifacts.graph_names import Flavour, Precision, graph_file, parse_flavour, parse_precision
from btdeploy.artifacts.manifest import Manifest
from btdeploy.backends.base import Backend
from btdeploy.backends.tensorrt.engines import ENGINE_PRECISIONS
from btdeploy.backends.tensorrt.operators import FLAVOUR_LINES
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head

if TYPE_CHECKING:
    from btdeploy.backends.split import GraphOpener, SplitBackend


@dataclass(frozen=True)
class RunOptions:
    """Every option a target may take; each target says which of them it reads."""

    flavour: Flavour | None = None  # None: the plain export
    precision: Precision = Precision.FP32
    providers: tuple[str, ...] | None = None  # ONNX Runtime providers: cpu, cuda
    threads: int | None = None
    spin: bool = True  # ONNX Runtime's workers spin between operators (off: busy processes share the cores)
    # The ort INT8 graphs' integer products summed in 32 bits on every CPU, as on a VNNI one, where
    # ONNX Runtime's uint8 x int8 kernels would saturate (backends/exact_sums.py): 1.2-1.3x slower
    # there, nothing changes elsewhere. False: its faster saturating kernel (large itm fails the INT8
    # floor with it).
    exact_sums: bool = True
    device: str = "cpu"  # the PyTorch reference's device
    cuda_graphs: bool = False
    split: bool = False  # the text, vision and fusion graphs instead of the whole head
    verify_hash: bool = False  # hash each graph against its manifest record (its size is always checked)
    provider_fallback: bool = False  # run on the CPU (and say so) when a requested provider cannot start
    compile: bool = False  # the PyTorch reference through torch.compile (inductor)
    # The reference's checkpoint folder where it is no longer at the path the export recorded (a CI
    # machine): held to the weights hash the export recorded.
    checkpoint: str | None = None


OPTION_NAMES = tuple(f.name for f in fields(RunOptions))
_FLAG_DEFAULTS = {f.name: f.default for f in fields(RunOptions) if isinstance(f.default, bool)}


def _check_option_types(given: Mapping[str, Any]) -> None:
    """A flag must be a bool and threads a count: `spin="no"` would otherwise read as True, and a
    negative thread count went to ONNX Runtime unchecked."""
    for name, value in given.items():
        if name in _FLAG_DEFAULTS and not isinstance(value, bool):
            raise BtDeployError(f"{name}={value!r}: give True or False")
    threads = given.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, Integral) or threads < 0):
        raise BtDeployError(f"threads={threads!r}: give a number of threads (0 or None: every core)")


GraphKind = tuple[Flavour | None, Precision]


@dataclass(frozen=True)
class BenchVariant:
    """A named configuration of a target that `btdeploy bench` times."""

    name: str
    options: RunOptions
    # Why timing it here, with the options it runs with, would only repeat another variant, or None
    # (it is then skipped with that reason).
    redundant: Callable[[RunOptions], str | None] | None = None
    # What a user gives up to run it (an option away from btdeploy's defaults), or None. The bench
    # times it, but keeps it off btdeploy's side of the peer table, which compares what users get.
    opt_out: str | None = None


def describe_graph(kind: GraphKind) -> str:
    flavour, precision = kind
    return f"{precision} {flavour or 'plain'}"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    options: frozenset[str]  # the RunOptions fields this target reads
    graphs: tuple[GraphKind, ...]  # what it runs, in preference order (the first is the default)
    make: Callable[[Manifest, RunOptions], Backend]
    unavailable: Callable[[RunOptions], str | None]  # why it cannot run on this machine, or None
    artifact: Callable[[Manifest, RunOptions], Path]  # the file it runs; a clear error naming the step that makes it
    variants: tuple[BenchVariant, ...] = ()
    # Problems a graph of a flavour this target consumes has for it (operators it cannot parse).
    check_graph: Callable[[onnx.ModelProto, Flavour], list[str]] | None = None
    # The oldest release of the target that takes each flavour's graphs, recorded in the manifest.
    requirements: Mapping[Flavour, str] = field(default_factory=dict)
    build: Callable[..., Path] | None = None  # the step that makes its artifact from a graph
    reads_onnx: bool = True  # runs an ONNX graph itself (not the PyTorch reference, not an engine)
    # It compiles kernels for each input shape it first meets (OpenVINO: base itm in bf16 took 2.05 s
    # for its first batch of 16 rows, 1.29 s for the next), so a server runs its largest batch
    # before it takes requests. ONNX Runtime's first batch of 16 costs what the next one does.
    compiles_per_shape: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def runs_split(self) -> bool:
        """Whether it runs a head's split text, vision and fusion graphs (it reads the split option)."""
        return "split" in self.options

    @property
    def flavours(self) -> set[Flavour]:
        return {flavour for flavour, _ in self.graphs if flavour is not None}

    @property
    def precisions(self) -> list[Precision]:
        return list(dict.fromkeys(precision for _, precision in self.graphs))

    def resolve(self, options: Mapping[str, Any]) -> RunOptions:
        """Typed, checked options: an unknown or misspelled option, an option this target does not
        take, or a graph it cannot run is one line naming what it does take."""
        unknown = [name for name in options if name not in OPTION_NAMES]
        if unknown:
            raise BtDeployError(
                f"unknown option(s) {', '.join(map(repr, unknown))}: the {self.name} backend takes "
                f"{', '.join(sorted(self.options))}"
            )
        # An option left at its default is not "given": a target that does not read it is not asked to.
        given = {
            name: value for name, value in options.items() if value is not None and value != _FLAG_DEFAULTS.get(name)
        }
        foreign = [name for name in given if name not in self.options]
        if foreign:
            raise BtDeployError(
                f"the {self.name} backend ({self.description}) does not take {', '.join(map(repr, foreign))}: "
                f"it takes {', '.join(sorted(self.options))}"
            )
        _check_option_types(given)
        values: dict[str, Any] = {**self.defaults, **given}
        values["flavour"] = parse_flavour(values.get("flavour"), "flavour")
        values["precision"] = parse_precision(values.get("precision", Precision.FP32), "precision")
        # A precision without a plain graph (every stored reduced one) takes the target's default flavour.
        plain = (None, values["precision"]) in self.graphs
        if values["flavour"] is None and not plain and self.flavours:
            values["flavour"] = Flavour.ORT if Flavour.ORT in self.flavours else min(self.flavours)
        if values.get("threads") is not None:
            values["threads"] = int(values["threads"])  # a numpy count too
        if values.get("checkpoint") is not None:
            values["checkpoint"] = str(values["checkpoint"])  # a Path too
        if "providers" in values:
            providers = values["providers"]
            values["providers"] = (providers,) if isinstance(providers, str) else tuple(providers)
        resolved = RunOptions(**values)
        kind = (resolved.flavour, resolved.precision)
        if kind not in self.graphs:
            runs = ", ".join(describe_graph(k) for k in self.graphs)
            elsewhere = [t.name for t in TARGETS.values() if t is not self and kind in t.graphs]
            hint = f"; {describe_graph(kind)} runs on {' or '.join(elsewhere)}" if elsewhere else ""
            if not elsewhere:  # no graph of that flavour at that precision: name the ones that exist
                others = [f"{describe_graph(k)} on {t.name}" for t in TARGETS.values() for k in t.graphs
                          if k[1] == resolved.precision and k[0] != resolved.flavour]  # fmt: skip
                hint = f"; {resolved.precision} is run as {', '.join(others)}" if others else ""
            what = describe_graph(kind)
            raise BtDeployError(f"the {self.name} backend cannot run {what} graphs: it runs {runs}{hint}")
        reason = self.unavailable(resolved)
        if reason:
            raise BtDeployError(f"the {self.name} backend cannot run here: {reason}")
        return resolved

    def missing(self, manifest: Manifest, options: RunOptions) -> str | None:
        """Why this target's artifact for a head is absent (with the command that makes it), or None."""
        try:
            self.artifact(manifest, options)
        except BtDeployError as error:
            return str(error)
        return None


# --- onnxruntime ----------------------------------------------------------------------------


def _ort_unavailable(options: RunOptions) -> str | None:
    from btdeploy.backends.onnxruntime import gpu_providers, provider_problem

    problem = provider_problem(options.providers)
    on_gpu = gpu_providers(options.providers)
    if problem is None and not options.provider_fallback and on_gpu:
        from btdeploy.backends.provider_probe import start_problem
        from btdeploy.backends.tensorrt.environment import gpu

        if gpu() is None:  # onnxruntime-gpu lists its GPU providers on any machine; they fail at the session
            return "ONNX Runtime's GPU providers need an NVIDIA GPU, and torch sees none here"
        for provider in on_gpu:
            if started := start_problem(provider):  # listed, but its CUDA libraries may not load
                return f"{started}: btdeploy doctor shows the CUDA and ONNX Runtime versions; or --providers cpu"
    return problem


def _graph_artifact(manifest: Manifest, options: RunOptions) -> Path:
    """The graph a target that reads ONNX runs: the head's whole graph, or with `split` its three
    (every one must exist; the fusion graph is returned)."""
    if options.split:
        from btdeploy.backends.split import split_paths

        return split_paths(manifest, options)["fusion"]
    return manifest.graph_path(options.flavour, options.precision)


def _open_graphs(manifest: Manifest, options: RunOptions, open_graph: GraphOpener, engine: str) -> Backend:
    """The head's whole graph, or with `split` its three graphs as one backend, each opened by the
    target's `open_graph` (a file, and the inputs and outputs the manifest records for it). Every
    graph is held to its manifest record here, before any is opened (the full hash with
    `verify_hash`); split graphs open on their first use."""
    if options.split:
        from btdeploy.backends.split import build_split_backend

        return build_split_backend(manifest, options, open_graph, engine)
    path = _graph_artifact(manifest, options)
    manifest.verify_graph(path, full=options.verify_hash)  # a truncated or replaced graph is named, not opened
    return open_graph(path, manifest.data["inputs"], manifest.data["outputs"])


def _ort_make(manifest: Manifest, options: RunOptions) -> Backend:
    from btdeploy.backends.onnxruntime import open_recorded_graph

    return _open_graphs(manifest, options, partial(open_recorded_graph, manifest, options=options), "onnxruntime")


# The precisions whose ort graphs hold uint8 x int8 GEMMs, which `exact_sums` recodes.
INTEGER_PRECISIONS = (Precision.INT8, Precision.INT8_DYNAMIC)


def multiplies_uint8_by_int8(options: RunOptions) -> bool:
    """Whether the graph `options` name multiplies uint8 activations by int8 weights: the ort INT8
    graphs (the trt ones multiply int8 by int8, exact on every CPU)."""
    return options.flavour == Flavour.ORT and options.precision in INTEGER_PRECISIONS


def _ort_variant(name: str, flavour: Flavour | None, precision: Precision = Precision.FP32) -> BenchVariant:
    return BenchVariant(name, RunOptions(flavour=flavour, precision=precision))


def _native_exact_sums() -> str | None:
    """The instruction sets by which this CPU sums integer products exactly, or None (it saturates)."""
    from btdeploy.cpu import exact_integer_sums

    return ", ".join(exact_integer_sums()) or None


def _sums_exact_here(default_variant: str, options: RunOptions) -> str | None:
    """Why a saturating variant would repeat `default_variant` here, or None (this CPU's kernel saturates)."""
    from btdeploy.backends.onnxruntime import gpu_providers

    if gpu_providers(options.providers):
        return f"a GPU provider has no saturating kernel: the same run as {default_variant}'s"
    if native := _native_exact_sums():
        return f"this CPU sums integer products exactly ({native}): the same run as {default_variant}'s"
    return None


# What `integer_sums` says of an ort INT8 graph whose products this CPU sums two at a time in int16.
SATURATING_SUMS = "saturating int16 pairs (exact_sums=False on a CPU without VNNI or AMX)"


def integer_sums(options: RunOptions) -> str | None:
    """How ONNX Runtime on this CPU sums the uint8 x int8 products of the graph `options` run (the
    ort INT8 graphs, on the CPU provider), for reports; None for any other graph."""
    from btdeploy.backends.onnxruntime import gpu_providers

    if not multiplies_uint8_by_int8(options) or gpu_providers(options.providers):
        return None
    if native := _native_exact_sums():
        return f"exact ({native})"
    if options.exact_sums:
        return "exact (exact_sums: int8 weights recoded to uint8)"
    return SATURATING_SUMS


def _saturating_variant(precision: Precision) -> BenchVariant:
    """An ort INT8 graph on ONNX Runtime's saturating kernel: timed only where it is another kernel."""
    options = RunOptions(flavour=Flavour.ORT, precision=precision, exact_sums=False)
    give_up = "--no-exact-sums: saturating integer sums, less accurate (large itm's int8 graph fails its floor so)"
    return BenchVariant(
        f"ort-{precision}-saturating", options, partial(_sums_exact_here, f"ort-{precision}"), opt_out=give_up
    )


_ORT_GRAPHS: tuple[GraphKind, ...] = (
    (None, Precision.FP32),
    *((flavour, precision) for flavour in Flavour for precision in (Precision.FP32, Precision.FP16, Precision.INT8)),
    (Flavour.ORT, Precision.INT8_DYNAMIC),  # quantized at run time by ONNX Runtime's own operators
)

ONNXRUNTIME = Target(
    name="onnxruntime",
    description="ONNX Runtime on the exported or optimized graphs",
    options=frozenset(
        {
            "flavour",
            "precision",
            "providers",
            "threads",
            "spin",
            "exact_sums",
            "split",
            "verify_hash",
            "provider_fallback",
        }  # fmt: skip
    ),
    graphs=_ORT_GRAPHS,
    make=_ort_make,
    unavailable=_ort_unavailable,
    artifact=_graph_artifact,
    variants=(
        _ort_variant("ort", None),
        _ort_variant("ort-fused", Flavour.ORT),
        # The TensorRT-flavour graph (standard ONNX operators only) run by ONNX Runtime: what the
        # trt graph costs before TensorRT compiles it, and proof that it runs.
        _ort_variant("trt-graph", Flavour.TRT),
        *(
            _ort_variant(f"ort-{precision}", Flavour.ORT, precision)
            for precision in (Precision.FP16, Precision.INT8, Precision.INT8_DYNAMIC)
        ),
        # The same INT8 graphs on ONNX Runtime's saturating kernel, where this CPU has one.
        *(_saturating_variant(precision) for precision in INTEGER_PRECISIONS),
    ),
)


# --- torch (the reference) ------------------------------------------------------------------


def _torch_unavailable(options: RunOptions) -> str | None:
    if options.precision == Precision.FP16 and options.device != "cuda":
        return "the PyTorch reference runs fp16 on a CUDA GPU only: pass device='cuda' (--device cuda)"
    if options.precision == Precision.BF16 and options.device == "cpu":
        from btdeploy.cpu import bf16_problem

        if problem := bf16_problem("the PyTorch reference"):
            return f"{problem}: pass device='cuda' (--device cuda)"
    if options.device == "cuda":
        from btdeploy.backends.tensorrt.environment import gpu

        if gpu() is None:
            return "device='cuda' needs an NVIDIA GPU, and torch sees none here"
    elif options.device != "cpu":
        return f"device {options.device!r}: use 'cpu' or 'cuda'"
    return None


def _torch_make(manifest: Manifest, options: RunOptions) -> Backend:
    from btdeploy.backends.torch_reference import TorchBackend

    checkpoint = Path(options.checkpoint).expanduser() if options.checkpoint is not None else None
    return TorchBackend.from_manifest(manifest, options.device, str(options.precision), options.compile, checkpoint)


def _torch_artifact(manifest: Manifest, options: RunOptions) -> Path:
    return manifest.folder / "manifest.json"  # the reference is rebuilt from the manifest's model source


TORCH = Target(
    name="torch",
    description="the transformers model itself, rebuilt from the manifest",
    options=frozenset({"precision", "device", "compile", "checkpoint"}),
    graphs=((None, Precision.FP32), (None, Precision.FP16), (None, Precision.BF16)),
    make=_torch_make,
    unavailable=_torch_unavailable,
    artifact=_torch_artifact,
    reads_onnx=False,
    variants=(
        BenchVariant("torch-eager", RunOptions()),
        # A peer: what a PyTorch user gets from inductor (compile time is the first call, reported apart).
        BenchVariant("torch-compile", RunOptions(compile=True)),
        # Reduced float: fp16 on a GPU, bf16 on a GPU or a CPU that multiplies bfloat16 natively.
        *(
            BenchVariant(f"torch-{mode}-{precision}", RunOptions(precision=precision, compile=mode == "compile"))
            for mode in ("eager", "compile")
            for precision in (Precision.FP16, Precision.BF16)
        ),
    ),
)


# --- tensorrt -------------------------------------------------------------------------------


def _trt_unavailable(options: RunOptions) -> str | None:
    from btdeploy.backends.tensorrt.environment import unavailable_reason

    return unavailable_reason()


def _trt_artifact(manifest: Manifest, options: RunOptions) -> Path:
    from btdeploy.backends.tensorrt.engines import find_engine
    from btdeploy.backends.tensorrt.environment import require_gpu, require_tensorrt

    trt = require_tensorrt()
    _, capability = require_gpu()
    return find_engine(manifest.folder, str(options.precision), str(trt.__version__), capability)


def _trt_make(manifest: Manifest, options: RunOptions) -> Backend:
    from btdeploy.backends.tensorrt.runner import TensorRTBackend

    return TensorRTBackend(manifest, str(options.precision), get_head(manifest.head).output_names, options.cuda_graphs)


def _trt_check_graph(model: onnx.ModelProto, flavour: Flavour) -> list[str]:
    from btdeploy.backends.tensorrt.operators import check_tensorrt_ops

    return check_tensorrt_ops(model, FLAVOUR_LINES[flavour]).unsupported


def _trt_build(folder: Path, precision: Precision, **settings: Any) -> Path:
    from btdeploy.backends.tensorrt.build import build_engine

    return build_engine(folder, str(precision), **settings)


TENSORRT = Target(
    name="tensorrt",
    description="a TensorRT engine built from the trt graph (btdeploy build)",
    options=frozenset({"precision", "cuda_graphs"}),
    graphs=tuple((flavour, precision) for flavour in FLAVOUR_LINES for precision in ENGINE_PRECISIONS),
    make=_trt_make,
    unavailable=_trt_unavailable,
    artifact=_trt_artifact,
    variants=tuple(
        BenchVariant(f"trt-{precision}{suffix}", RunOptions(Flavour.TRT, precision, cuda_graphs=graphs))
        for precision in ENGINE_PRECISIONS
        for suffix, graphs in (("", False), ("-cudagraph", True))
    ),
    reads_onnx=False,  # it runs an engine; build records the graph the engine came from
    check_graph=_trt_check_graph,
    requirements={flavour: f"TensorRT {line}" for flavour, line in FLAVOUR_LINES.items()},
    build=_trt_build,
    defaults={"flavour": Flavour.TRT, "precision": Precision.FP16},
)

# --- openvino (a peer) ----------------------------------------------------------------------


def _openvino_unavailable(options: RunOptions) -> str | None:
    from btdeploy.backends.openvino import openvino_problem

    if options.precision == Precision.BF16:
        from btdeploy.cpu import bf16_problem

        if problem := bf16_problem("OpenVINO"):
            return f"{problem}: run fp32 or int8 here"
    return openvino_problem()


def _openvino_make(manifest: Manifest, options: RunOptions) -> Backend:
    from btdeploy.backends.openvino import OpenVinoBackend

    precision = "bf16" if options.precision == Precision.BF16 else "f32"

    def open_graph(path: Path, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> Backend:
        return OpenVinoBackend(path, [output["name"] for output in outputs], options.threads, precision)

    return _open_graphs(manifest, options, open_graph, "openvino")


OPENVINO = Target(
    name="openvino",
    description="OpenVINO (CPU; f32 inference precision, bf16 when asked) on the standard-ONNX graphs: a peer",
    options=frozenset({"flavour", "precision", "threads", "split"}),
    # Standard ONNX only: the plain export, and the trt dialect's graphs (Q/DQ INT8 included); bf16
    # is OpenVINO's inference precision on the FP32 graphs, where the CPU multiplies bfloat16.
    graphs=(
        (None, Precision.FP32),
        (Flavour.TRT, Precision.FP32),
        (Flavour.TRT, Precision.INT8),
        (None, Precision.BF16),
        (Flavour.TRT, Precision.BF16),
    ),
    make=_openvino_make,
    unavailable=_openvino_unavailable,
    artifact=_graph_artifact,
    compiles_per_shape=True,
    variants=(
        BenchVariant("openvino-fp32", RunOptions()),
        BenchVariant("openvino-fused-fp32", RunOptions(flavour=Flavour.TRT)),
        BenchVariant("openvino-int8", RunOptions(flavour=Flavour.TRT, precision=Precision.INT8)),
        BenchVariant("openvino-bf16", RunOptions(precision=Precision.BF16)),
        BenchVariant("openvino-fused-bf16", RunOptions(flavour=Flavour.TRT, precision=Precision.BF16)),
    ),
)

TARGETS: dict[str, Target] = {target.name: target for target in (ONNXRUNTIME, TORCH, TENSORRT, OPENVINO)}
# Bench order: the reference first, then what btdeploy makes, cheapest to build first, then peers.
_BENCH_ORDER = (TORCH, ONNXRUNTIME, TENSORRT, OPENVINO)


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise BtDeployError(f"unknown backend {name!r}: choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def build_backend(manifest: Manifest, backend: str = "onnxruntime", **options: Any) -> Backend:
    """The one way to build a backend: by target name, with options that target checks."""
    target = get_target(backend)
    return target.make(manifest, target.resolve(options))


def build_split(manifest: Manifest, backend: str = "onnxruntime", **options: Any) -> SplitBackend:
    """A head's text, vision and fusion graphs as one backend, on a target that runs them."""
    return cast("SplitBackend", build_backend(manifest, backend, split=True, **options))


def graph_checks(flavour: Flavour) -> dict[str, Callable[[onnx.ModelProto], list[str]]]:
    """The checks a graph of this flavour must pass, one per target that consumes it and declares one."""
    checks: dict[str, Callable[[onnx.ModelProto], list[str]]] = {}
    for target in TARGETS.values():
        check = target.check_graph
        if check is not None and flavour in target.flavours:
            checks[target.name] = lambda model, check=check: check(model, flavour)  # type: ignore[misc]
    return checks


def graph_requirements(flavour: Flavour) -> dict[str, str]:
    """What each target that consumes this flavour needs to take it (recorded in the manifest)."""
    return {t.name: t.requirements[flavour] for t in TARGETS.values() if flavour in t.requirements}


def bench_variants() -> dict[str, tuple[Target, BenchVariant]]:
    return {variant.name: (target, variant) for target in _BENCH_ORDER for variant in target.variants}


def bench_skip_reason(target: Target, variant: BenchVariant, manifest: Manifest, options: RunOptions) -> str | None:
    """Why a bench, timing `variant` with `options`, leaves it out here: it would repeat another
    variant, its target cannot run on this machine, or its artifact is missing; or None."""
    redundant = variant.redundant and variant.redundant(options)
    return redundant or target.unavailable(options) or target.missing(manifest, options)


def with_machine(target: Target, options: RunOptions, threads: int, device: str) -> RunOptions:
    """A variant's options with the bench's thread count and device, where the target reads them."""
    providers = ("cuda", "cpu") if device == "cuda" else ("cpu",)
    machine: dict[str, Any] = {"threads": threads, "device": device, "providers": providers}
    return replace(options, **{k: v for k, v in machine.items() if k in target.options})


def variant_graph(target: Target, options: RunOptions) -> str | None:
    """The ONNX graph a variant runs (or builds its engine from), for reports and profilers."""
    return graph_file(options.flavour, options.precision) if target.reads_onnx else None
