"""TensorRT engine files: their names, the record beside each, and whether this machine can run one.

An engine is tied to the TensorRT build and the GPU architecture it was built on, so both go
into its file name and its record, and a mismatch is refused before deserializing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from btdeploy.artifacts.files import write_json
from btdeploy.artifacts.graph_names import Precision
from btdeploy.backends.tensorrt.profiles import EngineProfile
from btdeploy.errors import BtDeployError

ENGINE_PRECISIONS = (Precision.FP16, Precision.INT8)  # what TensorRT builds: dynamic INT8 is ONNX Runtime only
MIN_TENSORRT = (10, 3)  # JetPack 6; trt-compat graphs parse from 10.3, trt graphs (ONNX Attention) from 10.14


def engine_file(precision: str, tensorrt_version: str, compute_capability: tuple[int, int]) -> str:
    """engine.<precision>.<trt-version>.sm<major><minor>.plan, e.g. engine.fp16.10.14.1.sm90.plan."""
    major, minor = compute_capability
    return f"engine.{precision}.{tensorrt_version}.sm{major}{minor}.plan"


def record_file(engine: Path) -> Path:
    return engine.with_suffix(".json")


@dataclass
class EngineRecord:
    """What an engine was built from and on; written beside it as JSON."""

    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    onnx_file: str
    onnx_sha256: str
    profile: dict[str, Any]
    build_seconds: float = 0.0
    workspace_gb: float = 0.0
    timing_cache: str | None = None

    @property
    def engine_profile(self) -> EngineProfile:
        return EngineProfile.from_json(self.profile)

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: Path) -> EngineRecord:
        try:
            data = json.loads(path.read_text())
            data["compute_capability"] = tuple(data["compute_capability"])
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as error:
            raise BtDeployError(f"{path} is missing or damaged ({error}): build the engine again") from None


def check_compatible(record: EngineRecord, tensorrt_version: str, gpu_name: str, capability: tuple[int, int]) -> None:
    """Refuse an engine built by another TensorRT or for another GPU architecture."""
    if record.tensorrt_version != tensorrt_version:
        raise BtDeployError(
            f"this engine was built with TensorRT {record.tensorrt_version}, this machine runs {tensorrt_version}: "
            f"rebuild it here with btdeploy build (engines are tied to the exact TensorRT version)"
        )
    if tuple(record.compute_capability) != tuple(capability):
        built = "sm{}{}".format(*record.compute_capability)
        here = "sm{}{}".format(*capability)
        raise BtDeployError(
            f"this engine was built for {record.gpu_name} ({built}), this GPU is {gpu_name} ({here}): "
            "rebuild it here with btdeploy build"
        )


def find_engine(folder: Path, precision: str, tensorrt_version: str, capability: tuple[int, int]) -> Path:
    """This machine's engine for the precision, or an error naming what is there instead."""
    wanted = folder / engine_file(precision, tensorrt_version, capability)
    if wanted.is_file():
        return wanted
    others = sorted(p.name for p in folder.glob(f"engine.{precision}.*.plan"))
    if others:
        check_compatible(EngineRecord.read(record_file(folder / others[0])), tensorrt_version, "this GPU", capability)
    raise BtDeployError(f"{wanted} does not exist: run btdeploy build {folder} --precision {precision}")


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
