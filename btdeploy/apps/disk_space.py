"""Whether the graphs a pipeline run will write fit on the disk of its --out, known before any work.

On base the main job writes 37 GB; a disk that fills up stops it after minutes of work (with
nothing half-written, but stopped). So the run first adds up the least its new graphs can take and
refuses at once where even that exceeds the free space. The sum is a lower bound, so a refusal is
never wrong: every weight is stored at least once per graph, in at least its precision's bytes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from btdeploy.artifacts.files import nearest_existing
from btdeploy.artifacts.graph_names import STEMS, Flavour, Precision, graph_file
from btdeploy.errors import BtDeployError
from btdeploy.progress import say

# The least bytes one weight takes in a graph of each stored precision (INT8 graphs keep
# embeddings and biases wider; FP16 graphs keep LayerNorm weights in FP32).
BYTES_PER_WEIGHT = {Precision.FP32: 4, Precision.FP16: 2, Precision.INT8: 1, Precision.INT8_DYNAMIC: 1}

# A graph drops the weights no output reads (the masked-LM head's last image-side cross layer:
# 3 % of base mlm's weights), so only this share of the model's weights is counted.
LIVE_SHARE = 0.95


@dataclass(frozen=True)
class HeadPlan:
    """One head's graphs a run makes (flavour None: the export), and its model's weight count."""

    head: str
    weights: int
    graphs: list[tuple[Flavour | None, Precision]]


def bytes_at_least(weights: int, precision: Precision) -> int:
    return int(weights * LIVE_SHARE) * BYTES_PER_WEIGHT[precision]


def new_graph_bytes(out: Path, plans: list[HeadPlan], split: bool) -> tuple[int, int]:
    """(bytes at least, file count) of the graphs not already in `out`: a kept or remade graph takes
    no new room once it is renamed into place. A head's split graphs (text, vision and fusion,
    written together) hold every weight once between them."""
    total = count = 0
    for plan in plans:
        folder = out / plan.head
        for flavour, precision in plan.graphs:
            least = bytes_at_least(plan.weights, precision)
            if not (folder / graph_file(flavour, precision)).exists():
                total, count = total + least, count + 1
            parts = [folder / graph_file(flavour, precision, stem) for stem in STEMS[1:]]
            if split and not any(part.exists() for part in parts):
                total, count = total + least, count + len(parts)
    return total, count


def require_disk_space(out: Path, plans: list[HeadPlan], split: bool) -> dict[str, int]:
    """Refuse, before any work, a run whose new graphs cannot fit on the disk of `out`; else what
    was estimated, for the run's record."""
    need, count = new_graph_bytes(out, plans, split)
    free = shutil.disk_usage(nearest_existing(out)).free
    if need > free:
        raise BtDeployError(
            f"this run writes {count} new graph files to {out}, at least {size_text(need)}, and its disk has "
            f"{size_text(free)} free: free some space, give --out on a larger disk, or make fewer graphs "
            f"(--heads, --flavours, --precisions none)"
        )
    if count:
        say(
            f"pipeline: {count} new graph files, at least {size_text(need)}; "
            f"{size_text(free)} free on the disk of {out}"
        )
    return {"new_graph_files": count, "new_graph_bytes_at_least": need, "free_bytes": free}


def size_text(count: int) -> str:
    """A byte count as people read disk sizes (decimal GB, as `df -H`)."""
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


__all__ = ["HeadPlan", "require_disk_space"]
