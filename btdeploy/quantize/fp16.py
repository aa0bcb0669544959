"""fp16: NVIDIA Model Optimizer's AutoCast. Inputs and outputs stay FP32; LayerNormalization,
Softmax and every node whose values leave FP16's comfortable range on the calibration batch
(AutoCast's data_max) stay FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from btdeploy.artifacts.graph_names import Flavour
from btdeploy.optimize.graph_checks import FULL_PRECISION_OPS
from btdeploy.quantize.modelopt_env import require_modelopt

# How many calibration rows AutoCast's range check runs at once: it keeps every
# intermediate tensor of the batch, which for base is ~1 GB per row.
FP16_RANGE_ROWS = 4


def autocast_fp16(
    source: Path, feeds: dict[str, np.ndarray], workdir: Path, flavour: Flavour
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    require_modelopt()
    from modelopt.onnx.autocast import convert_to_mixed_precision

    rows = min(FP16_RANGE_ROWS, len(next(iter(feeds.values()))))
    npz = workdir / "range.npz"
    np.savez(npz, **{name: values[:rows] for name, values in feeds.items()})  # type: ignore[arg-type]
    model = convert_to_mixed_precision(
        str(source),
        low_precision_type="fp16",
        keep_io_types=True,
        op_types_to_exclude=list(FULL_PRECISION_OPS),
        calibration_data=str(npz),
        providers=["cpu"],
    )
    return model, {"tool": "modelopt.onnx.autocast", "op_types_kept_fp32": list(FULL_PRECISION_OPS), "range_rows": rows}
