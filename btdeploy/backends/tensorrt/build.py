"""`btdeploy build`: a strongly typed TensorRT engine from model.trt.<precision>.onnx.

Precision comes from the graph (Cast nodes, Q/DQ pairs), so no precision builder flags are
set: TensorRT 11 removed them. TensorRT API used directly; it is thinner than wrapping
Polygraphy's loaders for one build with a progress monitor and a timing cache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_bytes
from btdeploy.artifacts.graph_names import Flavour, Precision, graph_file, parse_flavour
from btdeploy.artifacts.locks import head_lock
from btdeploy.artifacts.manifest import Manifest, read_manifest
from btdeploy.artifacts.onnx_files import graph_sha256
from btdeploy.backends.tensorrt.engines import ENGINE_PRECISIONS, EngineRecord, engine_file, parse_version, record_file
from btdeploy.backends.tensorrt.environment import require_gpu, require_tensorrt
from btdeploy.backends.tensorrt.operators import FLAVOUR_LINES
from btdeploy.backends.tensorrt.profiles import EngineProfile, derive_profile
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.progress import say
from btdeploy.signals import HeldStops, interrupts_deferred


def _network_flags(trt: Any) -> int:
    # TensorRT 11 networks are always strongly typed; 10.x asks for it with a flag.
    if parse_version(str(trt.__version__))[0] >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _progress_monitor(trt: Any, stops: HeldStops) -> Any:
    class Monitor(trt.IProgressMonitor):  # type: ignore[misc,name-defined,unused-ignore]
        """Prints each build phase once, and ends the build early on Ctrl-C or SIGTERM (held
        meanwhile, so that no exception is raised inside TensorRT's callback)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started = time.monotonic()

        def phase_start(self, parent: str | None, name: str, steps: int) -> None:
            say(f"  build: {name} ({steps} steps)")

        def step_complete(self, name: str, step: int) -> bool:
            return not stops.requested  # False cancels the build

        def phase_finish(self, name: str) -> None:
            say(f"  build: {name} done ({time.monotonic() - self.started:.0f}s)")

    return Monitor()


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> Any:
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BtDeployError(f"TensorRT's ONNX parser refused {onnx_path.name}: {'; '.join(errors[:3])}")
    return network, parser


def _add_profile(builder: Any, config: Any, network: Any, profile: EngineProfile) -> None:
    trt_profile = builder.create_optimization_profile()
    shapes = profile.input_shapes()
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        low, opt, high = shapes[name]
        trt_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(trt_profile)


def choose_graph(
    manifest: Manifest, precision: Precision, tensorrt_version: str, flavour: Flavour | None = None
) -> tuple[Path, str]:
    """The graph the installed TensorRT can parse, newest dialect first, and why it was chosen."""
    installed = parse_version(tensorrt_version)[:2]
    passed_over = []
    for candidate in [flavour] if flavour else list(FLAVOUR_LINES):
        line = FLAVOUR_LINES[candidate]
        path = manifest.folder / graph_file(candidate, precision)
        if installed < parse_version(line)[:2]:
            passed_over.append(f"{path.name} needs TensorRT {line}")
        elif not path.is_file():
            passed_over.append(
                f"{path.name} does not exist (btdeploy quantize {manifest.folder} --flavour {candidate} "
                f"--precision {precision})"
            )
        else:
            manifest.verify_graph(path, full=True)  # the engine records this graph's sha256 as its source
            why = f"TensorRT {tensorrt_version} parses {candidate} graphs (they need {line})"
            return path, why + (f"; passed over: {'; '.join(passed_over)}" if passed_over else "")
    raise BtDeployError(f"no {precision} graph that TensorRT {tensorrt_version} can parse: {'; '.join(passed_over)}")


def build_engine(
    folder: Path,
    precision: Precision | str,
    batch: str | None = None,
    seq_len: str | None = None,
    timing_cache: Path | None = None,
    workspace_gb: float = 4.0,
    flavour: Flavour | str | None = None,
) -> Path:
    """A strongly typed engine from the newest graph dialect the installed TensorRT parses (or `flavour`)."""
    flavour = parse_flavour(flavour, "--flavour")
    if flavour is not None and flavour not in FLAVOUR_LINES:
        raise BtDeployError(f"--flavour {flavour}: TensorRT builds from {', '.join(FLAVOUR_LINES)} graphs")
    if precision not in ENGINE_PRECISIONS:
        raise BtDeployError(f"--precision {precision!r}: TensorRT engines are {', '.join(ENGINE_PRECISIONS)}")
    precision = Precision(precision)
    if workspace_gb <= 0:
        raise BtDeployError(f"--workspace {workspace_gb}: give the builder's scratch memory in GB, above 0")
    trt = require_tensorrt()  # first, so a machine without it is told at once
    gpu_name, capability = require_gpu()
    # Under the head's lock, so that no quantize swaps the graph in while it is read.
    with head_lock(Path(folder), f"btdeploy build --precision {precision}"):
        manifest = read_manifest(folder)
        profile = derive_profile(get_head(manifest.head), manifest.config, batch, seq_len)
        onnx_path, why = choose_graph(manifest, precision, str(trt.__version__), flavour)
        say(f"build {manifest.head} {precision}: {onnx_path.name}, because {why}")
        target = folder / engine_file(precision, str(trt.__version__), capability)
        say(f"build {manifest.head} {precision}: {onnx_path.name} on {gpu_name}, batch {profile.batch}, "
            f"text length {profile.text_length} -> {target.name}")  # fmt: skip
        started = time.monotonic()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, _parser = _parse(trt, builder, logger, onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
        _add_profile(builder, config, network, profile)
        cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
        # Minutes in native code: a stop is held, the monitor cancels the build at its next step,
        # and the stop is raised when the build returns, before anything is written.
        with interrupts_deferred() as stops:
            config.progress_monitor = _progress_monitor(trt, stops)
            serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BtDeployError(f"TensorRT failed to build {onnx_path.name}: see its log above")
        write_bytes(target, bytes(memoryview(serialized)))  # temporary name, renamed when complete
        if timing_cache:
            write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        record = EngineRecord(
            precision=precision,
            tensorrt_version=str(trt.__version__),
            gpu_name=gpu_name,
            compute_capability=capability,
            onnx_file=onnx_path.name,
            onnx_sha256=graph_sha256(onnx_path),
            profile=profile.to_json(),
            build_seconds=round(time.monotonic() - started, 1),
            workspace_gb=workspace_gb,
            timing_cache=str(timing_cache) if timing_cache else None,
        )
        record.write(record_file(target))
        say(f"build {manifest.head} {precision}: wrote {target} ({target.stat().st_size / 2**20:.1f} MiB) "
            f"in {record.build_seconds:.0f}s")  # fmt: skip
        return target
