"""The masked-LM head's answer, read once for `btdeploy run` and the server's /v1/mlm: each text
with every <mask> filled by its most likely token, and for each <mask> the `top_k` most likely
tokens with their probabilities (a softmax over the whole vocabulary at that position)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from btdeploy.errors import BtDeployError

MAX_TOP_K = 100  # candidates per <mask>: enough to read, and a bound on what one request returns


@dataclass(frozen=True)
class Candidate:
    token: str
    probability: float


@dataclass(frozen=True)
class FilledText:
    filled: str  # the text as the tokenizer decodes it, each <mask> replaced by its most likely token
    candidates: list[list[Candidate]]  # per <mask>, in text order: the most likely first

    @property
    def predicted_tokens(self) -> list[str]:
        return [per_mask[0].token for per_mask in self.candidates]


def top_k_problem(top_k: int) -> str | None:
    """Why `top_k` candidates per <mask> cannot be given, or None."""
    if not 1 <= top_k <= MAX_TOP_K:
        return f"top_k for the masked words must be 1..{MAX_TOP_K}, got {top_k}"
    return None


def fill_masks(
    logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, tokenizer: Any, top_k: int = 1
) -> list[FilledText]:
    """One FilledText per row of `input_ids`; `logits` is the head's [batch, length, vocabulary]."""
    problem = top_k_problem(top_k)
    if problem:
        raise BtDeployError(problem)
    answers = []
    for row, ids in enumerate(np.asarray(input_ids)):
        masked = ids == tokenizer.mask_token_id
        scores = np.asarray(logits[row][masked], dtype=np.float64)  # [masks, vocabulary]
        probabilities = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        # Stable on the negated probabilities: among equals the lowest id first, as argmax picks it.
        ranked = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
        filled_ids = ids.copy()
        filled_ids[masked] = ranked[:, 0]
        keep = np.asarray(attention_mask[row]).astype(bool)
        candidates = [
            [Candidate(tokenizer.decode([int(token)]), float(p[token])) for token in tokens]
            for tokens, p in zip(ranked, probabilities, strict=True)
        ]
        answers.append(FilledText(tokenizer.decode(filled_ids[keep].tolist(), skip_special_tokens=True), candidates))
    return answers
