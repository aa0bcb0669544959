"""ONNX Runtime backend (onnxruntime-gpu: its CPU provider works on machines without a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.graph_names import Precision
from btdeploy.artifacts.onnx_files import missing_weights_problem
from btdeploy.cpu import sums_saturate_here
from btdeploy.errors import BtDeployError
from btdeploy.forks import LoadedProcess
from btdeploy.heap import free_and_give_back
from btdeploy.progress import warn

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def provider_problem(providers: tuple[str, ...] | list[str] | None) -> str | None:
    """Why the requested providers cannot run here, or None."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    for provider in [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers or ()]:
        if provider not in available:
            return f"ONNX Runtime provider {provider} is not available here (available: {', '.join(available)})"
    return None


def gpu_providers(providers: tuple[str, ...] | list[str] | None) -> list[str]:
    """The requested providers that run on an NVIDIA GPU (CUDA, TensorRT), by their full names."""
    names = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers or ()]
    return [name for name in names if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]


def resolve_providers(providers: tuple[str, ...] | list[str] | None) -> list[str]:
    if not providers:
        return ["CPUExecutionProvider"]
    problem = provider_problem(providers)
    if problem:
        raise BtDeployError(problem)
    return [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]


# What btdeploy asks of a provider beyond its defaults, here and in the Triton configs it writes
# (serve/triton_repo.py). The CUDA provider multiplies FP32 in TF32 by default on Ampere and newer
# GPUs (operands rounded to 10 bits, FP16's step): an FP32 graph would then miss FP32's bound (on
# an H200, base itm by 4.7x at batch 32), and every FP32 op an FP16 graph keeps would be rounded too.
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def provider_entries(names: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """The providers as InferenceSession takes them: a name, or a name with its options."""
    return [(name, PROVIDER_OPTIONS[name]) if name in PROVIDER_OPTIONS else name for name in names]


# The session config entry that stops ONNX Runtime's workers spinning when a run ends ("1").
STOP_SPINNING_AFTER_RUN = "session.force_spinning_stop"
# The one that lets them spin between the operators of a run ("1", ONNX Runtime's default) or not.
SPIN_WITHIN_RUN = "session.intra_op.allow_spinning"


def session_options(threads: int | None = None, spin: bool = True) -> Any:
    """The options of every ONNX Runtime session btdeploy opens.

    By default ONNX Runtime's worker threads keep spinning after a run ends (about 33 ms of CPU
    per run on base), waiting for the same session's next run. Where other sessions share the
    process (the split towers run one after another; the bench, `check` and the rank workload
    hold several graphs) that spin takes a core from whatever runs next: base itm int8-dynamic at
    1 x 16 took 257 ms right after the FP32 graph's run against 194 ms with the spin stopped at
    the end of each run (median of 12 paired rounds, 2-core Zen 4). So it always stops there.

    Spinning between the operators of one run (`spin`) makes a run on cores of its own faster
    (base itm int8-dynamic 1 x 16: 197.5 against 210.8 ms without). Where another busy process
    shares the cores it is the other way round: a spinning worker holds a core the other process
    needs, and its partner waits for it at every operator. Beside a process spinning on one of the
    two cores the same run slowed 2.14x with spinning and 1.56x without (benchmarks/busy_neighbour.py);
    two serve replicas on 2 cores served more without it (serve/settings.py, `replicas_spin`).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry(STOP_SPINNING_AFTER_RUN, "1")
    options.add_session_config_entry(SPIN_WITHIN_RUN, "1" if spin else "0")
    return options


def _load_problem(model_path: Path, error: Exception, version: str) -> str:
    """Why ONNX Runtime refused a graph, and what to do. Bytes it cannot parse are a damaged file;
    a graph it parses but cannot run (an operator, opset or type this ONNX Runtime lacks: a graph
    made for a newer one, or not by btdeploy) would only be written the same way again."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    missing = missing_weights_problem(model_path)
    if missing:
        return missing
    if type(error).__name__ in {"InvalidProtobuf", "NoSuchFile"}:
        return (
            f"ONNX Runtime cannot load {model_path} ({first_line}); the file is damaged or incomplete: "
            "export the head again"
        )
    return (
        f"ONNX Runtime {version} cannot run {model_path} ({first_line}): the graph needs an operator, opset or "
        "type this ONNX Runtime lacks; install the ONNX Runtime its manifest records (`versions`), "
        "or make the graph again with btdeploy here"
    )


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        output_names: list[str],
        providers: tuple[str, ...] | list[str] | None = None,
        threads: int | None = None,
        provider_fallback: bool = False,
        reduced_precision: bool = False,
        spin: bool = True,
        exact_sums: bool = False,
    ) -> None:
        import onnxruntime as ort

        if not Path(model_path).is_file():
            raise BtDeployError(f"{model_path} is missing: export the head again (btdeploy export)")
        # Asked before ONNX Runtime opens the graph, which would print its own file-size error to stderr first.
        missing = missing_weights_problem(Path(model_path))
        if missing:
            raise BtDeployError(missing)
        options = session_options(threads, spin)
        self.providers = resolve_providers(providers)
        # Only a reduced-precision graph holds FP16 operators; only the CPU provider needs the rewrites.
        on_cpu = self.providers == ["CPUExecutionProvider"]
        rewrite = _CpuRewrites(reduced_precision and on_cpu, exact_sums and on_cpu and sums_saturate_here())
        source = rewrite.source(Path(model_path), options)
        self.attention_in_fp32, self.quantize_in_fp32 = rewrite.attention_in_fp32, rewrite.quantize_in_fp32
        self.unsigned_weights = rewrite.unsigned_weights
        entries = provider_entries(self.providers)
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=entries)
        except Exception as error:
            raise BtDeployError(_load_problem(Path(model_path), error, ort.__version__)) from None
        self.output_names = output_names
        graph_outputs = {o.name for o in self.session.get_outputs()}
        lacking = [name for name in output_names if name not in graph_outputs]
        if lacking:
            raise BtDeployError(
                f"{model_path} lacks output(s) {', '.join(lacking)}: it was not exported by btdeploy for this head"
            )
        self.path = Path(model_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # What the session really runs on: ONNX Runtime drops a provider that fails to start.
        running = self.session.get_providers()
        dropped = [p for p in self.providers if p not in running]
        if dropped and provider_fallback:
            name, where = Path(model_path).name, ", ".join(running)
            warn(f"ONNX Runtime could not start {', '.join(dropped)}: {name} runs on {where}")
        elif dropped:
            raise BtDeployError(
                f"ONNX Runtime could not start {', '.join(dropped)} for {Path(model_path).name} (it runs on "
                f"{', '.join(running)}): check the GPU and CUDA libraries, or run on the CPU (--providers cpu; "
                "in btdeploy.load providers=['cpu'], or provider_fallback=True to fall back with a warning)"
            )
        self.providers = running
        on_gpu = running != ["CPUExecutionProvider"]
        self.loaded_in = LoadedProcess(self, "ONNX Runtime's thread pool", on_gpu=on_gpu, kept=True)
        self.description = f"{Path(model_path).name} on {', '.join(running)}"
        widened = [f"{n} FP16 {what}" for n, what in ((self.attention_in_fp32, "attention cores"),
                   (self.quantize_in_fp32, "QuantizeLinear")) if n]  # fmt: skip
        if widened:
            self.description += f" ({' and '.join(widened)} run in FP32)"
        if self.unsigned_weights:
            self.description += f" ({self.unsigned_weights} int8 weights recoded to uint8: exact integer sums)"

    def __del__(self) -> None:
        # Never in a child that inherited this backend: forks.py holds it there for good.
        free_and_give_back(self, "session")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.loaded_in.first_run_in_child():
            self.loaded_in.say_one_thread()
        session_feeds: dict[str, Any] = {name: feeds[name] for name in self.input_names}
        try:
            values = self.session.run(self.output_names, session_feeds)
        except Exception as error:
            raise BtDeployError(f"ONNX Runtime failed to run the model: {str(error).strip().splitlines()[0]}") from None
        return dict(zip(self.output_names, values, strict=True))


class _CpuRewrites:
    """The graph to open on the CPU provider: the file itself, or its bytes rewritten (the graph on
    disk is left as it is; weights it keeps as external data are still read from beside the file).
    `fp32_stand_ins`: every FP16 Attention and FP16 QuantizeLinear run in FP32 (backends/cpu_fp16.py
    says why). `exact_sums`: the integer GEMMs' int8 weights recoded to uint8, held in the bytes
    (backends/exact_sums.py). The counts say what was rewritten."""

    def __init__(self, fp32_stand_ins: bool, exact_sums: bool) -> None:
        self.fp32_stand_ins, self.exact_sums = fp32_stand_ins, exact_sums
        self.attention_in_fp32 = self.quantize_in_fp32 = self.unsigned_weights = 0

    def source(self, path: Path, options: Any) -> str | bytes:
        if not (self.fp32_stand_ins or self.exact_sums):
            return str(path)
        from btdeploy.artifacts.onnx_files import PROTOBUF_LIMIT, load_graph, serialized_bytes
        from btdeploy.backends.cpu_fp16 import attention_in_fp32, quantize_in_fp32
        from btdeploy.backends.exact_sums import unsigned_weights

        try:  # the weights stay on disk, read from there by ONNX Runtime (and by unsigned_weights where recoded)
            model = load_graph(path, "", load_weights=False)
        except Exception:
            return str(path)  # ONNX Runtime reports the damaged file in the caller's words
        if self.fp32_stand_ins:
            self.attention_in_fp32, self.quantize_in_fp32 = attention_in_fp32(model), quantize_in_fp32(model)
        if self.exact_sums:
            self.unsigned_weights = unsigned_weights(model, str(path.parent))
        if not (self.attention_in_fp32 or self.quantize_in_fp32 or self.unsigned_weights):
            return str(path)
        if serialized_bytes(model) > PROTOBUF_LIMIT:
            if self.unsigned_weights:
                raise BtDeployError(
                    f"exact_sums: {path.name} with its recoded weights is over ONNX's 2 GB limit for one graph "
                    "held in memory; run it with exact_sums=False (--no-exact-sums), or on a CPU with VNNI or AMX "
                    "(exact sums natively)"
                )
            self.attention_in_fp32 = self.quantize_in_fp32 = 0
            return str(path)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        return model.SerializeToString()


_ONNX_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}


def check_graph_io(backend: OnnxRuntimeBackend, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
    """Refuse a graph whose inputs or outputs are not the ones its manifest declares: names, dtypes,
    rank and static dims (a graph swapped in from another head fails here, before it runs)."""
    path = backend.path
    for kind, declared, actual in (
        ("input", inputs, backend.session.get_inputs()),
        ("output", outputs, backend.session.get_outputs()),
    ):
        found = {arg.name: arg for arg in actual}
        for entry in declared:
            arg = found.get(entry["name"])
            if arg is None:
                raise BtDeployError(
                    f"{path} has no {kind} {entry['name']!r} (it has {', '.join(found)}): it is not the graph "
                    "its manifest describes; make it again"
                )
            problem = _mismatch(entry, _ONNX_TYPES.get(arg.type, arg.type), list(arg.shape))
            if problem:
                raise BtDeployError(f"{path} {kind} {entry['name']!r} {problem}: it is not the graph its manifest "
                                    "describes; make it again")  # fmt: skip


def _mismatch(entry: dict[str, Any], dtype: str, shape: list[Any]) -> str | None:
    if "dtype" in entry and entry["dtype"] != dtype:
        return f"is {dtype}, the manifest says {entry['dtype']}"
    declared = entry.get("shape")
    if declared is None:
        return None
    if len(declared) != len(shape):
        return f"has shape {shape}, the manifest says {declared}"
    for want, got in zip(declared, shape, strict=True):
        if isinstance(want, int) and isinstance(got, int) and want != got:
            return f"has shape {shape}, the manifest says {declared}"
    return None


def _may_hold_fp16(manifest: Any, options: Any) -> bool:
    """Whether the graph may hold FP16 operators the CPU provider runs in FP32 instead: an FP16 graph,
    or an INT8 one unless its record says FP32 outside the Q/DQ (the ort flavour's). Finding out
    means parsing the whole graph: about a second on base, for nothing on an FP32-around-INT8 graph."""
    if options.precision == Precision.FP16:
        return True
    if options.precision != Precision.INT8:
        return False
    record = manifest.precision_record(options.flavour, options.precision) or {}
    return bool(record.get("high_precision") != "fp32")


def open_recorded_graph(
    manifest: Any, path: Path, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], options: Any
) -> OnnxRuntimeBackend:
    """A session on one of a head's graphs (already held to its manifest record), held to its
    declared inputs and outputs; `options` are RunOptions."""
    from btdeploy.backends.targets import multiplies_uint8_by_int8

    names = [entry["name"] for entry in outputs]
    reduced = _may_hold_fp16(manifest, options)
    backend = OnnxRuntimeBackend(
        path,
        names,
        options.providers,
        options.threads,
        options.provider_fallback,
        reduced,
        options.spin,
        options.exact_sums and multiplies_uint8_by_int8(options),  # no other graph is parsed for it
    )
    check_graph_io(backend, inputs, outputs)
    return backend
