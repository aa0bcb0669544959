"""TensorRT backend: one engine, torch CUDA tensors as buffers, its own stream, optional CUDA graphs.

Only imported when asked for; needs TensorRT 10.14+ and an NVIDIA GPU (see tensorrt_env)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest
from btdeploy.backends.base import torch_feed
from btdeploy.backends.tensorrt.engines import EngineRecord, check_compatible, find_engine, record_file
from btdeploy.backends.tensorrt.environment import require_gpu, require_tensorrt
from btdeploy.errors import BtDeployError
from btdeploy.forks import LoadedProcess
from btdeploy.progress import say, warn


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, precision: str, output_names: list[str], cuda_graphs: bool = False) -> None:
        trt = require_tensorrt()
        gpu_name, capability = require_gpu()
        import torch

        engine_path = find_engine(manifest.folder, precision, str(trt.__version__), capability)
        self.record = EngineRecord.read(record_file(engine_path))
        check_compatible(self.record, str(trt.__version__), gpu_name, capability)
        self.profile = self.record.engine_profile
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BtDeployError(f"TensorRT cannot deserialize {engine_path}: build it again with btdeploy build")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = output_names
        self.dtypes = {n: _torch_dtype(torch, trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.cuda_graphs = cuda_graphs
        # One context and one set of buffers per shape: a second thread would overwrite the inputs
        # of a run in flight, so runs take turns.
        self.run_lock = threading.Lock()
        self.loaded_in = LoadedProcess(self, "TensorRT", on_gpu=True)
        # Per input shape: device buffers allocated once and reused, and the CUDA graph captured on
        # them (None where capture failed and plain runs are used instead).
        self.buffers: dict[tuple[tuple[int, ...], ...], tuple[dict[str, Any], dict[str, Any]]] = {}
        self.graphs: dict[tuple[tuple[int, ...], ...], Any] = {}
        self.bound: tuple[tuple[int, ...], ...] | None = None  # the shape the context's addresses point at
        self.description = f"{engine_path.name} on {gpu_name}" + (" with CUDA graphs" if cuda_graphs else "")

    def _buffers(self, key: tuple[tuple[int, ...], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        """This shape's device buffers (allocated on first use), bound to the execution context."""
        torch = self.torch
        if key not in self.buffers:
            inputs = {
                name: torch.empty(shape, dtype=self.dtypes[name], device="cuda")
                for name, shape in zip(self.input_names, key, strict=True)
            }
            for name, tensor in inputs.items():
                self.context.set_input_shape(name, tuple(tensor.shape))
            outputs = {
                name: torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
                for name in self.output_names
            }
            self.buffers[key] = (inputs, outputs)
            self.bound = None
        inputs, outputs = self.buffers[key]
        if self.bound != key:
            for name, tensor in inputs.items():
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
            for name, tensor in outputs.items():
                self.context.set_tensor_address(name, tensor.data_ptr())
            self.bound = key
        return inputs, outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BtDeployError("TensorRT failed to run the engine: see its log above")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.loaded_in.first_run_in_child()  # refused in a forked child: its CUDA context is the parent's
        self.profile.check_feeds({name: tuple(feeds[name].shape) for name in self.input_names})
        key = tuple(tuple(feeds[name].shape) for name in self.input_names)
        with self.run_lock:
            return self._run_locked(feeds, key)

    def _run_locked(self, feeds: dict[str, np.ndarray], key: tuple[tuple[int, ...], ...]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            inputs, outputs = self._buffers(key)
            for name in self.input_names:
                inputs[name].copy_(torch.from_numpy(torch_feed(feeds[name])), non_blocking=True)
            graph = self._graph(key) if self.cuda_graphs else None
            if graph is not None:
                graph.replay()
            else:
                self._execute()
        self.stream.synchronize()
        return {name: value.float().cpu().numpy() for name, value in outputs.items()}

    def _graph(self, key: tuple[tuple[int, ...], ...]) -> Any:
        """This shape's CUDA graph, captured after one plain run (TensorRT finishes its lazy
        allocations there); None, with a warning, where capture fails: plain runs then."""
        if key not in self.graphs:
            torch = self.torch
            say(f"tensorrt: capturing a CUDA graph for shapes {key}")
            self._execute()
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self._execute()
            except Exception as error:  # capture is refused by some engines and drivers
                warn(f"tensorrt: CUDA graph capture failed for shapes {key} ({error}); running without it")
                graph = None
            self.graphs[key] = graph
        return self.graphs[key]


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise BtDeployError(f"the engine has a tensor of type {dtype}, which btdeploy does not bind")
    return table[dtype]
