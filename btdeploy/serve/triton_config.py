"""Triton `config.pbtxt` text for btdeploy's models: the head (ONNX Runtime or TensorRT), the
Python preprocessing model, and the ensemble that chains them. Each config is built as a dict
and printed in protobuf text format; `triton_check` parses it with Triton's own schema."""

from __future__ import annotations

from typing import Any

# ONNX element types and numpy names -> Triton data types.
TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32"}
ENUM_FIELDS = {"data_type", "kind"}  # printed bare, not quoted


def tensor_entry(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"name": name, "data_type": TRITON_TYPES[dtype], "dims": dims}


def to_pbtxt(config: dict[str, Any], indent: int = 0) -> str:
    """A dict as protobuf text format: nested dicts are messages, lists of dicts repeated messages."""
    pad = "  " * indent
    lines = []
    for key, value in config.items():
        if isinstance(value, dict):
            if key in ("input_map", "output_map", "parameters_map"):
                for inner_key, inner in value.items():
                    lines.append(f"{pad}{key} {{ key: {_scalar(inner_key)} value: {_scalar(inner)} }}")
                continue
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"{pad}{key} {{\n{to_pbtxt(item, indent + 1)}{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {value if key in ENUM_FIELDS else _scalar(value)}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def parameters(values: dict[str, str]) -> list[dict[str, Any]]:
    """Triton's `parameters` map, one entry per key."""
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]
