"""transformers-style output objects: attribute and key access, in declaration order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class HeadOutput(Mapping[str, Any]):
    """Like transformers' ModelOutput: `out.logits`, `out["logits"]`, `out[0]`, `out.to_tuple()`."""

    def __init__(self, head: str, values: dict[str, Any]) -> None:
        self._head = head
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(
            f"the {self.__dict__.get('_head')!r} head has no output {name!r}; it has {', '.join(values)}"
        )

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, int):
            return self.to_tuple()[key]
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self._values.values())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(getattr(v, 'shape', ()))}" for k, v in self._values.items())
        return f"HeadOutput[{self._head}]({shapes})"
