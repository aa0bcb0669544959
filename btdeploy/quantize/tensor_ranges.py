"""Entropy calibration of chosen tensors, one calibration row at a time.

The graph runs once per row with the chosen tensors as extra outputs; each row is folded into
per-tensor histograms by ONNX Runtime's own HistogramCollector (the collector its static
quantizer uses, with the same settings Model Optimizer gives it) and dropped. What is held is
one ONNX Runtime session and one row's tensors, whatever the number of rows or the graph size:
the weights are never held twice, nor written again (the graph the session reads is the source's
structure, whose weights it reads from the source's own files).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from btdeploy.artifacts.onnx_files import load_graph
from btdeploy.errors import BtDeployError
from btdeploy.progress import RowProgress
from btdeploy.quantize.rows import CalibrationRows

HISTOGRAM_BINS = 128  # ONNX Runtime's EntropyCalibrater defaults, which Model Optimizer keeps
QUANTIZED_BINS = 128


@dataclass
class TensorRanges:
    ranges: dict[str, tuple[np.ndarray, np.ndarray]]  # tensor -> (lowest, highest) chosen by entropy
    shapes: dict[str, tuple[int, ...]]  # tensor -> its shape on the last row (to spot GEMVs)


def entropy_ranges(
    source: Path, choose: Callable[[onnx.ModelProto], Sequence[str]], feeds: CalibrationRows, what: str
) -> TensorRanges:
    """The entropy-calibrated range of every tensor `choose` names in `source` (given the graph
    without its weights), over every row of `feeds`, read one at a time."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    rows = len(feeds)
    if rows < 1:
        raise BtDeployError(f"calibrating {what}: no calibration rows")
    model = load_graph(source, "optimize the head again", load_weights=False)
    tensors = list(choose(model))
    if not tensors:
        return TensorRanges({}, {})
    augmented = _write_with_outputs(source, model, tensors)
    del model
    session = _open_session(source, augmented)
    collector = HistogramCollector(
        method="entropy", symmetric=False, num_bins=HISTOGRAM_BINS, num_quantized_bins=QUANTIZED_BINS,
        percentile=99.999, scenario="same",
    )  # fmt: skip
    shapes: dict[str, tuple[int, ...]] = {}
    progress = RowProgress(rows, f"calibrating {what} (int8)")
    quiet = io.StringIO()  # the collector prints a line per call
    try:
        for index in range(rows):
            outputs = session.run(tensors, feeds.take(index, index + 1))
            with contextlib.redirect_stdout(quiet):
                collector.collect({name: [value] for name, value in zip(tensors, outputs, strict=True)})
            shapes.update({name: tuple(value.shape) for name, value in zip(tensors, outputs, strict=True)})
            del outputs
            progress.advance()
        with contextlib.redirect_stdout(quiet):
            thresholds = collector.compute_collection_result()
    finally:
        del session
        for path in augmented:
            path.unlink(missing_ok=True)
    ranges = {name: (np.asarray(found[0]), np.asarray(found[1])) for name, found in thresholds.items()}
    return TensorRanges(ranges, shapes)


def _write_with_outputs(source: Path, model: onnx.ModelProto, tensors: Sequence[str]) -> list[Path]:
    """`model` (read without its weights) with `tensors` as extra outputs, written beside `source`,
    whose files its weights name by relative path."""
    augmented = source.with_name(f".{source.stem}.calibrate.onnx")
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in present)
    onnx.save(model, str(augmented))
    return [augmented]


def _open_session(source: Path, written: list[Path]) -> Any:
    """An ONNX Runtime session of the graph `_write_with_outputs` wrote, without graph optimizations
    as ONNX Runtime's calibrator runs (every tensor keeps its name); the files go if it cannot open."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(written[0]), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        for path in written:
            path.unlink(missing_ok=True)
        first_line = str(error).splitlines()[0]
        raise BtDeployError(f"ONNX Runtime cannot run {source.name} for calibration: {first_line}") from None
