"""NVIDIA Model Optimizer, imported lazily: fp16 and int8 need it, int8-dynamic does not."""

from __future__ import annotations

import logging

from btdeploy.errors import BtDeployError


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
