"""`btdeploy quantize`: precision decided in the graph, before any engine is built.

- fp16: Model Optimizer's AutoCast. Inputs and outputs stay FP32; LayerNormalization, Softmax
  and every node whose values leave FP16's comfortable range on the calibration batch
  (AutoCast's data_max) stay FP32.
- int8: Model Optimizer's ONNX quantizer: explicit, symmetric QuantizeLinear/DequantizeLinear
  (zero point 0, as TensorRT requires), calibrated; LayerNorm and Softmax get no Q/DQ.
- int8-dynamic: ONNX Runtime's dynamic quantization of the MatMul weights (activations are
  quantized at run time), for CPU-only edge boxes. ONNX Runtime only; TensorRT cannot run it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from btdeploy.artifacts.files import graph_bytes, sha256_of
from btdeploy.artifacts.manifest import Manifest, precision_file, read_manifest, tool_versions
from btdeploy.backends.tensorrt.operators import check_tensorrt_ops
from btdeploy.errors import BtDeployError
from btdeploy.export.exporter import PROTOBUF_LIMIT
from btdeploy.model.heads import PRECISIONS
from btdeploy.optimize.graph import Graph
from btdeploy.optimize.graph_checks import NO_QDQ_OPS, layernorm_types, qdq_summary, require_fp16_safe
from btdeploy.optimize.optimizer import save_model_atomically
from btdeploy.optimize.passes import FLAVOURS
from btdeploy.optimize.passes.qdq_islands import keep_full_precision_inputs
from btdeploy.progress import say, step
from btdeploy.quantize.calibration import DEFAULT_CALIB_SIZE, CalibrationData, load_calibration

FP32_OPS = ["LayerNormalization", "Softmax"]  # kept FP32 in every reduced-precision graph
# How many calibration rows AutoCast's range check runs at once: it keeps every
# intermediate tensor of the batch, which for base is ~1 GB per row.
FP16_RANGE_ROWS = 4


def _require_modelopt() -> None:
    try:
        import modelopt.onnx  # noqa: F401
    except ImportError:
        raise BtDeployError(
            "fp16 and int8 need NVIDIA Model Optimizer: pip install 'nvidia-modelopt[onnx]==0.47.0' "
            "(int8-dynamic needs only ONNX Runtime)"
        ) from None


def _quiet_modelopt() -> None:
    # Model Optimizer logs every node at INFO; btdeploy prints its own progress.
    for name in ("modelopt", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _autocast_fp16(source: Path, feeds: dict[str, np.ndarray], workdir: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    _require_modelopt()
    _quiet_modelopt()
    from modelopt.onnx.autocast import convert_to_mixed_precision

    rows = min(FP16_RANGE_ROWS, len(next(iter(feeds.values()))))
    npz = workdir / "range.npz"
    np.savez(npz, **{name: values[:rows] for name, values in feeds.items()})  # type: ignore[arg-type]
    model = convert_to_mixed_precision(
        str(source),
        low_precision_type="fp16",
        keep_io_types=True,
        op_types_to_exclude=FP32_OPS,
        calibration_data=str(npz),
        providers=["cpu"],
    )
    return model, {"tool": "modelopt.onnx.autocast", "op_types_kept_fp32": FP32_OPS, "range_rows": rows}


def _modelopt_int8(
    source: Path, feeds: dict[str, np.ndarray], workdir: Path, high_precision: str
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    _require_modelopt()
    _quiet_modelopt()
    from modelopt.onnx.quantization import quantize

    # Without calibration_shapes Model Optimizer steps through the rows one at a time (the
    # graphs' batch axis is dynamic); with them it runs ONNX shape inference, which stops at
    # the ort graph's com.microsoft operators.
    output = workdir / "int8.onnx"
    quantize(
        str(source),
        quantize_mode="int8",
        calibration_data=feeds,
        calibration_eps=["cpu"],
        # The GEMMs hold nearly all the compute (the attention matmuls are inside the fused
        # Attention nodes); Q/DQ anywhere else would cost conversions and accuracy for no gain.
        op_types_to_quantize=["MatMul"],
        op_types_to_exclude=list(NO_QDQ_OPS),
        op_types_to_exclude_fp16=FP32_OPS,
        high_precision_dtype=high_precision,
        dq_only=True,  # weights stored as int8 with a DequantizeLinear: a quarter of the bytes
        use_external_data_format=source.stat().st_size > PROTOBUF_LIMIT,
        output_path=str(output),
        log_level="ERROR",
    )
    if not output.is_file():
        raise BtDeployError(f"Model Optimizer wrote no INT8 model for {source}: see its log above")
    graph = Graph(onnx.load(str(output)))
    restored = keep_full_precision_inputs(graph)
    model = graph.model
    options = {
        "tool": "modelopt.onnx.quantization",
        "op_types_quantized": ["MatMul"],
        "full_precision_inputs_restored": restored.fused,
        "mode": "int8 explicit Q/DQ, symmetric",
        "calibration_method": "entropy (Model Optimizer's int8 default)",
        "calibration_rows": len(next(iter(feeds.values()))),
        "op_types_excluded": list(NO_QDQ_OPS),
        "high_precision": high_precision,
    }
    return model, options


def _dynamic_int8(source: Path, workdir: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = workdir / "int8-dynamic.onnx"
    # One scale per weight matrix: on base itm at batch 4, length 40 it ran 2.06 s against
    # 2.24 s per output channel, with logits as close to FP32 (cosine 0.99990 against 0.99979).
    quantize_dynamic(
        str(source),
        str(output),
        op_types_to_quantize=["MatMul"],
        per_channel=False,
        weight_type=QuantType.QInt8,
        use_external_data_format=source.stat().st_size > PROTOBUF_LIMIT,
        # The com.microsoft nodes defeat ONNX shape inference; every tensor here is FP32.
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    model = onnx.load(str(output))
    options = {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "op_types": ["MatMul"],
        "weights": "int8, one scale per matrix",
        "activations": "uint8, quantized at run time",
    }
    return model, options


def _describe(model: onnx.ModelProto, precision: str) -> dict[str, Any]:
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


def _source_graph(manifest: Manifest, precision: str, flavour: str, stem: str) -> tuple[Path, str]:
    """The optimized graph a precision starts from, and why where it is not the flavour's own.

    Model Optimizer reads standard ONNX only: AutoCast asks TensorRT for the types of other
    operators, and the quantizer leaves every tensor that a com.microsoft node produces
    unquantized (measured on tiny itm: 15 of 80 MatMuls got INT8 activations). So fp16 and
    int8 of both flavours start from the trt graph, which holds the same fusions in standard
    operators; ONNX Runtime fuses its own kernels again when it loads them."""
    if precision in ("fp16", "int8") and flavour == "ort":
        return manifest.graph_path("trt", None, stem), "Model Optimizer needs standard ONNX operators"
    return manifest.graph_path(flavour, None, stem), ""


def _fusion_calibration(manifest: Manifest, calibration: CalibrationData) -> CalibrationData:
    """The fusion graph's inputs: the calibration rows through the FP32 text and vision towers."""
    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend

    feeds = calibration.feeds
    text = OnnxRuntimeBackend(manifest.graph_path("trt", None, "text"), ["text_states"]).run(feeds)
    vision = OnnxRuntimeBackend(manifest.graph_path("trt", None, "vision"), ["image_states"]).run(feeds)
    fused = {**text, **vision, "attention_mask": feeds["attention_mask"]}
    return CalibrationData(fused, {**calibration.source, "through": "text and vision towers (FP32 trt graphs)"})


def quantize_head(
    folder: Path,
    precision: str,
    flavour: str = "ort",
    calib_images: Path | None = None,
    calib_texts: Path | None = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
) -> dict[str, Any]:
    """Quantize model.onnx's optimized graph (and the split graphs, where the head has them)."""
    if precision not in PRECISIONS:
        raise BtDeployError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if flavour not in FLAVOURS:
        raise BtDeployError(f"--flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    if precision == "int8-dynamic" and flavour == "trt":
        raise BtDeployError(
            "int8-dynamic quantizes activations at run time with ONNX Runtime operators TensorRT cannot parse: "
            "use --flavour ort, or --precision int8 for TensorRT"
        )
    manifest = read_manifest(folder)
    sources = {stem: _source_graph(manifest, precision, flavour, stem) for stem in manifest.stems}
    for source, _ in sources.values():
        require_fp16_safe(onnx.load(str(source), load_external_data=False), f"{source}")
    calibration = None
    if precision in ("fp16", "int8"):
        calibration = load_calibration(manifest, calib_images, calib_texts, calib_size)
    summary = _quantize_graph(manifest, precision, flavour, "model", sources["model"], calibration)
    parts = {}
    for stem in manifest.stems[1:]:
        part_calibration = calibration
        if calibration is not None and stem == "fusion":
            part_calibration = _fusion_calibration(manifest, calibration)
        parts[stem] = _quantize_graph(manifest, precision, flavour, stem, sources[stem], part_calibration)
    if parts:
        summary["parts"] = parts
    manifest = read_manifest(folder)  # re-read: another precision may have been recorded meanwhile
    manifest.data.setdefault("precisions", {})[f"{flavour}.{precision}"] = summary
    manifest.write()
    return summary


def _quantize_graph(
    manifest: Manifest,
    precision: str,
    flavour: str,
    stem: str,
    source_and_reason: tuple[Path, str],
    calibration: CalibrationData | None,
) -> dict[str, Any]:
    source, why = source_and_reason
    label = manifest.head if stem == "model" else f"{manifest.head} {stem}"
    target = manifest.folder / precision_file(flavour, precision, stem)
    started = time.monotonic()
    feeds = {name: calibration.feeds[name] for name in manifest.input_names(stem)} if calibration else {}
    workdir = Path(tempfile.mkdtemp(prefix=".quantize.", dir=manifest.folder))
    try:
        with step(f"quantize {label} ({flavour}, {precision}) from {source.name}"):
            if precision == "fp16":
                model, options = _autocast_fp16(source, feeds, workdir)
            elif precision == "int8":
                # TensorRT runs what is not INT8 in FP16; ONNX Runtime's CPU provider wants FP32.
                high = "fp16" if flavour == "trt" else "fp32"
                model, options = _modelopt_int8(source, feeds, workdir, high)
            else:
                model, options = _dynamic_int8(source, workdir)
        require_fp16_safe(model, f"the {precision} graph of {label}")
        facts = _describe(model, precision)
        if flavour == "trt":
            ops = check_tensorrt_ops(model)
            if not ops.passed:
                raise BtDeployError(
                    f"the {precision} trt graph of {label} has operators TensorRT cannot parse: "
                    f"{', '.join(ops.unsupported)}"
                )
            facts["tensorrt_op_check"] = "passed"
        save_model_atomically(model, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary: dict[str, Any] = {
        "file": target.name,
        "source": source.name,
        **({"source_reason": why} if why else {}),
        "flavour": flavour,
        "precision": precision,
        **options,
        "calibration": calibration.source if calibration else None,
        "graph": facts,
        "bytes": graph_bytes(target),
        "sha256": sha256_of(target),
        "seconds": round(time.monotonic() - started, 1),
        "versions": tool_versions(("nvidia-modelopt", "onnxruntime-gpu", "onnx")),
    }
    say(
        f"quantize {label}: {target} ({summary['bytes'] / 2**20:.1f} MiB; "
        + ", ".join(f"{k} {v}" for k, v in facts.items() if not isinstance(v, list))
        + ")"
    )
    return summary


__all__ = ["quantize_head", "FP32_OPS"]
