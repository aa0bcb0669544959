"""A Triton model repository checked before anyone ships it: every config.pbtxt parsed with Triton's
own ModelConfig schema (shipped in tritonclient), then what the schema cannot see: tensor names,
types and dims against the ONNX graph, preferred batch sizes within max_batch_size, the files each
model needs, and ensembles whose steps connect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from btdeploy.artifacts.onnx_files import absent_weight_files, load_graph
from btdeploy.errors import BtDeployError
from btdeploy.imports import INSTALL_SERVE
from btdeploy.serve.triton_config import TRITON_TYPES


def model_config_schema() -> Any:
    """Triton's ModelConfig message class, from tritonclient (the serve extra)."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise BtDeployError(f"checking a Triton repository needs tritonclient: {INSTALL_SERVE}") from None
    return model_config_pb2.ModelConfig


def parse_config(text: str) -> Any:
    """A ModelConfig message, or ValueError with the parser's reason."""
    from google.protobuf import text_format

    schema = model_config_schema()
    try:
        return text_format.Parse(text, schema())
    except text_format.ParseError as error:
        raise ValueError(str(error)) from None


def check_repository(repo: Path) -> list[str]:
    problems: list[str] = []
    configs: dict[str, Any] = {}
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        path = folder / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{folder.name}: no config.pbtxt")
            continue
        try:
            configs[folder.name] = parse_config(path.read_text())
        except ValueError as error:
            problems.append(f"{folder.name}/config.pbtxt does not parse as Triton's ModelConfig: {error}")
    for name, config in configs.items():
        problems += [f"{name}: {problem}" for problem in _check_model(repo / name, config, configs)]
    return problems


def _check_model(folder: Path, config: Any, configs: dict[str, Any]) -> list[str]:
    problems = []
    if config.name != folder.name:
        problems.append(f"name {config.name!r} differs from its folder")
    if not (folder / "1").is_dir():
        problems.append("no version folder 1/")
    for size in config.dynamic_batching.preferred_batch_size:
        if not 0 < size <= config.max_batch_size:
            problems.append(f"preferred batch size {size} is outside 1..max_batch_size {config.max_batch_size}")
    if config.platform == "onnxruntime_onnx":
        problems += _check_onnx(folder, config)
    elif config.platform == "tensorrt_plan":
        plan = folder / "1" / "model.plan"
        if not plan.is_file() or plan.stat().st_size == 0:
            problems.append("1/model.plan is missing or empty")
        for spec in config.optimization.cuda.graph_spec:
            if spec.batch_size > config.max_batch_size:
                problems.append(f"CUDA graph batch size {spec.batch_size} exceeds max_batch_size")
    elif config.backend == "python":
        for needed in ("1/model.py", "1/processor/processor_config.json"):
            if not (folder / needed).is_file():
                problems.append(f"{needed} is missing")
    elif config.platform == "ensemble":
        problems += _check_ensemble(config, configs)
    else:
        problems.append(f"unexpected platform {config.platform!r} / backend {config.backend!r}")
    return problems


def graph_io(path: Path) -> dict[str, list[tuple[str, str, list[int]]]]:
    """(name, numpy dtype, dims with -1 for dynamic) of a graph's inputs and outputs, weights not read."""
    import numpy as np

    model = load_graph(path, "write the repository again", load_weights=False)
    io = {}
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        io[kind] = [
            (
                value.name,
                np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name,
                [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim],
            )
            for value in values
        ]
    return io


def _type_name(elem_type: int) -> str:
    import numpy as np

    return TRITON_TYPES.get(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name, f"onnx type {elem_type}")


def _check_onnx(folder: Path, config: Any) -> list[str]:
    path = folder / "1" / "model.onnx"
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        return ["1/model.onnx is missing"]
    model = load_graph(path, "write the repository again", load_weights=False)
    problems = [
        f"external data file {name} is missing beside {path.name}" for name in absent_weight_files(model, path.parent)
    ]
    for kind, declared, actual in (
        ("input", config.input, model.graph.input),
        ("output", config.output, model.graph.output),
    ):
        graph = {value.name: value for value in actual}
        if sorted(t.name for t in declared) != sorted(graph):
            problems.append(f"{kind}s {[t.name for t in declared]} differ from the graph's {sorted(graph)}")
            continue
        for tensor in declared:
            value = graph[tensor.name].type.tensor_type
            declared_type = _enum_name(tensor.data_type)
            if _type_name(value.elem_type) != declared_type:
                problems.append(f"{kind} {tensor.name} is {declared_type}, the graph has {_type_name(value.elem_type)}")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.shape.dim]
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    problems.append(f"{kind} {tensor.name}: the graph's first axis {dims[:1]} is not a dynamic batch")
                dims = dims[1:]
            if list(tensor.dims) != dims:
                problems.append(f"{kind} {tensor.name} has dims {list(tensor.dims)}, the graph {dims}")
    return problems


def _enum_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def _check_ensemble(config: Any, configs: dict[str, Any]) -> list[str]:
    problems = []
    available = {t.name: _enum_name(t.data_type) for t in config.input}
    for step in config.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"step model {step.model_name!r} is not in the repository")
            continue
        inputs = {t.name: _enum_name(t.data_type) for t in model.input}
        outputs = {t.name: _enum_name(t.data_type) for t in model.output}
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"step {step.model_name} has no input {key!r}")
            elif value not in available:
                problems.append(f"step {step.model_name} input {key!r} reads {value!r}, which no earlier step makes")
            elif available[value] != inputs[key]:
                problems.append(f"step {step.model_name} input {key!r} is {inputs[key]}, it gets {available[value]}")
        missing = [name for name in inputs if name not in step.input_map]
        if missing:
            problems.append(f"step {step.model_name} leaves input(s) {missing} unfed")
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"step {step.model_name} has no output {key!r}")
            else:
                available[value] = outputs[key]
    for tensor in config.output:
        if tensor.name not in available:
            problems.append(f"ensemble output {tensor.name!r} is made by no step")
        elif available[tensor.name] != _enum_name(tensor.data_type):
            problems.append(f"ensemble output {tensor.name!r} type differs from the step that makes it")
    return problems
