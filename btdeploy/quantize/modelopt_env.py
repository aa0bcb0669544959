"""NVIDIA Model Optimizer, imported lazily: fp16 and int8 need it, int8-dynamic does not."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from btdeploy.errors import BtDeployError
from btdeploy.quantize.weightless import check_without_weights, infer_shapes_without_weights


def require_modelopt() -> None:
    try:
        import modelopt.onnx  # noqa: F401
    except ImportError:
        raise BtDeployError(
            "fp16 and int8 need NVIDIA Model Optimizer: pip install 'nvidia-modelopt[onnx]==0.47.0' "
            "(int8-dynamic needs only ONNX Runtime)"
        ) from None
    # Model Optimizer logs every node at INFO; btdeploy prints its own progress.
    for name in ("modelopt", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def weightless_inference() -> Iterator[None]:
    """Model Optimizer's shape inferences and model checks, for the duration of one conversion, on
    weightless copies of the model (btdeploy/quantize/weightless.py): each of them otherwise
    serializes and parses the whole model (on base AutoCast, 120 s and 11.6 GB became 42 s and
    6.9 GB with btdeploy's streaming reference run; the graph is the same, byte for byte)."""
    import modelopt.onnx.utils as modelopt_utils

    original = modelopt_utils.infer_shapes, modelopt_utils.check_model
    modelopt_utils.infer_shapes = infer_shapes_without_weights
    modelopt_utils.check_model = check_without_weights
    try:
        yield
    finally:
        modelopt_utils.infer_shapes, modelopt_utils.check_model = original
