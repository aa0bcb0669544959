"""Requests merged into one batch and the results split back, row-exact.

Requests in a batch may have different text lengths: shorter ones are right-padded with the
tokenizer's pad id and mask 0 (RoBERTa counts positions over non-pad ids, so the padding changes
no real token's position), and outputs with a text-length axis are cut back to each request's
own length. Which outputs have that axis is read from the head's declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from btdeploy.model.heads import HeadSpec
from btdeploy.model.inputs import TEXT_LENGTH

TEXT_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class RowSlice:
    start: int
    stop: int
    text_length: int


def merge_requests(requests: list[dict[str, np.ndarray]], pad_id: int) -> tuple[dict[str, np.ndarray], list[RowSlice]]:
    """One set of feeds for many requests, and where each request's rows are."""
    longest = max(int(r["input_ids"].shape[1]) for r in requests)
    slices, start = [], 0
    for request in requests:
        rows = int(request["input_ids"].shape[0])
        slices.append(RowSlice(start, start + rows, int(request["input_ids"].shape[1])))
        start += rows
    merged: dict[str, np.ndarray] = {}
    for name in requests[0]:
        parts = []
        for request in requests:
            value = request[name]
            missing = longest - value.shape[1] if name in TEXT_INPUTS else 0
            if missing:
                fill = pad_id if name == "input_ids" else 0
                value = np.pad(value, ((0, 0), (0, missing)), constant_values=fill)
            parts.append(value)
        merged[name] = np.concatenate(parts)
    return merged, slices


def text_axes(head: HeadSpec, config: Any) -> dict[str, int | None]:
    """Per output, the index of its text-length axis (None when it has none)."""
    axes: dict[str, int | None] = {}
    for output in head.outputs:
        dims = output.dims(config)
        axes[output.name] = dims.index(TEXT_LENGTH) if TEXT_LENGTH in dims else None
    return axes


def split_outputs(
    values: dict[str, np.ndarray], slices: list[RowSlice], axes: dict[str, int | None]
) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output, cut back to its own text length."""
    results = []
    for part in slices:
        own = {}
        for name, array in values.items():
            rows = array[part.start : part.stop]
            axis = axes.get(name)
            if axis is not None:
                rows = np.take(rows, np.arange(part.text_length), axis=axis)
            own[name] = np.ascontiguousarray(rows)
        results.append(own)
    return results
