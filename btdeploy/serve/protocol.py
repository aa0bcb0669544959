"""The Open Inference Protocol (KServe v2) for one exported head: metadata, request decoding, responses.

Pure Python and numpy, so the server, the Triton repository writer and the load generator share it
and it is tested without a server. Every problem with a request is a `RequestError` carrying the
HTTP status and one line that says what was wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from btdeploy.artifacts.manifest import Manifest

# numpy dtype name <-> protocol datatype (the ones btdeploy's graphs use, and their neighbours
# so that a wrong one is named, not unknown).
DATATYPES = {
    "bool": "BOOL",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
NUMPY_TYPES = {datatype: name for name, datatype in DATATYPES.items()}
# The binary tensor extension (Triton's, which tritonclient.http uses by default): the JSON header
# is the first Inference-Header-Content-Length bytes of the body, raw tensors follow it.
BINARY_HEADER = "inference-header-content-length"


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic axis

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _specs(entries: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            entry["name"],
            DATATYPES[entry["dtype"]],
            tuple(dim if isinstance(dim, int) else -1 for dim in entry["shape"]),
        )
        for entry in entries
    )


@dataclass(frozen=True)
class ModelSignature:
    """A head as the protocol sees it: its name, inputs and outputs, from the manifest."""

    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest, platform: str = "onnxruntime_onnx") -> ModelSignature:
        return cls(manifest.head, platform, _specs(manifest.data["inputs"]), _specs(manifest.data["outputs"]))

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": self.platform,
            "inputs": [spec.as_json() for spec in self.inputs],
            "outputs": [spec.as_json() for spec in self.outputs],
        }

    def decode(self, body: bytes, header_length: str | None = None) -> tuple[dict[str, np.ndarray], list[str], str]:
        """(feeds, requested output names, request id) from an infer request body."""
        request, binary = _split_binary(body, header_length)
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise RequestError(400, 'an infer request is a JSON object with "inputs": [{name, shape, datatype, data}]')
        declared = {spec.name: spec for spec in self.inputs}
        feeds: dict[str, np.ndarray] = {}
        offset = 0
        for tensor in request["inputs"]:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
                raise RequestError(400, "every input needs a name, a shape, a datatype and data")
            name = tensor["name"]
            if name not in declared:
                raise RequestError(400, f"model {self.name} has no input {name!r}: it takes {', '.join(declared)}")
            if name in feeds:
                raise RequestError(400, f"input {name!r} is given twice")
            array, offset = _decode_tensor(declared[name], tensor, binary, offset)
            feeds[name] = array
        missing = [name for name in declared if name not in feeds]
        if missing:
            raise RequestError(
                400, f"missing input(s) {', '.join(missing)}: model {self.name} takes {', '.join(declared)}"
            )
        if offset != len(binary):
            raise RequestError(400, f"the body has {len(binary) - offset} binary byte(s) no input claims")
        outputs = self._requested_outputs(request.get("outputs"))
        request_id = request.get("id", "")
        return feeds, outputs, str(request_id) if request_id is not None else ""

    def _requested_outputs(self, requested: Any) -> list[str]:
        names = [spec.name for spec in self.outputs]
        if requested is None:
            return names
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise RequestError(400, '"outputs" must be a list of {"name": ...}')
        unknown = [o["name"] for o in requested if o["name"] not in names]
        if unknown:
            raise RequestError(
                400, f"model {self.name} has no output(s) {', '.join(map(str, unknown))}: it has {', '.join(names)}"
            )
        return [o["name"] for o in requested]

    def response(
        self, values: dict[str, np.ndarray], names: list[str], request_id: str, binary_outputs: set[str] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The response body and its extra headers: JSON, or JSON plus raw tensors for `binary_outputs`."""
        binary_outputs = binary_outputs or set()
        datatypes = {spec.name: spec.datatype for spec in self.outputs}
        entries, blobs = [], []
        for name in names:
            array = np.ascontiguousarray(values[name], dtype=NUMPY_TYPES[datatypes[name]])
            entry: dict[str, Any] = {"name": name, "datatype": datatypes[name], "shape": list(array.shape)}
            if name in binary_outputs:
                blob = array.tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = array.reshape(-1).tolist()
            entries.append(entry)
        header = {"model_name": self.name, "model_version": "1", "outputs": entries}
        if request_id:
            header["id"] = request_id
        text = json.dumps(header).encode()
        if not blobs:
            return text, {"content-type": "application/json"}
        return text + b"".join(blobs), {
            "content-type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(text)),
        }


def binary_outputs_requested(body: bytes, header_length: str | None, names: list[str]) -> set[str]:
    """The outputs the client asked to get as raw bytes (tritonclient's default)."""
    request, _ = _split_binary(body, header_length)
    everything = bool((request.get("parameters") or {}).get("binary_data_output"))
    chosen = set(names) if everything else set()
    for entry in request.get("outputs") or []:
        if isinstance(entry, dict) and (entry.get("parameters") or {}).get("binary_data"):
            chosen.add(entry["name"])
    return chosen


def _split_binary(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise RequestError(400, f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < length <= len(body):
            raise RequestError(
                400, f"Inference-Header-Content-Length {length} is outside the body of {len(body)} bytes"
            )
        json_part, binary = body[:length], body[length:]
    try:
        return json.loads(json_part), binary
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(
            400, f"the request body is not valid JSON ({error.msg if hasattr(error, 'msg') else error})"
        ) from None


def _decode_tensor(spec: TensorSpec, tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name = tensor["name"]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if datatype != spec.datatype:
        raise RequestError(400, f"input {name!r} must be datatype {spec.datatype}, got {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(400, f"input {name!r} needs a shape: a list of non-negative integers, got {shape!r}")
    expected = spec.shape
    if len(shape) != len(expected) or any(want not in (-1, got) for want, got in zip(expected, shape, strict=True)):
        raise RequestError(400, f"input {name!r} has shape {shape}, model {_shape_text(expected)}")
    count = int(np.prod(shape))
    dtype = np.dtype(NUMPY_TYPES[datatype])
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise RequestError(
                400, f"input {name!r}: binary_data_size {size!r} does not hold {count} {datatype} values"
            )
        return np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape).copy(), offset + size
    data = tensor.get("data")
    if not isinstance(data, list):
        raise RequestError(400, f"input {name!r} needs data: a flat list of {count} values (row-major)")
    flat = _flatten(data)
    if len(flat) != count:
        raise RequestError(400, f"input {name!r} has {len(flat)} values, its shape {shape} needs {count}")
    kinds = {type(v) for v in flat}
    allowed = (int, float) if dtype.kind == "f" else (int,)
    if not kinds.issubset(allowed) or bool in kinds:
        raise RequestError(400, f"input {name!r} must hold {datatype} numbers only")
    try:
        return np.asarray(flat, dtype=dtype).reshape(shape), offset
    except OverflowError:
        raise RequestError(400, f"input {name!r} holds a value out of range for {datatype}") from None


def _flatten(data: list[Any]) -> list[Any]:
    """The protocol sends data flat; nested lists (row-major) are accepted too, as KServe does."""
    if not any(isinstance(value, list) for value in data):
        return data
    flat: list[Any] = []
    for value in data:
        flat.extend(_flatten(value) if isinstance(value, list) else [value])
    return flat


def _shape_text(shape: tuple[int, ...]) -> str:
    return "takes [" + ", ".join("-1" if d == -1 else str(d) for d in shape) + "] (-1: any size)"
