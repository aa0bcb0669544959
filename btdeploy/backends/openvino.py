"""OpenVINO on btdeploy's standard-ONNX graphs: the peer a CPU user would otherwise pick.

Pinned to f32 inference precision, so that it is compared at the same accuracy as ONNX Runtime
(OpenVINO would otherwise run bf16 on CPUs that have it), unless bf16 is asked for: then the FP32
graph runs in bf16 and is held to bf16's tolerance. INT8 comes from the graph's Q/DQ nodes.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.errors import BtDeployError
from btdeploy.forks import LoadedProcess
from btdeploy.imports import INSTALL_PEERS, serial_imports
from btdeploy.signals import signal_stack_kept

TELEMETRY_MODULE = "openvino_telemetry"


def import_openvino() -> Any:
    """`openvino`, imported without its usage telemetry. On import OpenVINO sends an event to
    Google Analytics unless its user opted out, counts the imports in ~/intel, and forks a child
    to send from, in a process that may run other threads (Python 3.12 warns of deadlocks there);
    0.17 s of each import here. Its conversion tools take their own stub where the telemetry
    module cannot be imported, so that module is hidden while openvino imports, and only then.
    Where the caller's code imported either first, it is left as they chose."""
    with serial_imports():  # the hiding below is for this import alone, in every thread
        if "openvino" in sys.modules or TELEMETRY_MODULE in sys.modules:
            import openvino

            return openvino
        sys.modules[TELEMETRY_MODULE] = None  # type: ignore[assignment]  # None: Python's "cannot be imported"
        try:
            import openvino
        finally:
            del sys.modules[TELEMETRY_MODULE]
        return openvino


def openvino_problem() -> str | None:
    try:
        import_openvino()
    except ImportError:
        return f"OpenVINO is not installed: {INSTALL_PEERS}"
    return None


def compile_settings(threads: int | None, profile: bool = False, inference_precision: str = "f32") -> dict[str, str]:
    """How every btdeploy compile of an OpenVINO model is set: f32 inference precision unless told
    (bf16), one request at a time, `threads` threads where given, and its per-layer counters where
    `profile`."""
    settings = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        settings["INFERENCE_NUM_THREADS"] = str(threads)
    if profile:
        settings["PERF_COUNT"] = "YES"
    return settings


def compile_on_cpu(core: Any, model: Any, settings: dict[str, str]) -> Any:
    """`core.compile_model(model, "CPU", settings)`, the one way btdeploy and its benchmarks compile: the
    signal stack OpenVINO sets on this thread, freed with the model, does not stay this thread's
    (`signals.signal_stack_kept`), so a Ctrl-C after models are freed stops the process cleanly."""
    with signal_stack_kept():
        return core.compile_model(model, "CPU", settings)


class OpenVinoBackend:
    name = "openvino"

    def __init__(
        self, model_path: Path, output_names: list[str], threads: int | None = None, inference_precision: str = "f32"
    ) -> None:
        ov = import_openvino()
        core = ov.Core()
        settings = compile_settings(threads, inference_precision=inference_precision)
        try:
            self.compiled = compile_on_cpu(core, core.read_model(str(model_path)), settings)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BtDeployError(f"OpenVINO cannot compile {model_path.name} ({first[:200]})") from None
        self.request = self.compiled.create_infer_request()
        # One request: a second thread calling while it runs gets "Infer Request is busy".
        self.request_lock = threading.Lock()
        pool = "OpenVINO's thread pool (TBB)"
        self.loaded_in = LoadedProcess(self, pool, kept=True, renew=_new_request_lock, process_wide=True)
        self.outputs = {name: self.compiled.output(name) for name in output_names}
        precision = f"{inference_precision} inference precision"
        self.description = f"OpenVINO {ov.__version__} CPU ({precision}) on {model_path.name}"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.loaded_in.first_run_in_child():
            self.loaded_in.say_one_thread()
        with self.request_lock:
            results = self.request.infer(feeds)
            # copied out before the next run writes the request's output tensors
            return {name: np.array(results[port]) for name, port in self.outputs.items()}


def _new_request_lock(backend: OpenVinoBackend) -> None:
    """In a forked child: a lock a parent's thread held at the fork would stay held there for good."""
    backend.request_lock = threading.Lock()
