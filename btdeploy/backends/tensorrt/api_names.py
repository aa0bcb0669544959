"""The names each TensorRT release's Python bindings define, read from the real wheels.

TensorRT's bindings are published as wheels of their own (`tensorrt-cu12-bindings==V`); they
download on any machine, only the libraries behind them need NVIDIA's index. This module keeps
one list per release in btdeploy/data/tensorrt_api/<version>.txt (every identifier in the
binding's `tensorrt.so` and `__init__.py`), and names the TensorRT attributes btdeploy's own
TensorRT code uses, so a test can hold the second to the first for every supported release.

Refresh the data (downloads, installs nothing):

    python -m btdeploy.backends.tensorrt.api_names --write 10.3.0 10.13.3.9 10.14.1.48.post1 10.16.1.11 11.4.0.106
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from importlib import resources
from pathlib import Path

# The releases whose names btdeploy's TensorRT code must find: JetPack 6's 10.3 (trt-compat
# graphs), the first with the ONNX Attention operator (10.14), the last 10.x (10.16, for users
# who stay on 10) and the newest 11.x.
SUPPORTED_RELEASES = ("10.3.0", "10.13.3.9", "10.14.1.48.post1", "10.16.1.11", "11.4.0.106")
# The modules of btdeploy that call TensorRT itself.
TENSORRT_MODULES = ("build.py", "runner.py", "environment.py")
# Variables that hold TensorRT objects in btdeploy's TensorRT code (and `self.<name>` of them).
TENSORRT_OBJECTS = {"trt", "builder", "network", "parser", "config", "trt_profile", "engine", "context", "logger"}
# Class, method and enum-member shaped identifiers (not C++ symbols), as whole words.
IDENTIFIER = re.compile(rb"(?<![A-Za-z0-9_])(?:I?[A-Z][a-zA-Z0-9]+|[a-z][a-z0-9_]+|[A-Z][A-Z0-9_]+)(?![A-Za-z0-9_])")
_DATA = "data/tensorrt_api"


@cache
def release_names(release: str) -> frozenset[str]:
    text = resources.files("btdeploy").joinpath(f"{_DATA}/{release}.txt").read_text()
    return frozenset(text.split())


def names_used(source: str) -> set[str]:
    """Attributes read on TensorRT objects in a module: `trt.X`, `builder.X`, `self.context.X`, ..."""
    used: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in TENSORRT_OBJECTS:
            used.add(node.attr)
        elif isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name):
            if owner.value.id == "self" and owner.attr in TENSORRT_OBJECTS:
                used.add(node.attr)
            elif owner.value.id == "trt":  # trt.Logger.WARNING: WARNING is a member of Logger
                used.add(node.attr)
    return used


def btdeploy_names() -> dict[str, set[str]]:
    """Per module of btdeploy's TensorRT code, the TensorRT names it reads."""
    folder = Path(__file__).parent
    return {name: names_used((folder / name).read_text()) for name in TENSORRT_MODULES}


def defines(release: str, name: str) -> bool:
    """Whether a release's bindings hold `name`. The linker stores a string that ends another
    once (INPUT inside CONDITIONAL_INPUT), so a name may survive only as a word's suffix."""
    names = release_names(release)
    return name in names or any(word.endswith("_" + name) for word in names)


def missing_names(source_names: set[str], release: str) -> list[str]:
    """The names a release lacks; Python's own dunder names are every module's."""
    return sorted(name for name in source_names if not name.startswith("__") and not defines(release, name))


def extract(wheel: Path) -> list[str]:
    """Every identifier in a bindings wheel's tensorrt.so and __init__.py."""
    found: set[bytes] = set()
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.endswith(("tensorrt.so", "__init__.py")) and member.count("/") == 1:
                found.update(IDENTIFIER.findall(archive.read(member)))
    return sorted(token.decode() for token in found if 3 <= len(token) <= 48)


def _download(release: str, folder: Path) -> Path:
    # The wheels are per Python version; 10.3 was published for CPython 3.10 and older manylinux.
    for python, platform in (("3.11", "manylinux_2_28_x86_64"), ("3.10", "manylinux_2_17_x86_64")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder),
             "--python-version", python, "--platform", platform, f"tensorrt-cu12-bindings=={release}"],
            capture_output=True, check=False,
        )  # fmt: skip
        wheels = sorted(folder.glob(f"tensorrt_cu12_bindings-{release}-*.whl"))
        if wheels:
            return wheels[0]
    raise SystemExit(f"tensorrt-cu12-bindings=={release} did not download")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", nargs="+", metavar="RELEASE", help="download these releases and write their names")
    args = parser.parse_args(argv)
    target = Path(__file__).resolve().parents[2] / _DATA
    with tempfile.TemporaryDirectory() as scratch:
        for release in args.write or SUPPORTED_RELEASES:
            names = extract(_download(release, Path(scratch)))
            (target / f"{release}.txt").write_text("\n".join(names) + "\n")
            print(f"{release}: {len(names)} names -> {target / f'{release}.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
