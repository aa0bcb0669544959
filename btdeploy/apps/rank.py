"""Ranking, for `btdeploy rank` and the server's /v1/rank alike: one image against many captions
(or one caption against many images).

First stage, where the itc head is there: text-image cosine of the contrastive embeddings (each
tower once per item), its top K to the second. Second stage: ITM match probability, on the split
graphs where the export has them (the query's tower once), else on the whole ITM head; where the
two heads share their towers (`Ranker.shares_towers`) on the features the first stage kept for its
top K (or made again by the itc towers), so that of the itm head only the fusion graph runs.
Without the itc head every candidate goes to ITM; without K, every candidate the first stage
scored.

Candidates stream through in batches of `batch_size`: the query is preprocessed and encoded
once, each batch of candidates is read, preprocessed, scored and dropped, and only one score
per candidate is kept, so memory stays flat in the number of candidates. Where the images come
from (files, or a request's bytes with a feature cache) is an `ItemReader`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.apps.run import refuse_long_texts
from btdeploy.artifacts.graph_names import Precision
from btdeploy.artifacts.manifest import head_folders, read_manifest, require_one_checkpoint, weights_identity
from btdeploy.backends.targets import TARGETS, get_target
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import match_probability, text_image_cosine
from btdeploy.model.media import export_processor, image_inputs, load_image, require_readable_images
from btdeploy.progress import say
from btdeploy.runtime.runtime import Runtime, SplitRuntime, load
from btdeploy.runtime.split_runtime import TOWER_OF, Features

DEFAULT_BATCH_SIZE = 64
# What ranks: the targets that run a head whole or as its split towers (ONNX Runtime, OpenVINO).
BACKENDS = tuple(name for name, target in TARGETS.items() if target.runs_split)
# The heads of the two stages.
CANDIDATE_HEAD = "itc"
SCORING_HEAD = "itm"


@dataclass
class RankedItem:
    label: str  # the caption, or the image's name
    itm_probability: float | None
    itc_cosine: float | None
    index: int  # its place among the candidates (the captions file's line, the folder's sorted images)

    def as_json(self) -> dict[str, Any]:
        return {
            "item": self.label,
            "index": self.index,
            "match_probability": self.itm_probability,
            "itc_cosine": self.itc_cosine,
        }


@dataclass
class Ranking:
    query: str  # "image": captions ranked against one image; "text": images against one caption
    stages: str  # what ran, on which graphs
    rows: list[RankedItem]  # best first

    def as_json(self) -> dict[str, Any]:
        """What `rank --json` prints and /v1/rank answers."""
        return {"query": self.query, "stages": self.stages, "ranking": [row.as_json() for row in self.rows]}


class ItemReader:
    """Where a ranking's items come from: images read as files (or URLs) when their batch comes,
    labelled by file name, and texts tokenized by the export's processor. A subclass reads them
    from elsewhere (the server: a request's bytes; a gallery: stored embeddings)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def label(self, item: Any, index: int) -> str:
        """An image's name in the ranking (texts are named by themselves)."""
        return Path(item).name

    def pictures(self, items: list[Any], first: int) -> list[Any]:
        """The items as RGB pictures; `first`: the index of the first, for messages."""
        return [load_image(item, self.processor.image_processor) for item in items]

    def pixels(self, items: list[Any], first: int) -> np.ndarray:
        return image_inputs(self.processor, self.pictures(items, first))

    def image_features(
        self, runtime: SplitRuntime, items: list[Any], first: int, embeddings_only: bool = False
    ) -> Features:
        """The vision tower's features of the items, on `runtime`'s split graphs. `embeddings_only`:
        the caller reads only the contrastive embeddings (a gallery hands its stored ones)."""
        return runtime.encode_images(self.pixels(items, first))

    def check_texts(self, ranker: Ranker, texts: list[str]) -> None:
        """Texts past the model's length refused before any work (a cut text gets another answer)."""
        refuse_long_texts(self.processor, texts, ranker.itm.manifest)

    def text_inputs(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoding = self.processor.tokenizer(texts, padding=True, return_tensors="np")
        return {name: np.asarray(encoding[name], dtype=np.int64) for name in ("input_ids", "attention_mask")}

    def text_features(
        self, runtime: SplitRuntime, texts: list[str], first: int, embeddings_only: bool = False
    ) -> Features:
        """The text tower's features of the texts, on `runtime`'s split graphs (`embeddings_only`:
        as for images)."""
        return runtime.encode_texts(self.text_inputs(texts))


@dataclass
class _Side:
    """The items of one side of a ranking, as the model takes them a batch at a time."""

    reader: ItemReader
    is_image: bool
    items: list[Any]

    def batches(self, batch_size: int) -> Iterator[tuple[int, list[Any]]]:
        for start in range(0, len(self.items), batch_size):
            yield start, self.items[start : start + batch_size]

    def inputs(self, items: list[Any], first: int) -> dict[str, np.ndarray]:
        """The whole head's inputs for these items: pixel_values, or input_ids + attention_mask."""
        if self.is_image:
            return {"pixel_values": self.reader.pixels(items, first)}
        return self.reader.text_inputs(items)

    def features(self, runtime: SplitRuntime, items: list[Any], first: int, embeddings_only: bool) -> Features:
        if self.is_image:
            return self.reader.image_features(runtime, items, first, embeddings_only)
        return self.reader.text_features(runtime, items, first, embeddings_only)


def describe_graphs(backend: str, options: dict[str, Any]) -> str:
    """The graphs a ranking runs as its stage line names them: the engine where it is not the
    default one, then the flavour and a reduced precision as the target resolves them."""
    resolved = get_target(backend).resolve({name: value for name, value in options.items() if value is not None})
    reduced = resolved.precision if resolved.precision != Precision.FP32 else None
    named = [backend] if backend != "onnxruntime" else []
    return " ".join(named + [str(part) for part in (resolved.flavour, reduced) if part])


class Ranker:
    """The two stages on loaded heads: `itc` (or None: ITM on every candidate) and `itm`."""

    def __init__(self, itm: Runtime, itc: Runtime | None, graphs: str = "", batch_size: int = DEFAULT_BATCH_SIZE):
        self.itm = itm
        self.itc = itc
        self.graphs = graphs
        self.batch_size = batch_size
        self.processor = export_processor(itm.manifest)

    @property
    def shares_towers(self) -> bool:
        """Whether the itm stage may score the features the itc stage's towers made: both heads on
        FP32 split graphs of one checkpoint, on one engine. Their towers then hold the same weights
        and compute the same states (bit for bit on base; each is held to the torch reference at the
        FP32 tolerance), so the itm head's own towers need not run, nor even open. Quantized
        towers are calibrated per head and differ."""
        itm, itc = self.itm, self.itc
        if not isinstance(itm, SplitRuntime) or not isinstance(itc, SplitRuntime):
            return False
        weights = weights_identity(itm.manifest)
        one_checkpoint = weights is not None and weights == weights_identity(itc.manifest)
        fp32 = itm.backend.precision == itc.backend.precision == Precision.FP32
        return one_checkpoint and fp32 and itm.backend.name == itc.backend.name

    def rank(
        self, images: list[Any], texts: list[str], top_k: int | None = None, reader: ItemReader | None = None
    ) -> Ranking:
        """The candidates of the larger side ranked against the single item of the other, the best
        `top_k` kept (all where None). `reader` reads the items (default: images as files)."""
        return self.ranked(images, texts, top_k, self.checked(images, texts, top_k, reader))

    def checked(self, images: list[Any], texts: list[str], top_k: int | None, reader: ItemReader | None) -> ItemReader:
        """The reader of a ranking whose request is sound, texts within the model's length included:
        refused before any work."""
        if len(images) > 1 and len(texts) > 1:
            raise BtDeployError("rank one image against many texts, or one text against many images")
        if not images or not texts:
            raise BtDeployError(f"nothing to rank: {len(images)} image(s) and {len(texts)} text(s)")
        if top_k is not None and top_k < 1:
            raise BtDeployError(f"top_k {top_k} must be at least 1")
        source = reader or ItemReader(self.processor)
        source.check_texts(self, texts)
        return source

    def ranked(self, images: list[Any], texts: list[str], top_k: int | None, source: ItemReader) -> Ranking:
        """`rank` once `checked` has passed the request."""
        image_query = len(images) == 1
        query = _Side(source, image_query, images if image_query else texts)
        candidates = _Side(source, not image_query, texts if image_query else images)
        count = len(candidates.items)
        labels = texts if image_query else [source.label(item, index) for index, item in enumerate(images)]
        chosen = np.arange(count)
        cosines: dict[int, float] = {}
        stages = []
        on = f" ({self.graphs})" if self.graphs else ""
        # Where the heads share towers, the itc stage keeps the query's features and, where they
        # are few enough (one batch at most: memory stays flat in the candidates), its best ones'.
        shared = self.shares_towers
        keep = top_k or count
        kept = _Kept(keep if keep <= self.batch_size else 0) if shared else None
        if self.itc is not None:
            similarity = self._scores(self.itc, query, candidates, COSINE, kept=kept)
            chosen = np.argsort(-similarity, kind="stable")[: top_k or count]
            cosines = {int(index): float(similarity[index]) for index in chosen}
            stages.append(f"ITC cosine over {count}{on}, top {len(chosen)} to ITM")
        where = [w for w in ("split graphs" if isinstance(self.itm, SplitRuntime) else "", self.graphs) if w]
        places = [int(i) for i in chosen]
        query_states = kept.query_states() if kept is not None else None
        chosen_states = kept.candidate_states(places) if kept is not None else None
        if query_states is not None and chosen_states is not None:
            assert isinstance(self.itm, SplitRuntime)  # as shares_towers requires
            pair = (query_states, chosen_states) if image_query else (chosen_states, query_states)
            probability = MATCH.on_features(self.itm, *(self.as_itm_features(side) for side in pair))
        else:  # a gallery's stored embeddings, or more candidates than were kept: their towers run again
            scored = _Side(source, candidates.is_image, [candidates.items[i] for i in chosen])
            towers = self.itc if shared and isinstance(self.itc, SplitRuntime) else None
            probability = self._scores(
                self.itm, query, scored, MATCH, places, towers=towers, query_features=query_states
            )
        if shared:
            where.append("the itc towers' features")
        stages.append(f"ITM on {len(chosen)}" + (f" ({', '.join(where)})" if where else ""))
        rows = [
            RankedItem(labels[index], float(p), cosines.get(int(index)), int(index))
            for index, p in zip(chosen, probability, strict=True)
        ]
        rows.sort(key=lambda item: -(item.itm_probability or 0.0))  # stable: ties keep the first stage's order
        return Ranking("image" if image_query else "text", "; ".join(stages), rows[: top_k or len(rows)])

    def _scores(
        self,
        runtime: Runtime,
        query: _Side,
        candidates: _Side,
        stage: _Stage,
        indices: list[int] | None = None,
        kept: _Kept | None = None,
        towers: SplitRuntime | None = None,
        query_features: Features | None = None,
    ) -> np.ndarray:
        """One score per candidate against the query; split graphs run the query's tower once.
        `indices`: the candidates' places among all of them (for messages and image names);
        `kept`: where the query's and the best candidates' features are kept; `towers`: whose
        towers make the features (default `runtime`'s own; the itc head's where they are shared);
        `query_features`: the query's, where already made."""
        values = np.empty(len(candidates.items), dtype=np.float32)
        places = indices if indices is not None else list(range(len(candidates.items)))
        if isinstance(runtime, SplitRuntime):
            encoder = towers or runtime
            embeddings_only = stage is COSINE
            if query_features is None:
                query_features = query.features(encoder, query.items, 0, embeddings_only)
            if kept is not None:
                kept.query = query_features
            for start, items in candidates.batches(self.batch_size):
                batch = candidates.features(encoder, items, places[start], embeddings_only)
                images, texts = (query_features, batch) if query.is_image else (batch, query_features)
                if encoder is not runtime:
                    images, texts = self.as_itm_features(images), self.as_itm_features(texts)
                found = stage.on_features(runtime, images, texts)
                values[start : start + len(found)] = found
                if kept is not None:
                    kept.offer(np.arange(start, start + len(found)), found, batch)
            return values
        query_inputs = query.inputs(query.items, 0)
        for start, items in candidates.batches(self.batch_size):
            repeated = {name: np.repeat(array, len(items), axis=0) for name, array in query_inputs.items()}
            found = stage.on_outputs(runtime(**repeated, **candidates.inputs(items, places[start])))
            values[start : start + len(found)] = found
        return values

    def as_itm_features(self, features: Features) -> Features:
        """Features of the itc head's towers named as the itm head's, which `shares_towers` says they are."""
        assert isinstance(self.itm, SplitRuntime)
        return Features(features.kind, features.arrays, dict(self.itm.backend.origin(TOWER_OF[features.kind])))


class _Kept:
    """The itc stage's tower features that the itm stage scores where the heads share towers:
    the query's, and those of the best `size` candidates so far (ties: the earlier one, as the
    stage's stable sort keeps it; none with size 0)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.query: Features | None = None
        self.places = np.empty(0, dtype=np.int64)
        self.scores = np.empty(0, dtype=np.float32)
        self.features: Features | None = None

    def offer(self, places: np.ndarray, scores: np.ndarray, features: Features) -> None:
        if not self.size:
            return
        places = np.concatenate([self.places, places])
        scores = np.concatenate([self.scores, np.asarray(scores, dtype=np.float32)])
        joined = features if self.features is None else Features.concat([self.features, features])
        best = np.lexsort((places, -scores))[: self.size]
        self.places, self.scores, self.features = places[best], scores[best], joined[best]

    def query_states(self) -> Features | None:
        """The query's features, where they hold the states the fusion graph reads."""
        return self.query if self.query is not None and self.query.holds_states else None

    def candidate_states(self, chosen: list[int]) -> Features | None:
        """The kept features of the `chosen` candidates (the best `size`) in that order, where they
        were kept with their states (a gallery keeps embeddings only; size 0 keeps none); texts
        padded as the tokenizer pads them alone, so that the fusion graph runs what it would run
        on them."""
        if self.features is None or not self.features.holds_states:
            return None
        row = {int(place): position for position, place in enumerate(self.places)}
        return self.features[[row[place] for place in chosen]].without_padding()


@dataclass(frozen=True)
class _Stage:
    """How a stage scores pairs: from the split towers' features, or from the whole head's outputs."""

    on_features: Callable[[SplitRuntime, Features, Features], np.ndarray]
    on_outputs: Callable[[Any], np.ndarray]


# ITC: the text-image cosine of each pair (the embeddings are unit vectors); split, the towers' embeddings suffice.
COSINE = _Stage(
    on_features=lambda runtime, images, texts: (images.arrays["image_embeds"] @ texts.arrays["text_embeds"].T).ravel(),
    on_outputs=lambda outputs: text_image_cosine(np.asarray(outputs.text_embeds), np.asarray(outputs.image_embeds)),
)
# ITM: the match probability of each pair, split through the fusion graph.
MATCH = _Stage(
    on_features=lambda runtime, images, texts: match_probability(runtime.score(images, texts)["logits"].reshape(-1, 2)),
    on_outputs=lambda outputs: match_probability(np.asarray(outputs.logits)),
)


def load_head(root: Path, head: str, backend: str, **options: Any) -> Runtime:
    """A head of the export under `root`, on its split graphs where it has them."""
    manifest = read_manifest(head_folders(root, [head])[0])
    return load(manifest.folder, backend=backend, split=len(manifest.stems) > 1, **options)


def _has_head(root: Path, head: str) -> bool:
    return any(read_manifest(folder).head == head for folder in head_folders(root))


def rank(
    root: Path,
    images: list[Path],
    texts: list[str],
    top_k: int = 5,
    options: dict[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    backend: str = "onnxruntime",
    reader: Callable[[Ranker], ItemReader] | None = None,
) -> Ranking:
    """`btdeploy rank`: the exported heads under `root` loaded and the best `top_k` ranked.
    `options` go to `btdeploy.load` for both heads (providers, flavour, precision), on `backend`
    (one of BACKENDS); `reader` makes the ranking's ItemReader (default: images as files)."""
    if top_k < 1:
        raise BtDeployError(f"--top-k {top_k} must be at least 1")
    if batch_size < 1:
        raise BtDeployError(f"--batch-size {batch_size} must be at least 1")
    if not texts:
        raise BtDeployError("no captions to rank: the texts file is empty")
    if not images:
        raise BtDeployError("no images to rank")
    if backend not in BACKENDS:
        raise BtDeployError(f"--backend {backend}: rank runs on {' or '.join(BACKENDS)}")
    if len(images) > 1 and len(texts) > 1:
        raise BtDeployError("rank one image against many captions, or one caption against many images")
    options = {name: value for name, value in (options or {}).items() if value is not None}
    graphs = describe_graphs(backend, options)
    has_itc = _has_head(root, CANDIDATE_HEAD)
    if has_itc:  # before any work
        require_one_checkpoint(
            [read_manifest(folder) for folder in head_folders(root, [SCORING_HEAD, CANDIDATE_HEAD])],
            "rank takes its candidates from the itc head and scores them with the itm head",
        )
    if reader is None:  # image files: each one's header read before the heads load
        require_readable_images(images, "rank")
    ranker = Ranker(load_head(root, SCORING_HEAD, backend, **options), None, graphs, batch_size)
    items = ranker.checked(images, texts, top_k, reader(ranker) if reader else None)  # before the itc head loads
    if has_itc:
        ranker.itc = load_head(root, CANDIDATE_HEAD, backend, **options)
    first = "ITC cosine" if has_itc else "ITM"
    say(f"rank: {first} over {max(len(images), len(texts))} candidate(s), {batch_size} at a time")
    return ranker.ranked(images, texts, top_k, items)


def format_ranking(rows: list[RankedItem]) -> str:
    lines = [f"{'rank':>4}  {'ITM match':>9}  {'ITC cosine':>10}  item", "-" * 48]
    for position, row in enumerate(rows, 1):
        cosine = f"{row.itc_cosine:+.4f}" if row.itc_cosine is not None else "-"
        lines.append(f"{position:>4}  {row.itm_probability:>9.4f}  {cosine:>10}  {row.label}")
    return "\n".join(lines)
