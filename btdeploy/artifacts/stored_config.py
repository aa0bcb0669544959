"""The model config an export stored in its manifest, read back without transformers.

The manifest holds `BridgeTowerConfig.to_dict()`. Everything that runs, checks, benches or serves a
graph only reads numbers from it (widths, lengths, token ids, image size), and importing transformers
to rebuild the class imports torch: 5-6 s and about 250 MB in a process that only runs ONNX graphs
(`btdeploy.load`, serve replicas, the bench's child processes). `to_transformers()` builds the class
where a caller needs it."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from btdeploy.imports import serial_imports

SUB_CONFIGS = ("text_config", "vision_config")

# The keys btdeploy reads, each an integer: a stored config without one is refused when it is read,
# not at the first call that needs it.
REQUIRED_INTEGERS: dict[str | None, tuple[str, ...]] = {
    None: ("hidden_size", "num_hidden_layers", "num_attention_heads"),
    "text_config": (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
        "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
    ),
    "vision_config": ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "num_channels"),
}  # fmt: skip


class StoredConfig:
    """Read-only attribute access to a stored config, as on transformers' config objects:
    `config.text_config.pad_token_id`. A missing key is an AttributeError, so `getattr(config, key,
    default)` answers as it does on transformers' config."""

    __slots__ = ("_values", "_parts")

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))
        parts = {name: StoredConfig(values[name]) for name in SUB_CONFIGS if isinstance(values.get(name), Mapping)}
        object.__setattr__(self, "_parts", parts)

    @classmethod
    def from_export(cls, values: Any) -> StoredConfig:
        """The config as `to_dict()` wrote it; ValueError says what is missing or wrong."""
        if not isinstance(values, Mapping):
            raise ValueError(f"expected a mapping of config keys, got {type(values).__name__}")
        if values.get("model_type") != "bridgetower":
            raise ValueError(f"model_type is {values.get('model_type')!r}, not 'bridgetower'")
        for part, keys in REQUIRED_INTEGERS.items():
            section = values if part is None else values.get(part)
            if not isinstance(section, Mapping):
                raise ValueError(f"{part} is not a mapping of config keys")
            for key in keys:
                value = section.get(key)
                if isinstance(value, bool) or not isinstance(value, int):
                    where = key if part is None else f"{part}.{key}"
                    raise ValueError(f"{where} is {value!r}, not an integer")
        return cls(values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in self.__slots__:
            raise AttributeError(name)  # copy and pickle ask for dunders before the slots are set
        if name in self._parts:
            return self._parts[name]
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"the stored config has no {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the stored config is read-only (tried to set {name!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        return StoredConfig, (self._values,)

    def __repr__(self) -> str:
        return f"StoredConfig({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        """The stored dict, a copy: what transformers' `to_dict()` returned at export."""
        return copy.deepcopy(self._values)

    def to_transformers(self) -> Any:
        """transformers' BridgeTowerConfig of these values (imports transformers, and torch with it)."""
        with serial_imports():
            from transformers import BridgeTowerConfig

        return BridgeTowerConfig.from_dict(self.to_dict())
