"""What pyproject.toml promises about Python versions is what the checkers hold the code to."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_the_oldest_python_admitted_is_the_one_mypy_and_ruff_check_against() -> None:
    """requires-python had said 3.10 while the code imported enum.StrEnum (3.11) and
    onnxruntime-gpu 1.24 ships no 3.10 wheel: mypy, told the oldest version, names such a module."""
    data = tomllib.loads(PYPROJECT.read_text())
    oldest = re.fullmatch(r">=\s*(\d+)\.(\d+)", data["project"]["requires-python"].strip())
    assert oldest, data["project"]["requires-python"]
    major, minor = oldest.groups()
    assert data["tool"]["mypy"]["python_version"] == f"{major}.{minor}"
    assert data["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert sys.version_info[:2] >= (int(major), int(minor))
