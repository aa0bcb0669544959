"""What TensorRT needs from this machine, checked before anything imports it.

TensorRT is imported lazily: without it (or without a GPU) `build` and the tensorrt backend
stop at once with one line saying what to install and where it can run."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from btdeploy.artifacts.manifest import package_version
from btdeploy.backends.tensorrt.engines import MIN_TENSORRT, parse_version
from btdeploy.errors import BtDeployError

INSTALL_TENSORRT = "pip install 'tensorrt>=10.14'"
WHERE = "on Linux or Windows with an NVIDIA GPU (it downloads from pypi.nvidia.com)"


def tensorrt_version() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return None
    return package_version("tensorrt") or "unknown"


def gpu() -> tuple[str, tuple[int, int]] | None:
    """(name, compute capability) of CUDA device 0, or None when torch sees no GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), (int(major), int(minor))


def unavailable_reason() -> str | None:
    """Why the TensorRT path cannot run on this machine, or None."""
    if gpu() is None:
        return "TensorRT needs an NVIDIA GPU (none on this machine)"
    if tensorrt_version() is None:
        return f"TensorRT is not installed ({INSTALL_TENSORRT})"
    return None


def require_gpu() -> tuple[str, tuple[int, int]]:
    found = gpu()
    if found is None:
        raise BtDeployError(
            "TensorRT needs an NVIDIA GPU and this machine has none (torch.cuda.is_available() is False): "
            "run btdeploy build on the GPU machine that will serve the engine; here, use ONNX Runtime "
            "(btdeploy check DIR --flavour ort --precision int8-dynamic)"
        )
    return found


def require_tensorrt() -> ModuleType:
    """The tensorrt module, at least 10.14, or a one-line error with the install command."""
    if tensorrt_version() is None:
        raise BtDeployError(f"TensorRT is not installed: {INSTALL_TENSORRT} {WHERE}, then run this again")
    try:
        import tensorrt
    except Exception as error:  # the PyPI stub raises when its real wheel was never fetched
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = f"TensorRT is installed but does not import ({first}): {INSTALL_TENSORRT} {WHERE}"
        raise BtDeployError(message) from None
    version = parse_version(str(tensorrt.__version__))
    if version[:2] < MIN_TENSORRT:
        raise BtDeployError(
            f"TensorRT {tensorrt.__version__} is older than any graph btdeploy writes (trt-compat graphs need "
            f"10.3, trt graphs 10.14): {INSTALL_TENSORRT}, or JetPack 6 on Jetson"
        )
    return tensorrt
