"""Retrieval over the user's image-caption pairs (`check --images --texts` on a head with a
retrieval spec): each caption ranks every image, and each image every caption, on the reference
and on the graph. itc ranks by the cosine of its embeddings; itm by each pair's log-odds of
matching, which it answers only for the pairs it runs, so it ranks with `--all-pairs` (every
caption with every image).

The two score matrices are held to each other as a logits output is (one ParityRow per direction,
at the precision's floors: the top-1 of every query whose reference margin is clear). Beside that,
what a retrieval user asks of a reduced precision is reported as they would measure it: how many
queries find the reference's top-1 (all queries, close calls included, and how close the closest
swap was), the overlap of the top K, and Recall@1 and Recall@K against the pairs themselves for
both, where captions and images pair as `check` pairs them (image k with caption k, the shorter
list repeating).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from btdeploy.model.heads import EmbeddingRetrieval, HeadSpec, MatchRetrieval, RetrievalSpec
from btdeploy.verify.parity import ParityRow, compare, precision_tolerance

TOP_K = 5  # Recall@K and the top-K overlap, or every item where there are fewer


@dataclass(frozen=True)
class PairLayout:
    """Which caption and which image each row of a check on the user's files holds: image k with
    caption k (the shorter list repeating), or with `every_pair` every caption with every image,
    caption by caption."""

    captions: int
    images: int
    every_pair: bool = False

    @property
    def rows(self) -> int:
        return self.captions * self.images if self.every_pair else max(self.captions, self.images)

    def indices(self, row: int) -> tuple[int, int]:
        """(caption, image) of a row."""
        if self.every_pair:
            return row // self.images, row % self.images
        return row % self.captions, row % self.images

    def truth(self) -> np.ndarray:
        """[captions, images]: True where the user's lists pair the two."""
        truth = np.zeros((self.captions, self.images), dtype=bool)
        for k in range(max(self.captions, self.images)):
            truth[k % self.captions, k % self.images] = True
        return truth


@dataclass
class PairedScores:
    """The score of every caption with every image on the reference and on the graph, gathered
    batch by batch as `check` runs its rows in order: from each caption's and image's embedding
    (EmbeddingRetrieval), or from each pair's match logits (MatchRetrieval)."""

    spec: RetrievalSpec
    layout: PairLayout
    rows: int = 0  # rows seen so far
    sides: dict[str, dict[str, dict[Any, np.ndarray]]] = field(
        default_factory=lambda: {side: {"text": {}, "image": {}, "pair": {}} for side in ("reference", "graph")}
    )

    @property
    def rankable(self) -> bool:
        return self.unrankable() is None

    def unrankable(self) -> str | None:
        """Why the pairs cannot be ranked, or None: one caption or one image has nothing to rank,
        and a head that scores only the pairs it runs needs every pair run."""
        layout = self.layout
        if layout.captions < 2 or layout.images < 2:
            return f"{layout.captions} caption(s) and {layout.images} image(s): ranking needs two of each"
        if self.spec.every_pair and not layout.every_pair:
            return "it ranks with --all-pairs (every caption with every image)"
        return None

    def observe(self, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        """One batch of rows. A caption's embedding does not depend on the image beside it, so its
        first row stands for it (and an image's likewise; dynamic INT8, whose scales span the batch,
        answers a recurring one slightly differently per batch, within its floors)."""
        spec = self.spec
        for side, outputs in (("reference", expected), ("graph", got)):
            kept = self.sides[side]
            for offset in range(len(next(iter(outputs.values())))):
                caption, image = self.layout.indices(self.rows + offset)
                if isinstance(spec, MatchRetrieval):
                    logits = np.asarray(outputs[spec.logits][offset], dtype=np.float64)
                    kept["pair"].setdefault((caption, image), logits[1] - logits[0])
                else:
                    kept["text"].setdefault(caption, np.asarray(outputs[spec.text][offset], dtype=np.float64))
                    kept["image"].setdefault(image, np.asarray(outputs[spec.image][offset], dtype=np.float64))
        self.rows += len(next(iter(expected.values())))

    def scores(self, side: str) -> np.ndarray:
        """[captions, images]: the score of every caption with every image on one side."""
        kept, layout = self.sides[side], self.layout
        if isinstance(self.spec, EmbeddingRetrieval):
            texts = _unit(np.stack([kept["text"][k] for k in range(layout.captions)]))
            images = _unit(np.stack([kept["image"][k] for k in range(layout.images)]))
            return texts @ images.T
        return np.array([[kept["pair"][c, i] for i in range(layout.images)] for c in range(layout.captions)])


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def retrieval_summary(reference: np.ndarray, got: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Queries are rows, items columns; `truth` marks each query's own items."""
    queries, items = reference.shape
    k = min(TOP_K, items)
    ref_order = np.argsort(-reference, axis=1, kind="stable")
    got_order = np.argsort(-got, axis=1, kind="stable")
    ref_top, got_top = ref_order[:, 0], got_order[:, 0]
    swapped = np.flatnonzero(ref_top != got_top)
    # How far below its own top-1 the reference put the graph's pick: a swap of near-equals, or not.
    margins = reference[swapped, ref_top[swapped]] - reference[swapped, got_top[swapped]]
    overlap = [len(set(ref_order[q, :k]) & set(got_order[q, :k])) / k for q in range(queries)]

    def recall(order: np.ndarray, depth: int) -> float:
        return float(np.mean([truth[q, order[q, :depth]].any() for q in range(queries)]))

    return {
        "queries": int(queries),
        "items": int(items),
        "k": int(k),
        "top1_same": int(queries - len(swapped)),
        "largest_swapped_margin": float(margins.max()) if len(swapped) else None,
        "top_k_overlap": float(np.mean(overlap)),
        "recall_at_1": {"reference": recall(ref_order, 1), "graph": recall(got_order, 1)},
        "recall_at_k": {"reference": recall(ref_order, k), "graph": recall(got_order, k)},
    }


def retrieval_rows(head: HeadSpec, paired: PairedScores, precision: str) -> list[ParityRow]:
    """A row per direction (text_to_image, image_to_text), or none where the pairs cannot be
    ranked (fewer than two captions or images; itm without every pair)."""
    spec = head.retrieval
    if spec is None or not paired.rankable:
        return []
    reference, got = paired.scores("reference"), paired.scores("graph")
    truth = paired.layout.truth()
    rows = []
    matrices = ((reference, got, truth), (reference.T, got.T, truth.T))
    for output, (ref, out, pairs) in zip(spec.outputs, matrices, strict=True):
        tolerance = precision_tolerance(output, precision)
        row = ParityRow(head.name, output.name, precision, tolerance, compare(ref, out, output, tolerance))
        row.retrieval = {"score": spec.score, **retrieval_summary(ref, out, pairs)}
        rows.append(row)
    return rows
