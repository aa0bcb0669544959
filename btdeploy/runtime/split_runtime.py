"""Split towers at run time: each tower once per item, cached features, all pairs through the fusion graph.

`load(DIR, head=..., split=True)` returns a SplitRuntime: called like the monolithic head it gives
the same outputs; `encode_images`, `encode_texts` and `score` work on the towers' features.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.files import write_bytes
from btdeploy.artifacts.manifest import Manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.configs import num_image_tokens
from btdeploy.model.towers import assemble_outputs
from btdeploy.runtime.validation import check_pixels, check_text

FEATURES_FORMAT = 1
SCORE_BATCH = 16  # pairs per run of the fusion graph in score()
# Per kind of features: the split graph that makes them, and the states the fusion graph reads.
TOWER_OF = {"image": "vision", "text": "text"}
STATES = {"image": "image_states", "text": "text_states"}


@dataclass
class Features:
    """One tower's outputs for a set of images or texts, and what made them."""

    kind: str  # "image" or "text"
    arrays: dict[str, np.ndarray]
    origin: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def __getitem__(self, rows: int | slice | Sequence[int] | np.ndarray) -> Features:
        """Some rows as features of the same origin: `features[3]` (one row, still scoreable),
        `features[:100]`, `features[[0, 5]]`."""
        count = len(self)
        if isinstance(rows, Integral) and not isinstance(rows, bool):
            if not -count <= int(rows) < count:
                raise BtDeployError(f"row {rows} is outside these {count} {self.kind} features")
            rows = [int(rows)]
        chosen: slice | np.ndarray = rows if isinstance(rows, slice) else np.asarray(rows)
        if isinstance(chosen, np.ndarray):
            if chosen.ndim != 1 or not (np.issubdtype(chosen.dtype, np.integer) or chosen.size == 0):
                raise BtDeployError(f"index {self.kind} features by a row, a slice or a list of rows, not {rows!r}")
            if chosen.size and (chosen.min() < -count or chosen.max() >= count):
                raise BtDeployError(f"rows {chosen.tolist()} reach outside these {count} {self.kind} features")
            chosen = chosen.astype(np.int64)
        return Features(self.kind, {name: array[chosen] for name, array in self.arrays.items()}, dict(self.origin))

    def __iter__(self) -> Iterator[Features]:
        return (self[row] for row in range(len(self)))

    @classmethod
    def concat(cls, parts: Sequence[Features]) -> Features:
        """Features encoded in several calls as one set, e.g. a gallery grown over time. They must
        come from the same graph; texts of different padded lengths are padded to the longest
        (masked tokens, which the fusion layers do not attend to)."""
        if not parts:
            raise BtDeployError("Features.concat needs at least one set of features")
        first = parts[0]
        for part in parts:
            if not isinstance(part, Features) or part.kind != first.kind or part.origin != first.origin:
                seen = _describe(part.origin) if isinstance(part, Features) else type(part).__name__
                raise BtDeployError(
                    f"cannot join {first.kind} features of {_describe(first.origin)} with "
                    f"{getattr(part, 'kind', '')} features of {seen}: encode them with one runtime"
                )
        arrays = [part.arrays for part in parts]
        if first.kind == "text":
            longest = max(int(a["attention_mask"].shape[1]) for a in arrays)
            arrays = [_padded_text(a, longest) for a in arrays]
        joined = {name: np.concatenate([a[name] for a in arrays]) for name in first.arrays}
        return Features(first.kind, joined, dict(first.origin))

    @property
    def holds_states(self) -> bool:
        """Whether these are a tower's features the fusion graph reads, not contrastive embeddings alone
        (what a gallery stores)."""
        return STATES.get(self.kind, "") in self.arrays

    def without_padding(self) -> Features:
        """Text features without the token columns that no row attends to, as the tokenizer pads
        these texts alone (the reverse of concat's padding); image features as they are."""
        if self.kind != "text" or not len(self):
            return self
        attended = np.flatnonzero(self.arrays["attention_mask"].any(axis=0))
        if not attended.size:
            return self
        columns = slice(int(attended[0]), int(attended[-1]) + 1)  # the tokenizer pads at one end
        arrays = {**self.arrays, "attention_mask": self.arrays["attention_mask"][:, columns]}
        arrays["text_states"] = self.arrays["text_states"][:, :, columns]
        return Features(self.kind, arrays, dict(self.origin))

    def __repr__(self) -> str:
        # The arrays' shapes, not their values: a base image feature is megabytes of numbers.
        arrays = ", ".join(f"{name} {array.dtype} {list(array.shape)}" for name, array in self.arrays.items())
        return f"Features({self.kind}, {len(self)} row(s): {arrays}; from {_describe(self.origin)})"

    def save(self, path: str | Path) -> None:
        """One .npz: the arrays and a JSON record of the checkpoint, graph and precision."""
        buffer = io.BytesIO()
        meta = {"format": FEATURES_FORMAT, "kind": self.kind, "origin": self.origin}
        np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **self.arrays)  # type: ignore[arg-type]
        write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Features:
        if not Path(path).is_file():
            raise BtDeployError(f"{path} does not exist: save features with features.save(path) first")
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                arrays = {name: data[name] for name in data.files if name != "__meta__"}
            kind, origin = meta["kind"], dict(meta["origin"])
        except Exception as error:  # a damaged .npz raises from zipfile, numpy or json
            reason = f"{type(error).__name__}: {error}".strip()[:160]
            raise BtDeployError(f"{path} is not a btdeploy features file ({reason}): encode the items again") from None
        if meta.get("format") != FEATURES_FORMAT:
            raise BtDeployError(
                f"{path} has features format {meta.get('format')}, this btdeploy reads {FEATURES_FORMAT}"
            )
        features = cls(kind, arrays, origin)
        features.validate(str(path))
        return features

    def validate(self, where: str = "these features") -> None:
        """Arrays that agree with each other: a known kind, float32 states, int64 masks, one row count."""
        expected = {"image": (STATES["image"],), "text": (STATES["text"], "attention_mask")}.get(self.kind)
        if expected is None or any(name not in self.arrays for name in expected):
            raise BtDeployError(f"{where}: {self.kind!r} features need arrays {expected}: encode the items again")
        rows = {name: int(array.shape[0]) if array.ndim else -1 for name, array in self.arrays.items()}
        if len(set(rows.values())) != 1 or -1 in rows.values():
            raise BtDeployError(f"{where}: the arrays disagree in row count ({rows}): encode the items again")
        for name, array in self.arrays.items():
            wanted = np.int64 if name == "attention_mask" else np.float32
            if array.dtype != wanted:
                raise BtDeployError(f"{where}: {name} is {array.dtype}, not {np.dtype(wanted)}: encode the items again")


def _padded_text(arrays: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Text features padded to `length` tokens: zero states under a zero mask."""
    extra = length - int(arrays["attention_mask"].shape[1])
    if extra == 0:
        return arrays
    states = np.pad(arrays["text_states"], ((0, 0), (0, 0), (0, extra), (0, 0)))
    return {**arrays, "text_states": states, "attention_mask": np.pad(arrays["attention_mask"], ((0, 0), (0, extra)))}


def _describe(origin: Mapping[str, Any]) -> str:
    graph, config = str(origin.get("graph_sha256"))[:12], str(origin.get("config_sha256"))[:12]
    return f"{origin.get('graph')} (sha256 {graph}) of {origin.get('source')} (config {config})"


class SplitRuntimeMixin:
    """encode_images / encode_texts / score on a Runtime whose backend is a SplitBackend."""

    manifest: Manifest
    backend: Any
    head: Any
    config: Any
    check_finite: bool

    def _check(self, features: Features, kind: str) -> None:
        if not isinstance(features, Features) or features.kind != kind:
            given = f"{features.kind} features" if isinstance(features, Features) else type(features).__name__
            raise BtDeployError(
                f"expected {kind} features from encode_{kind}s(...), got {given}: call score(images, texts), "
                "each from this runtime's encode_images and encode_texts"
            )
        features.validate(f"the {kind} features")
        self._check_shapes(features)
        expected = self.backend.origin(TOWER_OF[kind])
        if features.origin != expected:
            raise BtDeployError(
                f"these {kind} features were computed by {_describe(features.origin)}, this runtime uses "
                f"{_describe(expected)}: another checkpoint, head or precision; encode them again with this runtime"
            )

    def _check_shapes(self, features: Features) -> None:
        """States shaped as this model's towers make them: [rows, cross layers, tokens, hidden]."""
        config = self.config
        cross, hidden = int(config.num_hidden_layers), int(config.hidden_size)
        name = STATES[features.kind]
        states = features.arrays[name]
        tokens = num_image_tokens(config) if features.kind == "image" else None
        if features.kind == "text":
            tokens = (
                int(features.arrays["attention_mask"].shape[1]) if features.arrays["attention_mask"].ndim == 2 else -1
            )
        if states.ndim != 4 or states.shape[1:] != (cross, tokens, hidden):
            raise BtDeployError(
                f"the {features.kind} features' {name} are shaped {list(states.shape)}, this model's tower makes "
                f"[rows, {cross}, {tokens}, {hidden}]: encode the items again with this runtime"
            )

    def encode_images(self, pixel_values: Any = None, /, batch_size: int = 64, **inputs: Any) -> Features:
        """Run the vision tower once per image, `batch_size` images at a time (the tower's working
        memory is bounded; only the features are kept). Takes pixel_values or a processor's output."""
        if isinstance(pixel_values, Mapping):
            inputs = {**dict(pixel_values), **inputs}
        elif pixel_values is not None:
            inputs = {**inputs, "pixel_values": pixel_values}
        unknown = [name for name in inputs if name not in ("pixel_values", "pixel_mask")]
        if unknown:
            raise BtDeployError(f"encode_images takes pixel_values (pixel_mask is ignored), not {', '.join(unknown)}")
        pixels = check_pixels(self.config, _numpy(inputs.get("pixel_values")), self.check_finite)
        arrays = _in_batches(self.backend.vision, {"pixel_values": pixels}, batch_size)
        return Features("image", arrays, dict(self.backend.origin("vision")))

    def encode_texts(
        self, encoding: Any = None, attention_mask: Any = None, /, batch_size: int = 64, **inputs: Any
    ) -> Features:
        """Run the text tower once per text, `batch_size` texts at a time. Takes a tokenizer's
        output, or input_ids and attention_mask (without a mask every token is attended to)."""
        if isinstance(encoding, Mapping):
            inputs = {**dict(encoding), **inputs}
        elif encoding is not None:
            inputs = {**inputs, "input_ids": encoding}
        if attention_mask is not None:
            inputs = {**inputs, "attention_mask": attention_mask}
        unknown = [name for name in inputs if name not in ("input_ids", "attention_mask", "token_type_ids")]
        if unknown:
            raise BtDeployError(f"encode_texts takes input_ids and attention_mask, not {', '.join(unknown)}")
        ids, mask = check_text(self.config, _numpy(inputs.get("input_ids")), inputs.get("attention_mask"), self.head)
        arrays = _in_batches(self.backend.text, {"input_ids": ids, "attention_mask": mask}, batch_size)
        return Features("text", arrays, dict(self.backend.origin("text")))

    def score(self, images: Features, texts: Features, batch_size: int = SCORE_BATCH) -> dict[str, np.ndarray]:
        """The head's outputs for every (image, text) pair: arrays shaped [images, texts, ...].

        Each tower ran once per item (in encode_*); here only the fusion graph runs, on
        batches of up to batch_size pairs."""
        self._check(images, "image")
        self._check(texts, "text")
        if not len(images) or not len(texts):
            raise BtDeployError(f"nothing to score: {len(images)} image(s) and {len(texts)} text(s)")
        batch_size = _checked_batch_size(batch_size)
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


def _in_batches(run: Any, feeds: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """One tower over the rows `batch_size` at a time: its working memory stays bounded."""
    batch_size = _checked_batch_size(batch_size)
    rows = len(next(iter(feeds.values())))
    chunks = [run({k: v[start : start + batch_size] for k, v in feeds.items()}) for start in range(0, rows, batch_size)]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}


def _checked_batch_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise BtDeployError(f"batch_size {value!r} must be a whole number, at least 1")
    return int(value)


def _numpy(value: Any) -> Any:
    """The input as given (the checks convert torch tensors), or one line when it is missing."""
    if value is None:
        raise BtDeployError("missing input: pass pixel_values (encode_images) or input_ids (encode_texts)")
    return value
