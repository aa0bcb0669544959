"""TensorRT optimization profiles: derived from the head's declaration, validated, and used to
refuse a batch the engine was not built for before TensorRT sees it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.model.configs import max_text_length
from btdeploy.model.heads import HeadSpec


@dataclass(frozen=True)
class ShapeRange:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str, option: str) -> ShapeRange:
        parts = text.split(":")
        try:
            values = [int(part) for part in parts]
        except ValueError:
            values = []
        if len(values) != 3:
            raise BtDeployError(f"{option} {text!r}: give MIN:OPT:MAX, for example 1:8:32")
        return cls(*values)

    def validate(self, option: str, limit: int | None = None) -> None:
        if self.min < 1:
            raise BtDeployError(f"{option} {self}: the minimum must be at least 1")
        if not self.min <= self.opt <= self.max:
            raise BtDeployError(f"{option} {self}: need MIN <= OPT <= MAX")
        if limit is not None and self.max > limit:
            raise BtDeployError(f"{option} {self}: the maximum {self.max} exceeds this model's limit of {limit}")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class EngineProfile:
    batch: ShapeRange
    text_length: ShapeRange
    image_size: int
    channels: int

    def input_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of each engine input."""
        b, n = self.batch, self.text_length
        text = (b.min, n.min), (b.opt, n.opt), (b.max, n.max)
        image = tuple((size, self.channels, self.image_size, self.image_size) for size in (b.min, b.opt, b.max))
        return {"input_ids": text, "attention_mask": text, "pixel_values": image}  # type: ignore[dict-item]

    def check_feeds(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse inputs outside the profile with the option that would cover them."""
        batch, length = shapes["input_ids"]
        if not self.batch.min <= batch <= self.batch.max:
            raise BtDeployError(
                f"batch {batch} is outside the engine's profile {self.batch.min}..{self.batch.max}: "
                f"split the batch or rebuild with btdeploy build --batch {self.batch.min}:{self.batch.opt}:{batch}"
            )
        if not self.text_length.min <= length <= self.text_length.max:
            raise BtDeployError(
                f"text length {length} is outside the engine's profile {self.text_length.min}..{self.text_length.max}"
                f": rebuild with btdeploy build --seq-len 1:{self.text_length.opt}:{max(length, self.text_length.max)}"
            )
        pixels = shapes["pixel_values"]
        if tuple(pixels[1:]) != (self.channels, self.image_size, self.image_size):
            raise BtDeployError(
                f"pixel_values {list(pixels)}: this engine takes {self.channels}x{self.image_size}x{self.image_size} "
                "images (use the checkpoint's processor)"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineProfile:
        return cls(ShapeRange(**data["batch"]), ShapeRange(**data["text_length"]), data["image_size"], data["channels"])


def derive_profile(head: HeadSpec, config: Any, batch: str | None = None, seq_len: str | None = None) -> EngineProfile:
    """The head's declared profile, or the user's --batch/--seq-len, checked against the model."""
    limit = max_text_length(config)
    if batch:
        batch_range = ShapeRange.parse(batch, "--batch")
    else:
        batch_range = ShapeRange(*head.engine_batch)
    if seq_len:
        text_range = ShapeRange.parse(seq_len, "--seq-len")
    else:
        low, opt, high = head.engine_text_length
        text_range = ShapeRange(low, min(opt, limit), min(high, limit))  # smaller models have fewer positions
    batch_range.validate("--batch")
    text_range.validate("--seq-len", limit)
    vision = config.vision_config
    return EngineProfile(batch_range, text_range, int(vision.image_size), int(vision.num_channels))
