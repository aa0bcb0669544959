"""matplotlib for the bench plots: imported headless when installed, and figures saved as PNG atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_bytes
from btdeploy.imports import INSTALL_BENCH
from btdeploy.progress import warn


def pyplot(what: str) -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (with a warning naming what is skipped) without it."""
    try:
        import matplotlib
    except ImportError:
        warn(f"matplotlib is not installed: no {what} ({INSTALL_BENCH})")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure: Any, path: Path, dpi: int = 110) -> None:
    """Lay the figure out, write it as a PNG (temporary name, then renamed) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    write_bytes(path, buffer.getvalue())
