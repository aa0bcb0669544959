"""fp16: NVIDIA Model Optimizer's AutoCast. Inputs and outputs stay FP32; LayerNormalization,
Softmax and every node whose values leave FP16's comfortable range on the calibration rows
(AutoCast's data_max) stay FP32."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.artifacts.onnx_files import data_file, load_graph
from btdeploy.artifacts.weightless import (
    external_weights_read,
    read_external_weights,
    weightless_with_side_file,
)
from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
from btdeploy.progress import RowProgress
from btdeploy.quantize.modelopt_env import lean_conversion, require_modelopt
from btdeploy.quantize.onnx_stand_in import OnnxModuleSeenBy
from btdeploy.quantize.rows import CalibrationRows
from btdeploy.swaps import replaced

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
    with _streaming_reference_runs(source):
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
def _streaming_reference_runs(source: Path) -> Iterator[None]:
    """AutoCast's reference run keeps every intermediate tensor of every calibration row until
    it has run them all (on base, 4 rows peaked at 14.8 GB); AutoCast only needs each tensor's
    range. For the duration of one conversion its runner is replaced by one that folds each
    row into running ranges and drops the tensors; its shape inferences and model checks run on
    weightless copies (btdeploy/artifacts/weightless.py); and its model holds no weight until
    something reads their values (_WeightsLeftInTheFile). The graph is the same, byte for byte."""
    import modelopt.onnx.autocast.convert as autocast_convert
    from modelopt.onnx.autocast.nodeclassifier import NodeClassifier
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    weights = _WeightsLeftInTheFile(source)
    original_classify, original_convert = NodeClassifier.run, PrecisionConverter.convert

    def classify(classifier: Any, *args: Any, **kwargs: Any) -> Any:
        # Its initializer range rule reads every weight of the model it was given; the converter
        # works on a copy of that model, made while the weights were still in the file.
        with ExitStack() as held:
            for model in weights.models:
                held.enter_context(external_weights_read(model, source))
            return original_classify(classifier, *args, **kwargs)

    def convert(converter: Any, *args: Any, **kwargs: Any) -> Any:
        read_external_weights(converter.model, source)
        return original_convert(converter, *args, **kwargs)

    runner = _streaming_runner_class(autocast_convert.ReferenceRunner, source)
    with (
        replaced(
            (autocast_convert, "ReferenceRunner", runner),
            (autocast_convert, "onnx", weights),
            (NodeClassifier, "run", classify),
            (PrecisionConverter, "convert", convert),
        ),
        lean_conversion(),
    ):
        yield


class _WeightsLeftInTheFile(OnnxModuleSeenBy):
    """The onnx module as AutoCast's convert.py sees it during one conversion. Its read of the
    source (onnx.load without external data, which for a graph that holds its weights still
    parses every weight; its sanitizer's cleanup and its converter's deep copy then copy them
    all) becomes btdeploy's structure read: every weight an external reference into the file
    that holds it. Its load of those references is not done: the models it named are kept in
    `models`, for the node classifier to read their weights while it runs, and the converter
    reads the weights of its own copy when it starts. So the sanitizer, the type inference and
    the reference run (whose session reads the weights from the file) never hold them."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.models: list[onnx.ModelProto] = []
        self.external_data_helper = SimpleNamespace(load_external_data_for_model=self._keep_in_file)

    def load(self, path: str, load_external_data: bool = True) -> onnx.ModelProto:
        """AutoCast's read of its source, without the weights."""
        if load_external_data or Path(path).resolve() != self.source.resolve():
            raise RuntimeError(f"AutoCast read {path}, not the structure of {self.source} btdeploy expected")
        return load_graph(self.source, "optimize the head again", load_weights=False)

    def _keep_in_file(self, model: onnx.ModelProto, folder: str) -> None:
        if Path(folder).resolve() != self.source.parent.resolve():
            raise RuntimeError(f"AutoCast read weights from {folder}, not from {self.source.parent}")
        self.models.append(model)


def _streaming_runner_class(base: type, source: Path) -> type:
    from modelopt.onnx import utils as onnx_utils
    from modelopt.onnx.autocast.referencerunner import TensorStats
    from polygraphy import constants
    from polygraphy.backend.onnx import ModifyOutputs
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.logger import G_LOGGER

    class StreamingReferenceRunner(base):  # type: ignore[misc,valid-type,unused-ignore]
        def run(self, inputs: Any = None) -> OrderedDict[str, Any]:
            rows = list(self._load_inputs(inputs))
            progress = RowProgress(len(rows), "fp16 range check (AutoCast)")
            ranges: OrderedDict[str, Any] = OrderedDict()
            # Beside the source, whose files the model's weight references name by relative path;
            # a weight the model holds in memory goes to the side file.
            graph = source.with_name(f".{source.stem}.autocast-ranges.onnx")
            try:
                marked = weightless_with_side_file(self.model, data_file(graph))
                onnx_utils.clear_stale_value_info(marked)
                onnx.save(ModifyOutputs(marked, outputs=constants.MARK_ALL)(), str(graph))
                del marked
                # Polygraphy announces each session at INFO on stdout; btdeploy prints its own progress.
                quiet = G_LOGGER.verbosity(G_LOGGER.WARNING)
                with quiet, OnnxrtRunner(SessionFromOnnx(str(graph), providers=self.providers)) as runner:
                    for feeds in rows:
                        outputs = runner.infer(feeds)
                        for name, values in {**feeds, **outputs}.items():
                            _fold(ranges, name, np.asarray(values), TensorStats)
                        del outputs
                        progress.advance()
            finally:
                graph.unlink(missing_ok=True)
                data_file(graph).unlink(missing_ok=True)
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
