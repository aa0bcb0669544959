"""transformers-style output objects: attribute and key access, in declaration order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Attributes transformers' BridgeTower outputs have that an exported graph never computes:
# they answer None, as transformers does when they were not asked for.
NOT_COMPUTED = ("loss", "hidden_states", "attentions", "cross_attentions")


class HeadOutput(Mapping[str, Any]):
    """Like transformers' ModelOutput: `out.logits`, `out["logits"]`, `out[0]`, `out[:2]`, `out.to_tuple()`;
    `out.loss`, `out.hidden_states` and `out.attentions` are None."""

    def __init__(self, head: str, values: dict[str, Any]) -> None:
        self._head = head
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        if name in NOT_COMPUTED:
            return None
        raise AttributeError(self._no_output(name))

    def __getitem__(self, key: str | int | slice) -> Any:
        if not isinstance(key, str):  # a position or a slice, as ModelOutput takes them: out[0], out[:2]
            return self.to_tuple()[key]
        if key not in self._values:
            raise KeyError(self._no_output(key))
        return self._values[key]

    def _no_output(self, name: str) -> str:
        values = self.__dict__.get("_values", {})  # read without __getattr__, which calls this
        return f"the {self.__dict__.get('_head')!r} head has no output {name!r}; it has {', '.join(values)}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self._values.values())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(getattr(v, 'shape', ()))}" for k, v in self._values.items())
        return f"HeadOutput[{self._head}]({shapes})"
