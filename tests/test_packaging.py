"""What pyproject.toml promises about Python versions is what the checkers hold the code to, and
what a user installing btdeploy from a wheel gets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGE = ROOT / "btdeploy"


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


# Platforms a user installs on: (platform_machine, platform_system); python_version 3.11 to 3.13.
PLATFORMS = [("x86_64", "Linux"), ("aarch64", "Linux"), ("arm64", "Darwin")]


def _onnxruntime_requirements(requirements: list[str], environment: dict[str, str]) -> list[Any]:
    from packaging.requirements import Requirement

    parsed = [Requirement(r) for r in requirements]
    return [
        r for r in parsed
        if r.name in {"onnxruntime", "onnxruntime-gpu"} and (r.marker is None or r.marker.evaluate(environment))
    ]  # fmt: skip


@pytest.mark.parametrize(("machine", "system"), PLATFORMS)
@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_one_onnxruntime_package_per_platform_the_one_model_optimizer_takes(
    machine: str, system: str, python: str
) -> None:
    """btdeploy had required onnxruntime-gpu everywhere: on aarch64 (Jetson, Grace) and macOS,
    where PyPI has no onnxruntime-gpu 1.24 and nvidia-modelopt[onnx] takes the CPU onnxruntime, the
    README's install found no version; had it found one, both packages (one module) would be installed."""
    import importlib.metadata as metadata

    from packaging.version import Version

    from btdeploy.imports import onnxruntime_distribution

    environment = {
        "platform_machine": machine, "platform_system": system, "sys_platform": system.lower(),
        "python_version": python, "python_full_version": f"{python}.0", "extra": "onnx",
    }  # fmt: skip
    ours = _onnxruntime_requirements(tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"], environment)
    theirs = _onnxruntime_requirements(metadata.requires("nvidia-modelopt") or [], environment)
    assert len(ours) == 1 and len(theirs) == 1, (ours, theirs)
    assert ours[0].name == theirs[0].name == onnxruntime_distribution(machine, system)
    # The release both must admit: the one tested here (the CPU package's on aarch64 and macOS).
    installed = Version(metadata.version(onnxruntime_distribution()))
    assert ours[0].specifier.contains(installed) and theirs[0].specifier.contains(installed)


def _package_files(folder: Path) -> set[str]:
    return {
        path.relative_to(folder.parent).as_posix()
        for path in folder.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.suffix != ".pyc"
        and not path.name.startswith(".")
    }


def _build_wheel(tmp_path: Path) -> zipfile.ZipFile:
    """A wheel built from a copy of the project, as pip builds one (setuptools' PEP 517 backend),
    so that nothing is written into the checkout."""
    source = tmp_path / "source"
    shutil.copytree(PACKAGE, source / "btdeploy", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path / "dist"
    script = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", script], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return zipfile.ZipFile(out / done.stdout.strip().splitlines()[-1])


def test_the_wheel_holds_every_file_of_the_package_and_its_type_marker(tmp_path: Path) -> None:
    with _build_wheel(tmp_path) as wheel:
        shipped = {name for name in wheel.namelist() if name.startswith("btdeploy/")}
    expected = _package_files(PACKAGE)
    assert "btdeploy/py.typed" in expected  # type checkers read btdeploy's annotations only with it
    assert any(name.startswith("btdeploy/data/") for name in expected)
    assert sorted(expected - shipped) == [], "left out of the wheel: add them to package-data in pyproject.toml"
    assert sorted(shipped - expected) == []
