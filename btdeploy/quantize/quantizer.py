"""`btdeploy quantize`: precision decided in the graph, before any engine is built.

One method per precision (btdeploy/quantize/methods.py); this module runs it on a head's
graphs, checks the result, and records how it was made in the manifest.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from btdeploy.artifacts.graph_names import Flavour, Precision, graph_file, parse_flavour
from btdeploy.artifacts.locks import head_lock
from btdeploy.artifacts.manifest import Manifest, read_manifest, tool_versions
from btdeploy.artifacts.onnx_files import GraphBatch, data_file, load_graph
from btdeploy.backends.targets import graph_checks
from btdeploy.errors import BtDeployError
from btdeploy.optimize.graph_checks import layernorm_types, qdq_summary, require_fp16_safe
from btdeploy.progress import say, step
from btdeploy.quantize.calibration import DEFAULT_CALIB_SIZE, CalibrationData, load_calibration
from btdeploy.quantize.methods import QuantizeMethod, get_method


def _describe(model: onnx.ModelProto, precision: Precision) -> dict[str, Any]:
    ops = Counter(node.op_type for node in model.graph.node)
    facts: dict[str, Any] = {"nodes": len(model.graph.node), "casts": ops.get("Cast", 0)}
    norms = layernorm_types(model)
    facts["layernorms_fp32"] = sum(1 for t in norms.values() if t == onnx.TensorProto.FLOAT)
    facts["layernorms"] = len(norms)
    if precision == "int8":
        qdq = qdq_summary(model)
        facts.update(
            qdq_pairs=qdq.pairs,
            weights_int8=qdq.dequantize_only,
            matmuls_int8=qdq.quantized_matmuls,
            # Model Optimizer leaves matrix-vector products (one [CLS] row) in high precision,
            # where TensorRT runs them faster than as INT8 GEMMs.
            matmuls_excluded=qdq.unquantized_matmuls,
            asymmetric=len(qdq.asymmetric),
            not_int8=len(qdq.not_int8),
            layernorm_or_softmax_quantized=qdq.quantized_no_qdq_ops,
        )
        if qdq.asymmetric or qdq.not_int8 or qdq.quantized_no_qdq_ops:
            raise BtDeployError(
                f"the INT8 graph breaks TensorRT's rules: {len(qdq.asymmetric)} asymmetric Q/DQ, "
                f"{len(qdq.not_int8)} not int8, quantized LayerNorm/Softmax inputs: {qdq.quantized_no_qdq_ops[:3]}"
            )
    if precision == "int8-dynamic":
        facts["matmul_integer"] = ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)
    return facts


def _fusion_calibration(manifest: Manifest, calibration: CalibrationData, flavour: Flavour) -> CalibrationData:
    """The fusion graph's inputs: the calibration rows through the FP32 text and vision towers of
    the flavour being quantized from (the split backend of the target registry)."""
    from btdeploy.backends.split import build_split_backend
    from btdeploy.backends.targets import get_target

    towers = build_split_backend(manifest, get_target("onnxruntime").resolve({"flavour": flavour, "split": True}))
    fused = {**towers.text(calibration.feeds), **towers.vision(calibration.feeds)}
    through = f"text and vision towers (FP32 {flavour} graphs)"
    return CalibrationData(fused, {**calibration.source, "through": through})


def quantize_head(
    folder: Path,
    precision: Precision | str,
    flavour: Flavour | str = Flavour.ORT,
    calib_images: Path | None = None,
    calib_texts: Path | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
) -> dict[str, Any]:
    """Quantize model.onnx's optimized graph (and the split graphs, where the head has them)."""
    chosen = parse_flavour(flavour) or Flavour.ORT
    method = get_method(precision, chosen)
    with head_lock(folder, f"btdeploy quantize --flavour {chosen} --precision {method.precision}"):
        manifest = read_manifest(folder)
        source_flavour, why = method.source(chosen)
        sources = {stem: manifest.graph_path(source_flavour, stem=stem) for stem in manifest.stems}
        for source in sources.values():
            require_fp16_safe(load_graph(source, "optimize the head again", load_weights=False), f"{source}")
        calibration = None
        if method.calibrates:
            calibration = load_calibration(manifest, calib_images, calib_texts, calib_size)
        summaries: dict[str, dict[str, Any]] = {}
        with GraphBatch() as batch:  # every graph of the head, or none: stage, then swap, then record
            for stem in manifest.stems:
                part_calibration = calibration
                if calibration is not None and stem == "fusion":
                    part_calibration = _fusion_calibration(manifest, calibration, source_flavour)
                summaries[stem] = _quantize_graph(
                    manifest, method, chosen, stem, (sources[stem], why), part_calibration, batch
                )
        summary = manifest.record_step(summaries)
        for written in (summary, *summary.get("parts", {}).values()):
            _say_written(manifest.head, written)
        manifest.data.setdefault("precisions", {})[f"{chosen}.{method.precision}"] = summary
        manifest.write()
    return summary


def _quantize_graph(
    manifest: Manifest,
    method: QuantizeMethod,
    flavour: Flavour,
    stem: str,
    source_and_reason: tuple[Path, str],
    calibration: CalibrationData | None,
    batch: GraphBatch,
) -> dict[str, Any]:
    source, why = source_and_reason
    precision = method.precision
    label = manifest.head if stem == "model" else f"{manifest.head} {stem}"
    target = manifest.folder / graph_file(flavour, precision, stem)
    started = time.monotonic()
    feeds = {name: calibration.feeds[name] for name in manifest.input_names(stem)} if calibration else {}
    versions = tool_versions(("nvidia-modelopt", "onnxruntime-gpu", "onnx"))
    source_sha256 = manifest.data.get("graphs", {}).get(source.name, {}).get("sha256")
    made_by = {"source": source.name, "source_sha256": source_sha256, "versions": versions,
               "calibration": calibration.source if calibration else None}  # fmt: skip
    twin = _twin(manifest, method, flavour, stem, made_by) if method.flavour_independent else None
    workdir = Path(tempfile.mkdtemp(prefix=".quantize.", suffix=".partial", dir=manifest.folder))
    try:
        if twin is not None:
            # The same method on the same source graph and calibration wrote this graph for another
            # flavour: the result would be the same file, so it is not computed twice.
            path, record = twin
            say(f"quantize {label} ({flavour}, {precision}): the same graph as {path.name} (same source and data)")
            model = load_graph(path, "quantize again")
            options = {key: value for key, value in record.items() if key not in _RECORD_KEYS}
            options["reused_from"] = path.name
        else:
            with step(f"quantize {label} ({flavour}, {precision}) from {source.name}"):
                model, options = method.run(_private_copy(source, workdir), feeds, workdir, flavour)
        require_fp16_safe(model, f"the {precision} graph of {label}")
        facts = _describe(model, precision)
        for target_name, check in graph_checks(flavour).items():
            problems = check(model)
            if problems:
                raise BtDeployError(
                    f"the {precision} {flavour} graph of {label} has operators {target_name} cannot parse: "
                    f"{', '.join(problems)}"
                )
            facts[f"{target_name}_op_check"] = "passed"
        batch.stage(model, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {
        "file": target.name,
        **({"source_reason": why} if why else {}),
        "flavour": flavour,
        "precision": precision,
        **options,
        **made_by,
        "graph": facts,
        "seconds": round(time.monotonic() - started, 1),
    }
    return summary


# Keys of a quantize record that describe the graph and how it was made, not the method's options.
_RECORD_KEYS = {"file", "source", "source_reason", "source_sha256", "flavour", "precision", "calibration", "graph",
                "seconds", "versions", "bytes", "sha256", "parts", "reused_from"}  # fmt: skip


def _private_copy(source: Path, workdir: Path) -> Path:
    """The source graph copied into the work folder: Model Optimizer's INT8 quantizer saves its
    preprocessed graph over the file it is given (seen on tiny: model.trt.onnx changed on disk), and
    the optimized graph must stay the file its manifest records."""
    copy = workdir / source.name
    shutil.copyfile(source, copy)
    if data_file(source).is_file():
        shutil.copyfile(data_file(source), data_file(copy))
    return copy


def _twin(
    manifest: Manifest, method: QuantizeMethod, flavour: Flavour, stem: str, made_by: dict[str, Any]
) -> tuple[Path, dict[str, Any]] | None:
    """Another flavour's graph of this precision made from the same source graph (same hash), the
    same calibration and the same tool versions, still intact on disk; or None."""
    if made_by["source_sha256"] is None:
        return None
    for other in Flavour:
        record = manifest.data.get("precisions", {}).get(f"{other}.{method.precision}")
        if other == flavour or record is None:
            continue
        record = record if stem == "model" else record.get("parts", {}).get(stem)
        if record is None or any(record.get(key) != value for key, value in made_by.items()):
            continue
        path = manifest.folder / record["file"]
        try:
            manifest.verify_graph(path, full=True)
        except BtDeployError:
            continue
        if path.is_file():
            return path, record
    return None


def _say_written(head: str, summary: dict[str, Any]) -> None:
    facts = ", ".join(f"{k} {v}" for k, v in summary["graph"].items() if not isinstance(v, list))
    say(f"quantize {head}: {summary['file']} ({summary['bytes'] / 2**20:.1f} MiB; {facts})")


__all__ = ["quantize_head"]
