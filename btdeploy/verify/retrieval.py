"""Retrieval over the user's image-caption pairs (`check --images --texts` on a head with a
RetrievalSpec, itc): each caption ranks every image, and each image every caption, by the cosine
of their embeddings, on the reference and on the graph.

The two cosine matrices are held to each other as a logits output is (one ParityRow per direction,
at the precision's floors: the top-1 of every query whose reference margin is clear). Beside that,
what a retrieval user asks of a reduced precision is reported as they would measure it: how many
queries find the reference's top-1 (all queries, close calls included, and how close the closest
swap was), the overlap of the top K, and Recall@1 and Recall@K against the pairs themselves for
both, where captions and images pair as `check` pairs them (row k: image k % images, caption k %
captions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from btdeploy.model.heads import HeadSpec, RetrievalSpec
from btdeploy.verify.parity import ParityRow, compare, precision_tolerance

TOP_K = 5  # Recall@K and the top-K overlap, or every item where there are fewer


@dataclass
class PairedEmbeddings:
    """Each caption's and each image's embedding from the reference and from the graph, gathered
    batch by batch as `check` runs its pairs in order."""

    spec: RetrievalSpec
    captions: int  # distinct captions and images the pairs hold
    images: int
    rows: int = 0  # pairs seen so far
    reference: dict[str, dict[int, np.ndarray]] = field(default_factory=lambda: {"text": {}, "image": {}})
    candidate: dict[str, dict[int, np.ndarray]] = field(default_factory=lambda: {"text": {}, "image": {}})

    @property
    def rankable(self) -> bool:
        """Two of each at least: one caption or one image has nothing to rank."""
        return self.captions >= 2 and self.images >= 2

    def observe(self, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        """One batch of pairs: a caption's embedding does not depend on the image beside it, so its
        first row stands for it (and an image's likewise; dynamic INT8, whose scales span the batch,
        answers a recurring one slightly differently per batch, within its floors)."""
        batch = len(expected[self.spec.text])
        for offset in range(batch):
            row = self.rows + offset
            for kind, name, index in (
                ("text", self.spec.text, row % self.captions),
                ("image", self.spec.image, row % self.images),
            ):
                self.reference[kind].setdefault(index, np.asarray(expected[name][offset], dtype=np.float64))
                self.candidate[kind].setdefault(index, np.asarray(got[name][offset], dtype=np.float64))
        self.rows += batch

    def cosines(self, embeddings: dict[str, dict[int, np.ndarray]]) -> np.ndarray:
        """[captions, images]: the cosine of every caption with every image."""
        texts = _unit(np.stack([embeddings["text"][k] for k in range(self.captions)]))
        images = _unit(np.stack([embeddings["image"][k] for k in range(self.images)]))
        return texts @ images.T

    def pairs(self) -> np.ndarray:
        """[captions, images]: True where `check` paired the two."""
        truth = np.zeros((self.captions, self.images), dtype=bool)
        for row in range(self.rows):
            truth[row % self.captions, row % self.images] = True
        return truth


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


def retrieval_rows(head: HeadSpec, paired: PairedEmbeddings, precision: str) -> list[ParityRow]:
    """A row per direction (text_to_image, image_to_text), or none where the pairs hold fewer than
    two captions or images."""
    spec = head.retrieval
    if spec is None or not paired.rankable:
        return []
    reference, got = paired.cosines(paired.reference), paired.cosines(paired.candidate)
    truth = paired.pairs()
    rows = []
    matrices = ((reference, got, truth), (reference.T, got.T, truth.T))
    for output, (ref, out, pairs) in zip(spec.outputs, matrices, strict=True):
        tolerance = precision_tolerance(output, precision)
        row = ParityRow(head.name, output.name, precision, tolerance, compare(ref, out, output, tolerance))
        row.retrieval = retrieval_summary(ref, out, pairs)
        rows.append(row)
    return rows
