"""`btdeploy triton-repo`: a Triton Inference Server model repository from an export.

    REPO/<head>/config.pbtxt, REPO/<head>/1/model.onnx (or model.onnx/ with external data, or model.plan)
    REPO/preprocess/  Python backend: raw image bytes + text -> the heads' inputs (checkpoint's processor)
    REPO/<head>_raw/  ensemble: preprocess -> <head>, so a client can send raw inputs
    REPO/README.md    the container command that serves it

The repository is written to a temporary folder, checked (Triton's schema and the graphs), and
renamed into place, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import staged_directory, write_text
from btdeploy.artifacts.graph_names import Precision
from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest, require_one_checkpoint
from btdeploy.artifacts.onnx_files import data_file
from btdeploy.backends.targets import get_target
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.model.media import require_processor
from btdeploy.progress import say
from btdeploy.serve.triton_check import check_repository, graph_io, model_config_schema
from btdeploy.serve.triton_config import parameters, tensor_entry, to_pbtxt

PREPROCESS = "preprocess"
QUEUE_DELAY_US = 5000
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
# The btdeploy targets whose artifacts Triton runs: ONNX Runtime graphs and TensorRT engines.
BACKENDS = ("onnxruntime", "tensorrt")


def _dims(shape: list[Any]) -> list[int]:
    """Dims after the batch axis, -1 for a dynamic one (Triton adds the batch axis itself)."""
    return [dim if isinstance(dim, int) else -1 for dim in shape[1:]]


@dataclass(frozen=True)
class _Served:
    """What the repository serves for one head, and the largest batch it takes."""

    source: Path  # the engine, or the graph
    profile: dict[str, Any] | None  # the engine's shape profile; None for a graph
    max_batch: int
    max_batch_from: str  # where that largest batch comes from, for the refusal


def _engine(manifest: Manifest, precision: str) -> tuple[Path, dict[str, Any]]:
    from btdeploy.backends.tensorrt.engines import EngineRecord, record_file

    engines = sorted(manifest.folder.glob(f"engine.{precision}.*.plan"))
    if not engines:
        raise BtDeployError(
            f"{manifest.folder} has no {precision} TensorRT engine: run btdeploy build {manifest.folder} "
            f"--precision {precision} on a GPU like the one Triton serves on"
        )
    if len(engines) > 1:
        names = ", ".join(p.name for p in engines)
        raise BtDeployError(f"{manifest.folder} has several {precision} engines ({names}): keep the one to serve")
    record = EngineRecord.read(record_file(engines[0]))
    return engines[0], record.profile


def _tensors(manifest: Manifest, graph: Path | None) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs as Triton entries: from the ONNX graph served (Triton compares the config
    with it, so its dims are copied as the graph declares them), else from the manifest."""
    if graph is not None:
        io = graph_io(graph)
        return {kind: [tensor_entry(name, dtype, dims[1:]) for name, dtype, dims in io[kind]] for kind in io}
    return {
        kind: [tensor_entry(e["name"], e["dtype"], _dims(e["shape"])) for e in manifest.data[kind]]
        for kind in ("inputs", "outputs")
    }


def _head_config(
    manifest: Manifest, backend: str, max_batch: int, profile: dict[str, Any] | None, tensors: dict[str, Any]
) -> dict[str, Any]:
    head = get_head(manifest.head)
    typical = int(profile["batch"]["opt"]) if profile else head.engine_batch[1]
    preferred = sorted({min(typical, max_batch), max_batch})
    config: dict[str, Any] = {"name": manifest.head}
    config["platform"] = "tensorrt_plan" if backend == "tensorrt" else "onnxruntime_onnx"
    config["max_batch_size"] = max_batch
    config["input"], config["output"] = tensors["inputs"], tensors["outputs"]
    config["dynamic_batching"] = {"preferred_batch_size": preferred, "max_queue_delay_microseconds": QUEUE_DELAY_US}
    config["instance_group"] = [{"count": 1, "kind": "KIND_GPU"}]
    if backend == "tensorrt" and profile is not None:
        # CUDA graphs per batch size at the profile's typical text length (other shapes run without).
        length = int(profile["text_length"]["opt"])
        specs = []
        for batch in preferred:
            shapes = {"input_ids": [length], "attention_mask": [length]}
            specs.append({"batch_size": batch, "input": [{"key": k, "value": {"dim": v}} for k, v in shapes.items()]})
        config["optimization"] = {"cuda": {"graphs": True, "graph_spec": specs}}
    if backend == "onnxruntime":
        # Triton's ONNX Runtime backend hands a "cuda" accelerator's parameters to the CUDA provider:
        # the options btdeploy's own sessions open it with (TF32 off).
        from btdeploy.backends.onnxruntime import PROVIDER_OPTIONS

        cuda = [{"key": key, "value": value} for key, value in PROVIDER_OPTIONS["CUDAExecutionProvider"].items()]
        accelerator = {"name": "cuda", "parameters": cuda}
        config["optimization"] = {"execution_accelerators": {"gpu_execution_accelerator": [accelerator]}}
    return config


def _preprocess_config(manifest: Manifest, max_batch: int) -> dict[str, Any]:
    pixels = next(entry for entry in manifest.data["inputs"] if entry["name"] == "pixel_values")
    return {
        "name": PREPROCESS,
        "backend": "python",
        "max_batch_size": max_batch,
        "input": [
            {"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]},
        ],
        "output": [
            tensor_entry("input_ids", "int64", [-1]),
            tensor_entry("attention_mask", "int64", [-1]),
            tensor_entry("pixel_values", pixels["dtype"], _dims(pixels["shape"])),
        ],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": parameters({"max_text_length": str(manifest.data["limits"]["max_text_length"])}),
    }


def _ensemble_config(manifest: Manifest, max_batch: int, tensors: dict[str, Any]) -> dict[str, Any]:
    outputs = tensors["outputs"]
    inputs = [entry["name"] for entry in tensors["inputs"]]
    return {
        "name": f"{manifest.head}_raw",
        "platform": "ensemble",
        "max_batch_size": max_batch,
        "input": [
            {"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [1]},
            {"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]},
        ],
        "output": outputs,
        "ensemble_scheduling": {
            "step": [
                {
                    "model_name": PREPROCESS,
                    "model_version": -1,
                    "input_map": {"IMAGE": "IMAGE", "TEXT": "TEXT"},
                    "output_map": {name: f"_{name}" for name in inputs},
                },
                {
                    "model_name": manifest.head,
                    "model_version": -1,
                    "input_map": {name: f"_{name}" for name in inputs},
                    "output_map": {e["name"]: e["name"] for e in outputs},
                },
            ]
        },
    }


def _copy_graph(source: Path, version_dir: Path) -> Path:
    """1/model.onnx, or a folder 1/model.onnx/ holding the graph and its external data; returns the graph."""
    external = data_file(source)
    if external.is_file():
        folder = version_dir / "model.onnx"
        folder.mkdir()
        _copy(external, folder / external.name)  # the graph refers to it by this name
        return _copy(source, folder / "model.onnx")
    return _copy(source, version_dir / "model.onnx")


def _copy(source: Path, target: Path) -> Path:
    """A file of the repository, with the mode a plain open() gives, not its source's: the server
    (often another user, in a container) reads it, and older btdeploy wrote external data 0600."""
    return Path(shutil.copyfile(source, target))


def write_repository(
    export_dir: Path,
    out: Path,
    heads: list[str] | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    flavour: str | None = None,
    max_batch: int | None = None,
) -> Path:
    """Write and check the repository; returns its folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BtDeployError(f"{out} exists and is not an empty folder: choose a new --out")
    model_config_schema()  # the check at the end needs it: said before any graph is copied
    manifests = [read_manifest(folder) for folder in head_folders(export_dir, heads)]
    # The preprocess model tokenizes and resizes for every head with the first head's processor.
    require_processor(manifests[0])
    require_one_checkpoint(manifests, "the repository's preprocess model serves every head with one processor")
    target = get_target(backend)
    if backend == "tensorrt":
        # Engines are only copied here (Triton runs them), so TensorRT need not run on this machine.
        if Precision(precision) not in target.precisions:
            raise BtDeployError(f"TensorRT engines come in {', '.join(map(str, target.precisions))}, not {precision}")
    else:
        options = target.resolve({"precision": precision, **({"flavour": flavour} if flavour else {})})
    # Every head's source and largest batch, settled before anything is copied.
    served: dict[str, _Served] = {}
    for manifest in manifests:
        if backend == "tensorrt":
            engine, built_for = _engine(manifest, str(Precision(precision)))
            served[manifest.head] = _Served(
                engine, built_for, int(built_for["batch"]["max"]), f"its engine {engine.name}"
            )
        else:
            limit = get_head(manifest.head).engine_batch[2]
            served[manifest.head] = _Served(target.artifact(manifest, options), None, limit, "the head's batch profile")
        head = served[manifest.head]
        if max_batch is not None and max_batch > head.max_batch:
            raise BtDeployError(
                f"--max-batch {max_batch} is past what the {manifest.head} head takes ({head.max_batch}, "
                f"{head.max_batch_from}): give at most {head.max_batch}"
            )
    with staged_directory(out) as staging:
        for manifest in manifests:
            version_dir = staging / manifest.head / "1"
            version_dir.mkdir(parents=True)
            head = served[manifest.head]
            graph = None
            if backend == "tensorrt":
                _copy(head.source, version_dir / "model.plan")
                written = f"model.plan ({head.source.name})"
            else:
                manifest.verify_graph(head.source, full=True)  # what Triton serves is the graph that was checked
                graph = _copy_graph(head.source, version_dir)
                written = (
                    f"{graph.relative_to(version_dir)} ({head.source.name})"  # Triton names every graph model.onnx
                )
            batch = max_batch or head.max_batch
            tensors = _tensors(manifest, graph)
            config = _head_config(manifest, backend, batch, head.profile, tensors)
            write_text(staging / manifest.head / "config.pbtxt", to_pbtxt(config))
            ensemble = staging / f"{manifest.head}_raw"
            (ensemble / "1").mkdir(parents=True)  # an ensemble has a version folder and no files
            write_text(ensemble / "config.pbtxt", to_pbtxt(_ensemble_config(manifest, batch, tensors)))
            say(f"triton-repo: {manifest.head} ({written}, max batch {batch}) and {manifest.head}_raw")
        first = manifests[0]
        preprocess = staging / PREPROCESS / "1"
        preprocess.mkdir(parents=True)
        template = resources.files("btdeploy") / "data" / "triton" / "preprocess_model.py"
        write_text(preprocess / "model.py", template.read_text())
        shutil.copytree(first.processor_dir, preprocess / "processor")
        batch = max_batch or min(head.max_batch for head in served.values())
        write_text(staging / PREPROCESS / "config.pbtxt", to_pbtxt(_preprocess_config(first, batch)))
        write_text(staging / "README.md", _readme(manifests, backend, precision))
        problems = check_repository(staging)
        if problems:
            raise BtDeployError("the repository failed its check: " + "; ".join(problems))
    say(f"triton-repo: wrote {out} ({len(manifests)} head(s), checked against Triton's ModelConfig schema)")
    return out


def _readme(manifests: list[Manifest], backend: str, precision: str) -> str:
    heads = ", ".join(m.head for m in manifests)
    engine_note = (
        "The engines were built for one TensorRT version and GPU architecture (see each head's "
        "`engine.*.json` in the export): use the Triton release whose TensorRT is that version, on that GPU.\n"
        if backend == "tensorrt"
        else "The graphs use ONNX opset 23 (flavours ort/trt) or 20 (trt-compat): use a Triton release whose "
        "ONNX Runtime backend is 1.22 or newer for opset 23. Each head asks the CUDA provider for FP32 without "
        "TF32 (`use_tf32`), as btdeploy's parity checks ran it.\n"
    )
    example = manifests[0].head
    return f"""# Triton model repository written by btdeploy

Heads: {heads} ({backend}, {precision}). Each head `H` is served as `H` (the model's own tensors)
and `H_raw` (an ensemble: `preprocess`, then `H`; send raw image bytes and text).

{engine_note}
## Serve it

```bash
docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
  -v "$PWD":/models {TRITON_IMAGE} \\
  bash -c "pip install transformers pillow && tritonserver --model-repository=/models"
```

Run it in this folder; replace `<yy.mm>` with the release chosen above.

## Call it (Open Inference Protocol)

```bash
curl localhost:8000/v2/health/ready
curl localhost:8000/v2/models/{example}
```

Raw inputs through the ensemble, with `tritonclient`:

```python
import numpy as np, tritonclient.http as triton
client = triton.InferenceServerClient("localhost:8000")
image = np.array([[open("cat.jpg", "rb").read()]], dtype=object)
text = np.array([["a photo of a cat"]], dtype=object)
inputs = [triton.InferInput("IMAGE", [1, 1], "BYTES"), triton.InferInput("TEXT", [1, 1], "BYTES")]
inputs[0].set_data_from_numpy(image)
inputs[1].set_data_from_numpy(text)
print(client.infer("{example}_raw", inputs).get_response())
```
"""
