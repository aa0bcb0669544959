"""`btdeploy rank`: one image against many captions (or one caption against many images).

First stage, where the export has the ITC head: text-image cosine of the contrastive embeddings
(each tower once per item). Second stage: ITM match probability for the top K, on the split
graphs where the export has them (the image tower once), else on the whole ITM head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.apps.run import load_processor
from btdeploy.artifacts.manifest import head_folders, read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.media import load_image
from btdeploy.runtime.runtime import Runtime, SplitRuntime, load


@dataclass
class RankedItem:
    label: str  # the caption, or the image file name
    itm_probability: float | None
    itc_cosine: float | None


def _load(root: Path, head: str, **options: Any) -> Runtime:
    manifest = read_manifest(head_folders(root, [head])[0])
    return load(manifest.folder, split=len(manifest.stems) > 1, **options)


def _has_head(root: Path, head: str) -> bool:
    return any(read_manifest(folder).head == head for folder in head_folders(root))


def _encode(processor: Any, images: list[Any], texts: list[str], limit: int) -> dict[str, np.ndarray]:
    encoding = processor(images, texts, padding=True, truncation=True, max_length=limit, return_tensors="np")
    return {name: np.asarray(encoding[name]) for name in ("input_ids", "attention_mask", "pixel_values")}


def _itc_cosines(itc: Runtime, images: list[Any], texts: list[str], processor: Any) -> np.ndarray:
    """Text-image cosine for every pair, [images * texts]; split graphs need only the towers."""
    if isinstance(itc, SplitRuntime):
        limit = int(itc.manifest.data["limits"]["max_text_length"])
        pixels = _encode(processor, images, [""] * len(images), limit)["pixel_values"]
        text_encoding = _encode(processor, [images[0]] * len(texts), texts, limit)
        image_embeds = itc.encode_images(pixels).arrays["image_embeds"]
        text_embeds = itc.encode_texts(
            input_ids=text_encoding["input_ids"], attention_mask=text_encoding["attention_mask"]
        ).arrays["text_embeds"]
        return (image_embeds @ text_embeds.T).reshape(-1)
    outputs = _pair_outputs(itc, images, texts, processor)
    return (outputs["text_embeds"] * outputs["image_embeds"]).sum(-1).reshape(-1)


def _pair_outputs(runtime: Runtime, images: list[Any], texts: list[str], processor: Any) -> dict[str, np.ndarray]:
    """The head's outputs for every (image, text) pair, shaped [images, texts, ...]."""
    limit = int(runtime.manifest.data["limits"]["max_text_length"])
    if isinstance(runtime, SplitRuntime):
        # Each tower once per item; only the fusion graph sees every pair.
        image_features = runtime.encode_images(_encode(processor, images, [""] * len(images), limit)["pixel_values"])
        text_encoding = _encode(processor, [images[0]] * len(texts), texts, limit)
        text_features = runtime.encode_texts(
            input_ids=text_encoding["input_ids"], attention_mask=text_encoding["attention_mask"]
        )
        return runtime.score(image_features, text_features)
    rows = []
    for image in images:
        outputs = runtime(**_encode(processor, [image] * len(texts), texts, limit))
        rows.append({name: np.asarray(outputs[name]) for name in runtime.head.output_names})
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def rank(
    root: Path,
    images: list[Path],
    texts: list[str],
    top_k: int = 5,
    providers: list[str] | None = None,
) -> tuple[list[RankedItem], str]:
    """Rank the items of the larger side against the single item of the other; returns (rows, stages)."""
    if top_k < 1:
        raise BtDeployError(f"--top-k {top_k} must be at least 1")
    if not texts:
        raise BtDeployError("no captions to rank: the texts file is empty")
    if not images:
        raise BtDeployError("no images to rank")
    if len(images) > 1 and len(texts) > 1:
        raise BtDeployError("rank one image against many captions, or one caption against many images")
    pictures = [load_image(path) for path in images]
    labels = [path.name for path in images] if len(images) > 1 else texts
    candidates = list(range(len(labels)))
    cosines: dict[int, float] = {}
    stages = []
    if _has_head(root, "itc"):
        itc = _load(root, "itc", providers=providers)
        similarity = _itc_cosines(itc, pictures, texts, load_processor(itc))
        cosines = {index: float(value) for index, value in enumerate(similarity)}
        candidates = sorted(candidates, key=lambda i: -cosines[i])[:top_k]
        stages.append(f"ITC cosine over {len(labels)}, top {len(candidates)} to ITM")
    itm = _load(root, "itm", providers=providers)
    chosen_images = [pictures[i] for i in candidates] if len(images) > 1 else pictures
    chosen_texts = texts if len(images) > 1 else [texts[i] for i in candidates]
    logits = _pair_outputs(itm, chosen_images, chosen_texts, load_processor(itm))["logits"].reshape(-1, 2)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probability = shifted[:, 1] / shifted.sum(-1)
    stages.append(f"ITM on {len(candidates)}" + (" (split graphs)" if isinstance(itm, SplitRuntime) else ""))
    ranked = [
        RankedItem(labels[index], float(p), cosines.get(index))
        for index, p in zip(candidates, probability, strict=True)
    ]
    ranked.sort(key=lambda item: -(item.itm_probability or 0.0))
    return ranked[:top_k], "; ".join(stages)


def format_ranking(rows: list[RankedItem]) -> str:
    lines = [f"{'rank':>4}  {'ITM match':>9}  {'ITC cosine':>10}  item", "-" * 48]
    for position, row in enumerate(rows, 1):
        cosine = f"{row.itc_cosine:+.4f}" if row.itc_cosine is not None else "-"
        lines.append(f"{position:>4}  {row.itm_probability:>9.4f}  {cosine:>10}  {row.label}")
    return "\n".join(lines)
