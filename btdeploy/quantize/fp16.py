"""fp16: NVIDIA Model Optimizer's AutoCast. Inputs and outputs stay FP32; LayerNormalization,
Softmax and every node whose values leave FP16's comfortable range on the calibration rows
(AutoCast's data_max) stay FP32."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.onnx_files import data_file
from btdeploy.artifacts.weightless import weightless_with_side_file
from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
from btdeploy.progress import RowProgress
from btdeploy.quantize.modelopt_env import lean_conversion, require_modelopt
from btdeploy.quantize.rows import CalibrationRows

# How many calibration rows AutoCast's range check runs: each runs the graph with every
# intermediate tensor as an output (on base ~1.5 s a row); the ranges are kept, the tensors not.
FP16_RANGE_ROWS = 4


def autocast_fp16(
    source: Path, feeds: CalibrationRows, workdir: Path, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    require_modelopt()
    from modelopt.onnx.autocast import convert_to_mixed_precision

    rows = min(FP16_RANGE_ROWS, len(feeds))
    npz = workdir / "range.npz"
    np.savez(npz, **feeds.take(0, rows))  # type: ignore[arg-type]
    with _streaming_reference_runs():
        model = convert_to_mixed_precision(
            str(source),
            low_precision_type="fp16",
            keep_io_types=True,
            op_types_to_exclude=list(FULL_PRECISION_OPS),
            calibration_data=str(npz),
            providers=["cpu"],
        )
    options = {
        "tool": "modelopt.onnx.autocast",
        "op_types_kept_fp32": list(FULL_PRECISION_OPS),
        "range_rows": rows,
        "range_check": "one row at a time (btdeploy's streaming reference run)",
    }
    return model, options


@contextmanager
def _streaming_reference_runs() -> Iterator[None]:
    """AutoCast's reference run keeps every intermediate tensor of every calibration row until
    it has run them all (on base, 4 rows peaked at 14.8 GB); AutoCast only needs each tensor's
    range. For the duration of one conversion its runner is replaced by one that folds each
    row into running ranges and drops the tensors, and reads the weights from a side file
    instead of a deep copy and a serialized copy of the model; and its shape inferences and
    model checks run on weightless copies (btdeploy/artifacts/weightless.py). The graph is the
    same, byte for byte."""
    import modelopt.onnx.autocast.convert as autocast_convert

    original = autocast_convert.ReferenceRunner
    autocast_convert.ReferenceRunner = _streaming_runner_class(original)  # type: ignore[misc]
    try:
        with lean_conversion():
            yield
    finally:
        autocast_convert.ReferenceRunner = original  # type: ignore[misc]


def _streaming_runner_class(base: type) -> type:
    import tempfile

    from modelopt.onnx import utils as onnx_utils
    from modelopt.onnx.autocast.referencerunner import TensorStats
    from polygraphy import constants
    from polygraphy.backend.onnx import ModifyOutputs
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    class StreamingReferenceRunner(base):  # type: ignore[misc, valid-type]
        def run(self, inputs: Any = None) -> OrderedDict[str, Any]:
            rows = list(self._load_inputs(inputs))
            progress = RowProgress(len(rows), "fp16 range check (AutoCast)")
            ranges: OrderedDict[str, Any] = OrderedDict()
            with tempfile.TemporaryDirectory(prefix="btdeploy-autocast-") as folder:
                graph = Path(folder) / "model.onnx"
                marked = weightless_with_side_file(self.model, data_file(graph))
                onnx_utils.clear_stale_value_info(marked)
                onnx.save(ModifyOutputs(marked, outputs=constants.MARK_ALL)(), str(graph))
                del marked
                with OnnxrtRunner(SessionFromOnnx(str(graph), providers=self.providers)) as runner:
                    for feeds in rows:
                        outputs = runner.infer(feeds)
                        for name, values in {**feeds, **outputs}.items():
                            _fold(ranges, name, np.asarray(values), TensorStats)
                        del outputs
                        progress.advance()
            return ranges

    return StreamingReferenceRunner


def _fold(ranges: OrderedDict[str, Any], name: str, values: np.ndarray, stats: type) -> None:
    """One row's tensor into the running absmax/min/max AutoCast's node classifier reads."""
    if values.size == 0 or not np.issubdtype(values.dtype, np.number):
        low = high = peak = 0.0
    else:
        low, high = float(np.min(values)), float(np.max(values))
        peak = max(abs(low), abs(high))
    seen = ranges.get(name)
    if seen is None:
        ranges[name] = stats(absmax=peak, min_val=low, max_val=high, shape=values.shape)
        return
    seen.absmax, seen.min_val, seen.max_val = max(seen.absmax, peak), min(seen.min_val, low), max(seen.max_val, high)
