"""`btdeploy triton-repo`: configs Triton's own schema accepts, and what the schema cannot check."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import spying
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import HEADS
from btdeploy.serve.triton_check import check_repository
from btdeploy.serve.triton_repo import write_repository

ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


@pytest.fixture(scope="module")
def repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_repository(tiny_export, tmp_path_factory.mktemp("triton") / "repo")


def _config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_every_config_parses_and_agrees_with_its_graph(repo: Path) -> None:
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == sorted([*HEADS, *(f"{h}_raw" for h in HEADS), "preprocess"])
    for head in HEADS:
        config = _config(repo / head / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
        assert all(0 < size <= config.max_batch_size for size in config.dynamic_batching.preferred_batch_size)
        graph = onnx.load(str(repo / head / "1" / "model.onnx"), load_external_data=False)
        for declared, actual in ((config.input, graph.graph.input), (config.output, graph.graph.output)):
            assert [t.name for t in declared] == [v.name for v in actual]
            for tensor, value in zip(declared, actual, strict=True):
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                assert (
                    model_config_pb2.DataType.Name(tensor.data_type) == ONNX_TO_TRITON[value.type.tensor_type.elem_type]
                )
                assert dims[0] == -1 and list(tensor.dims) == dims[1:]
        # On the GPU, Triton's ONNX Runtime backend opens the CUDA provider as btdeploy does: TF32 off.
        (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert accelerator.name == "cuda" and dict(accelerator.parameters) == {"use_tf32": "0"}
        ensemble = _config(repo / f"{head}_raw" / "config.pbtxt")
        assert [step.model_name for step in ensemble.ensemble_scheduling.step] == ["preprocess", head]
        assert [t.name for t in ensemble.output] == [t.name for t in config.output]
    assert check_repository(repo) == []
    assert "tritonserver --model-repository=/models" in (repo / "README.md").read_text()


@pytest.mark.parametrize(
    ("model", "old", "new", "problem"),
    [
        ("itm", "dims: [ 2 ]", "dims: [ 3 ]", "output logits has dims [3], the graph [2]"),
        ("itm", "TYPE_INT64", "TYPE_INT32", "input input_ids is TYPE_INT32, the graph has TYPE_INT64"),
        ("itm", "preferred_batch_size: [ 8, 32 ]", "preferred_batch_size: [ 8, 64 ]", "preferred batch size 64"),
        ("itm_raw", 'model_name: "itm"', 'model_name: "itx"', "step model 'itx' is not in the repository"),
        (
            "itm_raw",
            'key: "logits" value: "logits"',
            'key: "logits" value: "other"',
            "output 'logits' is made by no step",
        ),
        ("mlm", "max_batch_size: 32", "max_batch_size: 32\nno_such_field: 1", "does not parse as Triton's ModelConfig"),
    ],
)
def test_the_check_finds_broken_repositories(
    repo: Path, tmp_path: Path, model: str, old: str, new: str, problem: str
) -> None:
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    path = broken / model / "config.pbtxt"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    problems = check_repository(broken)
    assert any(problem in p for p in problems), problems


def test_the_check_finds_a_missing_model_file(repo: Path, tmp_path: Path) -> None:
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    (broken / "itc" / "1" / "model.onnx").unlink()
    (broken / "preprocess" / "1" / "model.py").unlink()
    problems = check_repository(broken)
    assert "itc: 1/model.onnx is missing" in problems and "preprocess: 1/model.py is missing" in problems


def test_external_data_goes_into_a_model_onnx_folder(tiny_export: Path, tmp_path: Path) -> None:
    """A graph past 2 GB is stored with external data; Triton takes a folder named model.onnx."""
    import onnxruntime as ort

    from btdeploy.model.inputs import sample_inputs
    from btdeploy.runtime.runtime import load

    export = tmp_path / "export"
    shutil.copytree(tiny_export / "itm", export / "itm")
    graph = onnx.load(str(export / "itm" / "model.onnx"))
    onnx.save_model(
        graph,
        str(export / "itm" / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    manifest = read_manifest(export / "itm")  # recorded, as the export of a graph past 2 GB is
    manifest.record_graph(export / "itm" / "model.onnx")
    manifest.write()
    repo = write_repository(export, tmp_path / "repo")
    folder = repo / "itm" / "1" / "model.onnx"
    assert folder.is_dir() and sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    # onnx's writer (as older btdeploy used) made the weights owner-only; the server may be another user
    assert (export / "itm" / "model.onnx.data").stat().st_mode & 0o077 == 0
    plain = tmp_path / "plain"
    plain.touch()
    for name in ("model.onnx", "model.onnx.data"):
        assert (folder / name).stat().st_mode == plain.stat().st_mode, name
    runtime = load(tiny_export, head="itm")
    feeds = sample_inputs(runtime.config, 2, 6)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["logits"], feeds)[0] - runtime(**feeds).logits).max() <= 1e-5
    assert check_repository(repo) == []
    (folder / "model.onnx.data").unlink()  # a repository copied without its weights: named once
    assert [p for p in check_repository(repo) if "external data" in p] == [
        "itm: external data file model.onnx.data is missing beside model.onnx"
    ]


class _Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self.name, self.value = name, value

    def as_numpy(self) -> np.ndarray:
        return self.value


def _stub_python_backend() -> types.ModuleType:
    """A stand-in for the documented triton_python_backend_utils API (Tensor, InferenceResponse,
    TritonError, get_input_tensor_by_name), which exists only inside Triton's container."""
    stub = types.ModuleType("triton_python_backend_utils")
    stub.Tensor = _Tensor  # type: ignore[attr-defined]
    stub.TritonError = lambda message: message  # type: ignore[attr-defined]
    stub.InferenceResponse = lambda output_tensors, error=None: {  # type: ignore[attr-defined]
        "outputs": {t.name: t.value for t in output_tensors},
        "error": error,
    }
    stub.get_input_tensor_by_name = lambda request, name: _Tensor(name, request[name])  # type: ignore[attr-defined]
    return stub


def test_the_preprocess_model_matches_the_processor(
    repo: Path, tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image
    from transformers import BridgeTowerProcessor

    from btdeploy.runtime.runtime import load

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _stub_python_backend())
    spec = importlib.util.spec_from_file_location("preprocess_model", repo / "preprocess" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.TritonPythonModel()
    config = {"parameters": {"max_text_length": {"string_value": "512"}}}
    model.initialize({"model_config": json.dumps(config)})
    pictures, shown = [], []
    for seed, orientation in ((0, 1), (1, 6)):  # the second as a phone stores a portrait photo: turned by EXIF
        stored = Image.fromarray((np.random.default_rng(seed).random((30, 40, 3)) * 255).astype("uint8"))
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        stored.save(buffer, "PNG", exif=exif)
        pictures.append(buffer.getvalue())
        shown.append(stored if orientation == 1 else stored.transpose(Image.Transpose.ROTATE_270))
    texts = [b"a cat on a mat", b"a dog"]
    good = {
        "IMAGE": np.array([[p] for p in pictures], dtype=object),
        "TEXT": np.array([[t] for t in texts], dtype=object),
    }
    bad = {"IMAGE": np.array([[b"not an image"]], dtype=object), "TEXT": np.array([[b"x"]], dtype=object)}
    buffer = io.BytesIO()
    Image.new("RGB", (256, 64)).save(buffer, "PNG")  # 4:1, past what the tiny preset's processor resizes
    banner = {"IMAGE": np.array([[pictures[0]], [buffer.getvalue()]], dtype=object), "TEXT": good["TEXT"]}
    grey = (np.random.default_rng(2).random((30, 40)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buffer, "PNG")  # a 16-bit scan: read as shown, not white
    scan = {"IMAGE": np.array([[pictures[0]], [buffer.getvalue()]], dtype=object), "TEXT": good["TEXT"]}
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.float32) / 255).save(buffer, "TIFF")  # float pixels: no one 8-bit reading
    unit = {"IMAGE": np.array([[buffer.getvalue()]], dtype=object), "TEXT": np.array([[b"x"]], dtype=object)}
    answer, refused, elongated, scanned, floating = model.execute([good, bad, banner, scan, unit])
    processor = BridgeTowerProcessor.from_pretrained(tiny_export / "itm" / "processor")
    expected = processor(shown, [t.decode() for t in texts], padding=True, return_tensors="np")
    for name in ("input_ids", "attention_mask", "pixel_values"):
        np.testing.assert_array_equal(answer["outputs"][name], expected[name])
    assert refused["error"] == "IMAGE 0 is not an image file PIL can read"
    scan_shown = [shown[0], Image.fromarray(grey).convert("RGB")]
    expected_scan = processor.image_processor(scan_shown, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(scanned["outputs"]["pixel_values"], expected_scan)
    assert floating["error"].startswith("IMAGE 0 holds floating-point pixels"), floating
    # The model reads each kind of image as btdeploy does (upright_rgb), without btdeploy.
    from btdeploy.model.media import upright_rgb

    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[5:25, 10:30] = (200, 30, 60, 255)
    rgba[0:5] = (0, 0, 255, 100)
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey)):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        with Image.open(buffer) as decoded:
            picture, problem = module.shown(decoded)
            assert problem is None
            np.testing.assert_array_equal(np.asarray(picture), np.asarray(upright_rgb(decoded)))
    assert elongated["error"].startswith("IMAGE 1 is 256x64 pixels, too elongated for the checkpoint's processor")
    # The ensemble's second step on those tensors gives the head's answer.
    import onnxruntime as ort

    session = ort.InferenceSession(str(repo / "itm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], answer["outputs"])[0]
    assert np.abs(logits - load(tiny_export, head="itm")(**expected).logits).max() <= 1e-5


def test_a_tensorrt_repository_reads_the_engine_profile(tiny_export: Path, tmp_path: Path) -> None:
    """The engine itself is built on a GPU; here a placeholder file stands in for it, with the record
    btdeploy build writes beside every engine, to check the config that goes with it."""
    from btdeploy.backends.tensorrt.engines import EngineRecord, record_file
    from btdeploy.backends.tensorrt.profiles import EngineProfile, ShapeRange

    export = tmp_path / "export"
    shutil.copytree(tiny_export / "itm", export / "itm")
    with pytest.raises(BtDeployError, match="run btdeploy build .* --precision fp16"):
        write_repository(export, tmp_path / "none", backend="tensorrt", precision="fp16")
    assert not (tmp_path / "none").exists()
    engine = export / "itm" / "engine.fp16.10.14.1.sm90.plan"
    engine.write_bytes(b"placeholder")
    profile = EngineProfile(ShapeRange(1, 4, 16), ShapeRange(1, 40, 64), 64, 3)
    EngineRecord("fp16", "10.14.1", "H200", (9, 0), "model.trt.fp16.onnx", "0", profile.to_json()).write(
        record_file(engine)
    )
    repo = write_repository(export, tmp_path / "repo", backend="tensorrt", precision="fp16")
    config = _config(repo / "itm" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
    assert config.optimization.cuda.graphs and [s.batch_size for s in config.optimization.cuda.graph_spec] == [4, 16]
    assert (repo / "itm" / "1" / "model.plan").read_bytes() == b"placeholder"
    assert check_repository(repo) == []
    # A larger --max-batch than the engine was built for had been cut to 16 without a word.
    with pytest.raises(BtDeployError, match=r"--max-batch 32 is past what the itm head takes \(16, its engine engine"):
        write_repository(export, tmp_path / "too-large", backend="tensorrt", precision="fp16", max_batch=32)
    assert not (tmp_path / "too-large").exists()


def test_an_existing_repository_is_not_overwritten(repo: Path, tiny_export: Path) -> None:
    with pytest.raises(BtDeployError, match="not an empty folder"):
        write_repository(tiny_export, repo)


def test_a_repository_needs_one_processor_for_every_head(tiny_export: Path, tmp_path: Path) -> None:
    """The preprocess model serves every head with the first head's processor: a head without one
    had failed with a bare 'No such file' after its graph was copied, and heads of two checkpoints
    were served with one's processor."""
    import json

    export = tmp_path / "export"
    for head in ("itc", "itm"):
        shutil.copytree(tiny_export / head, export / head)
    shutil.rmtree(export / "itc" / "processor")
    with pytest.raises(BtDeployError, match="export/itc has no processor/ folder: export from a checkpoint"):
        write_repository(export, tmp_path / "repo")
    shutil.copytree(tiny_export / "itc" / "processor", export / "itc" / "processor")
    record = export / "itm" / "manifest.json"
    data = json.loads(record.read_text())
    data["model"]["weights_sha256"] = "f" * 64  # as if itm were exported again from a fine-tune
    record.write_text(json.dumps(data))
    with pytest.raises(BtDeployError, match="serves every head with one processor, but they were exported from"):
        write_repository(export, tmp_path / "repo")
    with pytest.raises(BtDeployError, match=r"--max-batch 33 is past what the itc head takes \(32, the head's batch"):
        write_repository(export, tmp_path / "repo", heads=["itc"], max_batch=33)
    assert not (tmp_path / "repo").exists()


def test_without_tritonclient_nothing_is_copied_before_the_refusal(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schema check at the end needs tritonclient (the serve extra): without it, every graph
    had been copied into the staging folder before the refusal."""
    from btdeploy.serve import triton_repo

    staged: list[Path] = []
    real_staging = triton_repo.staged_directory
    monkeypatch.setattr(triton_repo, "staged_directory", spying(real_staging, lambda out: staged.append(out)))
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # as if tritonclient were not installed
    with pytest.raises(BtDeployError, match=r"needs tritonclient: pip install 'btdeploy\[serve\]'"):
        write_repository(tiny_export, tmp_path / "repo")
    assert staged == [] and not (tmp_path / "repo").exists()
