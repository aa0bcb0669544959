"""Split towers at run time: each tower once per item, cached features, all pairs through the fusion graph.

`load(DIR, head=..., split=True)` returns a SplitRuntime: called like the monolithic head it gives
the same outputs; `encode_images`, `encode_texts` and `score` work on the towers' features.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.files import write_bytes
from btdeploy.artifacts.manifest import Manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.towers import assemble_outputs
from btdeploy.runtime.validation import prepare_inputs

FEATURES_FORMAT = 1


@dataclass
class Features:
    """One tower's outputs for a set of images or texts, and what made them."""

    kind: str  # "image" or "text"
    arrays: dict[str, np.ndarray]
    origin: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def save(self, path: str | Path) -> None:
        """One .npz: the arrays and a JSON record of the checkpoint, graph and precision."""
        buffer = io.BytesIO()
        meta = {"format": FEATURES_FORMAT, "kind": self.kind, "origin": self.origin}
        np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **self.arrays)  # type: ignore[arg-type]
        write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Features:
        try:
            with np.load(Path(path)) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                arrays = {name: data[name] for name in data.files if name != "__meta__"}
        except (OSError, ValueError, KeyError) as error:
            raise BtDeployError(f"{path} is not a btdeploy features file ({error}): encode the items again") from None
        if meta.get("format") != FEATURES_FORMAT:
            raise BtDeployError(
                f"{path} has features format {meta.get('format')}, this btdeploy reads {FEATURES_FORMAT}"
            )
        return cls(meta["kind"], arrays, meta["origin"])


def _describe(origin: Mapping[str, Any]) -> str:
    return f"{origin.get('graph')} of {origin.get('source')} (config {str(origin.get('config_sha256'))[:12]})"


class SplitRuntimeMixin:
    """encode_images / encode_texts / score on a Runtime whose backend is a SplitBackend."""

    manifest: Manifest
    backend: Any
    head: Any
    config: Any

    def _check(self, features: Features, kind: str, stem: str) -> None:
        if not isinstance(features, Features) or features.kind != kind:
            raise BtDeployError(f"expected {kind} features from encode_{kind}s(...)")
        expected = self.backend.origin(stem)
        if features.origin != expected:
            raise BtDeployError(
                f"these {kind} features were computed by {_describe(features.origin)}, this runtime uses "
                f"{_describe(expected)}: a different checkpoint or precision; encode them again with this runtime"
            )

    def encode_images(self, pixel_values: Any = None, /, **inputs: Any) -> Features:
        """Run the vision tower once per image. Takes pixel_values or a processor's image output."""
        if isinstance(pixel_values, Mapping):
            inputs = {**dict(pixel_values), **inputs}
        elif pixel_values is not None:
            inputs = {**inputs, "pixel_values": pixel_values}
        pixels = np.asarray(_numpy(inputs.get("pixel_values")), dtype=np.float32)
        # The validator checks a whole head's inputs; a one-token text stands in for the absent one.
        rows = pixels.shape[0] if pixels.ndim == 4 else 1
        dummy = {
            "input_ids": np.zeros((rows, 1), dtype=np.int64),
            "attention_mask": np.ones((rows, 1), dtype=np.int64),
            "pixel_values": pixels,
        }
        prepared = prepare_inputs(self.head, self.config, dummy)
        arrays = self.backend.vision(prepared.feeds)
        return Features("image", arrays, dict(self.backend.origin("vision")))

    def encode_texts(self, encoding: Mapping[str, Any] | None = None, /, **inputs: Any) -> Features:
        """Run the text tower once per text. Takes input_ids and attention_mask (a tokenizer's output)."""
        if encoding is not None:
            inputs = {**dict(encoding), **inputs}
        ids = np.asarray(_numpy(inputs.get("input_ids")))
        size = int(self.config.vision_config.image_size)
        pixels = np.zeros((ids.shape[0], 3, size, size), dtype=np.float32)
        prepared = prepare_inputs(self.head, self.config, {**inputs, "pixel_values": pixels})
        arrays = self.backend.text(prepared.feeds)
        return Features("text", arrays, dict(self.backend.origin("text")))

    def score(self, images: Features, texts: Features, batch_size: int = 16) -> dict[str, np.ndarray]:
        """The head's outputs for every (image, text) pair: arrays shaped [images, texts, ...].

        Each tower ran once per item (in encode_*); here only the fusion graph runs, on
        batches of up to batch_size pairs."""
        self._check(images, "image", "vision")
        self._check(texts, "text", "text")
        if batch_size < 1:
            raise BtDeployError(f"batch_size {batch_size} must be at least 1")
        n_images, n_texts = len(images), len(texts)
        pairs = [(i, j) for i in range(n_images) for j in range(n_texts)]
        chunks: list[dict[str, np.ndarray]] = []
        for start in range(0, len(pairs), batch_size):
            rows = pairs[start : start + batch_size]
            image_rows = np.array([i for i, _ in rows])
            text_rows = np.array([j for _, j in rows])
            image = {k: v[image_rows] for k, v in images.arrays.items()}
            text = {k: v[text_rows] for k, v in texts.arrays.items()}
            values = {**text, **image, **self.backend.fusion(text, image)}
            chunks.append(assemble_outputs(self.head, values))
        return {
            name: np.concatenate([c[name] for c in chunks]).reshape(n_images, n_texts, *chunks[0][name].shape[1:])
            for name in self.head.output_names
        }


def _numpy(value: Any) -> Any:
    if value is None:
        raise BtDeployError("missing input: pass pixel_values (encode_images) or input_ids (encode_texts)")
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value
