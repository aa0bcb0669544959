"""btdeploy: export, optimize and run BridgeTower per head, with parity checks against PyTorch."""

from .errors import BtDeployError
from .runtime import HeadOutput, Runtime, load

__version__ = "0.1.0"

__all__ = ["BtDeployError", "HeadOutput", "Runtime", "load", "__version__"]
