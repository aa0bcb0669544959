"""TensorRT backend: one engine, torch CUDA tensors as buffers, its own stream, optional CUDA graphs.

Only imported when asked for; needs TensorRT 10.14+ and an NVIDIA GPU (see tensorrt_env)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest
from btdeploy.backends.tensorrt.engines import EngineRecord, check_compatible, find_engine, record_file
from btdeploy.backends.tensorrt.environment import require_gpu, require_tensorrt
from btdeploy.errors import BtDeployError
from btdeploy.progress import say


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
        self.graphs: dict[tuple[tuple[int, ...], ...], tuple[Any, dict[str, Any], dict[str, Any]]] = {}
        self.description = f"{engine_path.name} on {gpu_name}" + (" with CUDA graphs" if cuda_graphs else "")

    def _bind(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Device buffers for one input shape; inputs copied in, outputs allocated to the engine's shapes."""
        torch = self.torch
        inputs = {}
        for name in self.input_names:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", self.dtypes[name])
            inputs[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return inputs, outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BtDeployError("TensorRT failed to run the engine: see its log above")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.profile.check_feeds({name: tuple(feeds[name].shape) for name in self.input_names})
        torch = self.torch
        with torch.cuda.stream(self.stream):
            if self.cuda_graphs:
                outputs = self._replay(feeds)
            else:
                _inputs, outputs = self._bind(feeds)
                self._execute()
        self.stream.synchronize()
        return {name: value.float().cpu().numpy() for name, value in outputs.items()}

    def _replay(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        """Capture one CUDA graph per input shape (after a plain run, as TensorRT asks), then replay it."""
        torch = self.torch
        key = tuple(tuple(feeds[name].shape) for name in self.input_names)
        if key not in self.graphs:
            say(f"tensorrt: capturing a CUDA graph for shapes {key}")
            inputs, outputs = self._bind(feeds)
            self._execute()  # lets TensorRT finish lazy allocations for this shape
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute()
            self.graphs[key] = (graph, inputs, outputs)
        graph, inputs, outputs = self.graphs[key]
        for name in self.input_names:
            inputs[name].copy_(torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.dtypes[name]))
        graph.replay()
        return outputs


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
