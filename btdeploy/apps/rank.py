"""`btdeploy rank`: one image against many captions (or one caption against many images).

First stage, where the export has the ITC head: text-image cosine of the contrastive embeddings
(each tower once per item). Second stage: ITM match probability for the top K, on the split
graphs where the export has them (the query's tower once), else on the whole ITM head.

Candidates stream through in batches of `batch_size`: the query is preprocessed and encoded
once, each batch of candidates is read, preprocessed, scored and dropped, and only one score
per candidate is kept, so memory stays flat in the number of candidates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.apps.run import refuse_long_texts
from btdeploy.artifacts.graph_names import Precision
from btdeploy.artifacts.manifest import head_folders, read_manifest, require_one_checkpoint
from btdeploy.backends.targets import TARGETS, get_target
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import match_probability
from btdeploy.model.media import export_processor, image_inputs, load_image
from btdeploy.progress import say
from btdeploy.runtime.runtime import Runtime, SplitRuntime, load

DEFAULT_BATCH_SIZE = 64
# What ranks: the targets that run a head whole or as its split towers (ONNX Runtime, OpenVINO).
BACKENDS = tuple(name for name, target in TARGETS.items() if target.runs_split)


@dataclass
class RankedItem:
    label: str  # the caption, or the image file name
    itm_probability: float | None
    itc_cosine: float | None
    index: int  # its place among the candidates (the captions file's line, the folder's sorted images)

    def as_json(self) -> dict[str, Any]:
        """Named as the server's /v1/rank names its rows."""
        return {
            "item": self.label,
            "index": self.index,
            "match_probability": self.itm_probability,
            "itc_cosine": self.itc_cosine,
        }


@dataclass
class Query:
    """The single item of a ranking, preprocessed once, and how to preprocess the candidates."""

    is_image: bool  # an image against captions; else a caption against images
    inputs: dict[str, np.ndarray]  # pixel_values, or input_ids + attention_mask, for one item
    processor: Any

    def candidate_batches(self, candidates: list[Any], batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(first index, inputs) per batch: captions tokenized, or images read and preprocessed."""
        for start in range(0, len(candidates), batch_size):
            chunk = candidates[start : start + batch_size]
            if self.is_image:
                encoding = self.processor.tokenizer(chunk, padding=True, return_tensors="np")
                yield start, {name: np.asarray(encoding[name]) for name in ("input_ids", "attention_mask")}
            else:
                pictures = [load_image(path, self.processor.image_processor) for path in chunk]
                yield start, {"pixel_values": image_inputs(self.processor, pictures)}


def _make_query(runtime: Runtime, image: Path | None, text: str | None) -> Query:
    processor = export_processor(runtime.manifest)
    if image is not None:
        picture = load_image(image, processor.image_processor)
        return Query(True, {"pixel_values": image_inputs(processor, [picture])}, processor)
    encoding = processor.tokenizer([text], return_tensors="np")
    inputs = {name: np.asarray(encoding[name]) for name in ("input_ids", "attention_mask")}
    return Query(False, inputs, processor)


def _pair_inputs(query: Query, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The whole head's inputs for (query, candidate) pairs: the query repeated per candidate."""
    rows = len(next(iter(batch.values())))
    repeated = {name: np.repeat(values, rows, axis=0) for name, values in query.inputs.items()}
    return {**repeated, **batch}


def _encode(runtime: SplitRuntime, inputs: dict[str, np.ndarray]) -> Any:
    if "pixel_values" in inputs:
        return runtime.encode_images(inputs["pixel_values"])
    return runtime.encode_texts(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def _itc_cosines(itc: Runtime, query: Query, candidates: list[Any], batch_size: int) -> np.ndarray:
    """Text-image cosine of the query against every candidate; split graphs need only the towers."""
    cosines = np.empty(len(candidates), dtype=np.float32)
    query_embeds = None
    if isinstance(itc, SplitRuntime):
        features = _encode(itc, query.inputs).arrays
        query_embeds = features["image_embeds" if query.is_image else "text_embeds"][0]
    for start, batch in query.candidate_batches(candidates, batch_size):
        if isinstance(itc, SplitRuntime):
            features = _encode(itc, batch).arrays
            embeds = features["text_embeds" if query.is_image else "image_embeds"]
            values = embeds @ query_embeds
        else:
            outputs = itc(**_pair_inputs(query, batch))
            values = (np.asarray(outputs.text_embeds) * np.asarray(outputs.image_embeds)).sum(-1)
        cosines[start : start + len(values)] = values
    return cosines


def _itm_probabilities(itm: Runtime, query: Query, candidates: list[Any], batch_size: int) -> np.ndarray:
    """ITM match probability of the query with every candidate."""
    probabilities = np.empty(len(candidates), dtype=np.float32)
    query_features = _encode(itm, query.inputs) if isinstance(itm, SplitRuntime) else None
    for start, batch in query.candidate_batches(candidates, batch_size):
        if isinstance(itm, SplitRuntime) and query_features is not None:
            features = _encode(itm, batch)
            images, texts = (query_features, features) if query.is_image else (features, query_features)
            logits = itm.score(images, texts, batch_size)["logits"].reshape(-1, 2)
        else:
            logits = np.asarray(itm(**_pair_inputs(query, batch)).logits)
        probabilities[start : start + len(logits)] = match_probability(logits)
    return probabilities


def _load(root: Path, head: str, backend: str, **options: Any) -> Runtime:
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
) -> tuple[list[RankedItem], str]:
    """Rank the items of the larger side against the single item of the other; returns (rows, stages).
    `options` go to `btdeploy.load` for both heads (providers, flavour, precision), on `backend`
    (one of BACKENDS)."""
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
    image_query = len(images) == 1
    candidates: list[Any] = texts if image_query else images
    labels = texts if image_query else [path.name for path in images]
    query_image, query_text = (images[0], None) if image_query else (None, texts[0])
    chosen = np.arange(len(candidates))
    cosines: dict[int, float] = {}
    stages = []
    options = {name: value for name, value in (options or {}).items() if value is not None}
    # Named as the target resolves them (a reduced precision without a flavour is the ort flavour's).
    resolved = get_target(backend).resolve(options)
    reduced = resolved.precision if resolved.precision != Precision.FP32 else None
    named = [backend] if backend != "onnxruntime" else []  # the default engine goes unnamed
    graphs = " ".join(named + [str(part) for part in (resolved.flavour, reduced) if part])
    has_itc = _has_head(root, "itc")
    if has_itc:  # before any work
        require_one_checkpoint(
            [read_manifest(folder) for folder in head_folders(root, ["itm", "itc"])],
            "rank takes its candidates from the itc head and scores them with the itm head",
        )
    itm = _load(root, "itm", backend, **options)
    itm_query = _make_query(itm, query_image, query_text)
    refuse_long_texts(itm_query.processor, texts, itm)  # before any work: the captions, or the query
    if has_itc:
        itc = _load(root, "itc", backend, **options)
        query = _make_query(itc, query_image, query_text)
        say(f"rank: ITC cosine over {len(candidates)} candidate(s), {batch_size} at a time")
        similarity = _itc_cosines(itc, query, candidates, batch_size)
        chosen = np.argsort(-similarity, kind="stable")[:top_k]
        cosines = {int(index): float(similarity[index]) for index in chosen}
        on = f" ({graphs})" if graphs else ""
        stages.append(f"ITC cosine over {len(candidates)}{on}, top {len(chosen)} to ITM")
    probability = _itm_probabilities(itm, itm_query, [candidates[i] for i in chosen], batch_size)
    where = [w for w in ("split graphs" if isinstance(itm, SplitRuntime) else "", graphs) if w]
    stages.append(f"ITM on {len(chosen)}" + (f" ({', '.join(where)})" if where else ""))
    ranked = [
        RankedItem(labels[index], float(p), cosines.get(int(index)), int(index))
        for index, p in zip(chosen, probability, strict=True)
    ]
    ranked.sort(key=lambda item: -(item.itm_probability or 0.0))
    return ranked[:top_k], "; ".join(stages)


def format_ranking(rows: list[RankedItem]) -> str:
    lines = [f"{'rank':>4}  {'ITM match':>9}  {'ITC cosine':>10}  item", "-" * 48]
    for position, row in enumerate(rows, 1):
        cosine = f"{row.itc_cosine:+.4f}" if row.itc_cosine is not None else "-"
        lines.append(f"{position:>4}  {row.itm_probability:>9.4f}  {cosine:>10}  {row.label}")
    return "\n".join(lines)
