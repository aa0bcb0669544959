"""btdeploy: export, optimize and run BridgeTower per head, with parity checks against PyTorch."""

from btdeploy.errors import BtDeployError
from btdeploy.runtime.runtime import Features, HeadOutput, Runtime, SplitRuntime, load, load_processor
from btdeploy.version import __version__

__all__ = [
    "BtDeployError",
    "Features",
    "HeadOutput",
    "Runtime",
    "SplitRuntime",
    "load",
    "load_processor",
    "__version__",
]
