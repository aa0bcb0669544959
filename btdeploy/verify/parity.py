"""Reference vs backend: per-output errors against the head's declared tolerances."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from btdeploy.artifacts.graph_names import Precision
from btdeploy.backends.base import Backend
from btdeploy.errors import BtDeployError
from btdeploy.model.configs import max_text_length
from btdeploy.model.heads import HeadSpec, OutputSpec, Tolerance
from btdeploy.model.inputs import sample_inputs
from btdeploy.model.scenes import put_scenes


@dataclass
class OutputStats:
    """Errors of one output; merged across shapes by keeping the worst of each."""

    max_abs: float = 0.0
    max_rel: float = 0.0  # max |got - ref| / (|ref| + the absolute bound)
    of_range: float = 0.0  # max |got - ref| / max |ref|: what reduced precisions are bounded by
    cosine: float = 1.0
    argmax_agree: int = 0
    argmax_counted: int = 0  # positions whose reference top-2 margin is clear of the tolerance
    argmax_total: int = 0
    non_finite: int = 0  # NaN or Inf values in the backend's output

    def merge(self, other: OutputStats) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.of_range = max(self.of_range, other.of_range)
        self.cosine = min(self.cosine, other.cosine)
        self.argmax_agree += other.argmax_agree
        self.argmax_counted += other.argmax_counted
        self.argmax_total += other.argmax_total
        self.non_finite += other.non_finite

    @property
    def argmax_agreement(self) -> float | None:
        return self.argmax_agree / self.argmax_counted if self.argmax_counted else None


def compare(reference: np.ndarray, got: np.ndarray, spec: OutputSpec, tolerance: Tolerance) -> OutputStats:
    if reference.shape != got.shape:
        raise BtDeployError(f"output {spec.name} has shape {list(got.shape)}, the reference {list(reference.shape)}")
    ref = reference.astype(np.float64)
    out = got.astype(np.float64)
    stats = OutputStats(non_finite=int(np.size(out) - np.isfinite(out).sum()))
    if stats.non_finite:
        stats.max_abs = stats.max_rel = stats.of_range = float("inf")
        stats.cosine = float("nan")
        return stats
    diff = np.abs(out - ref)
    reference_range = float(np.abs(ref).max(initial=0.0))
    bound = tolerance.bound(reference_range)
    stats.max_abs = float(diff.max(initial=0.0))
    stats.max_rel = float(np.max(diff / (np.abs(ref) + bound), initial=0.0)) if bound > 0 else 0.0
    stats.of_range = stats.max_abs / reference_range if reference_range > 0 else 0.0
    norms = np.linalg.norm(ref) * np.linalg.norm(out)
    stats.cosine = float(np.dot(ref.ravel(), out.ravel()) / norms) if norms > 0 else float(np.array_equal(ref, out))
    if spec.is_logits and ref.shape[-1] >= 2:
        top2 = np.sort(ref.reshape(-1, ref.shape[-1]), axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > tolerance.argmax_margin(reference_range)
        agree = ref.reshape(-1, ref.shape[-1]).argmax(-1) == out.reshape(-1, out.shape[-1]).argmax(-1)
        stats.argmax_total = int(clear.size)
        stats.argmax_counted = int(clear.sum())
        stats.argmax_agree = int((agree & clear).sum())
    return stats


def shortfalls(stats: OutputStats, tolerance: Tolerance) -> list[str]:
    """Each floor the output misses, said with its number: the one definition of passing."""
    if stats.non_finite:
        return [f"{stats.non_finite} NaN or Inf values"]
    missed = []
    if not tolerance.of_range and stats.max_abs > tolerance.max_abs:
        missed.append(f"max_abs {stats.max_abs:.2e} > {tolerance.max_abs:g}")
    if stats.cosine < tolerance.min_cosine:
        missed.append(f"cosine {stats.cosine:.7f} < {tolerance.min_cosine:g}")
    agreement = stats.argmax_agreement
    if agreement is not None and agreement < tolerance.min_argmax_agreement:
        missed.append(
            f"argmax agreement {100 * agreement:.1f}% ({stats.argmax_agree} of {stats.argmax_counted} clear positions)"
            f" < {100 * tolerance.min_argmax_agreement:g}%"
        )
    return missed


def passes(stats: OutputStats, tolerance: Tolerance) -> bool:
    return not shortfalls(stats, tolerance)


@dataclass
class ParityRow:
    head: str
    output: str
    precision: str
    tolerance: Tolerance
    stats: OutputStats = field(default_factory=OutputStats)
    per_shape: list[dict[str, Any]] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)  # graph file -> the sha256 that was checked
    reference: dict[str, Any] = field(default_factory=dict)  # the checkpoint and weights hash it was held to
    retrieval: dict[str, Any] | None = None  # a retrieval row's ranking measures (verify/retrieval.py)

    @property
    def passed(self) -> bool:
        return passes(self.stats, self.tolerance)

    def to_json(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "output": self.output,
            "precision": self.precision,
            "passed": self.passed,
            **asdict(self.stats),
            "argmax_agreement": self.stats.argmax_agreement,
            "tolerance": {**asdict(self.tolerance), "text": self.tolerance.describe()},
            "per_shape": self.per_shape,
            "graphs": self.graphs,
            "reference": self.reference,
            **({"retrieval": self.retrieval} if self.retrieval is not None else {}),
        }


def default_lengths_within(defaults: Sequence[int], config: Any) -> tuple[int, ...]:
    """A command's default text lengths as the model takes them: each at most its positions. A
    length the user gives is refused past them (parse_shapes); a default is not theirs to fix (a
    config with max_position_embeddings 40, 38 tokens, had failed the pipeline's checks at 40)."""
    limit = max_text_length(config)
    return tuple(sorted({min(length, limit) for length in defaults}))


def parse_shapes(batch_sizes: Sequence[int], text_lengths: Sequence[int], config: Any) -> list[tuple[int, int]]:
    limit = max_text_length(config)
    for length in text_lengths:
        if not 1 <= length <= limit:
            raise BtDeployError(f"--seq-lens {length} is outside 1..{limit}")
    for batch in batch_sizes:
        if batch < 1:
            raise BtDeployError(f"--batch-sizes {batch} must be at least 1")
    return [(b, n) for b in batch_sizes for n in text_lengths]


def parse_batch_by_length(text: str, config: Any, option: str = "--shapes") -> list[tuple[int, int]]:
    """Shapes as the bench scripts take them, 1x5,3x40 (batch x text length), as (batch, length) pairs,
    or one line saying what is wrong."""
    try:
        shapes = [(int(batch), int(length)) for batch, length in (shape.split("x") for shape in text.split(","))]
    except ValueError:
        raise BtDeployError(f"{option} {text!r}: give batch x text length, e.g. 1x5,3x40") from None
    limit = max_text_length(config)
    if any(batch < 1 or not 1 <= length <= limit for batch, length in shapes):
        raise BtDeployError(f"{option} {text}: batch at least 1, text length 1..{limit}")
    return shapes


# How `check` makes the pixels of its generated inputs, as its report records it.
GENERATED_PIXELS = "random pixels in a batch of one row, synthetic scenes in a batch of several"


def generated_batches(
    config: Any, shapes: list[tuple[int, int]], seed: int = 0, processor: Any = None
) -> Iterator[dict[str, np.ndarray]]:
    """Padded random inputs, one batch per (batch, text length) shape. With the checkpoint's
    `processor`, a batch of several rows holds synthetic scenes instead of random pixels
    (model/scenes.py): graphs calibrated on noise alone had passed a check on noise and missed the
    floors on pictures. A batch of one row keeps its noise: a lone scene's two ITM logits can be
    small enough (about 0.25 with random weights) that INT8's few hundredths turn the pair by
    degrees, where the batch's cosine over several rows measures the graph rather than one row."""
    for index, (batch, length) in enumerate(shapes):
        feeds = sample_inputs(config, batch, length, seed=seed + index)
        if generated_pixels(batch, processor) == "scenes":
            feeds = put_scenes(feeds, range(batch), processor, seed + index)
        yield feeds


def generated_pixels(batch: int, processor: Any) -> str:
    """What `generated_batches` puts in a batch of `batch` rows: "scenes", or "random" pixels (a
    lone row, or an export without a processor to draw scenes through)."""
    return "scenes" if processor is not None and batch > 1 else "random"


def check_head(
    head: HeadSpec,
    reference: Backend,
    candidate: Backend,
    batches: Iterable[dict[str, np.ndarray]],
    precision: str = "fp32",
    observe: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None] | None = None,
) -> list[ParityRow]:
    """Run both backends on every batch; one row per output, the worst case kept. `observe` sees
    each batch's (reference, backend) outputs: what a measure over every batch at once gathers."""
    rows = [ParityRow(head.name, spec.name, precision, precision_tolerance(spec, precision)) for spec in head.outputs]
    for feeds in batches:
        expected = reference.run(feeds)
        got = candidate.run(feeds)
        if observe is not None:
            observe(expected, got)
        batch, length = (int(n) for n in feeds["input_ids"].shape)
        for row, spec in zip(rows, head.outputs, strict=True):
            stats = compare(expected[spec.name], got[spec.name], spec, row.tolerance)
            row.stats.merge(stats)
            row.per_shape.append({"batch": batch, "text_length": length, **asdict(stats)})
    return rows


def precision_tolerance(spec: OutputSpec, precision: str) -> Tolerance:
    tolerance = spec.tolerances.get(Precision(precision))
    if tolerance is None:
        raise BtDeployError(f"no {precision} tolerance is declared for output {spec.name}")
    return tolerance


def _argmax_cell(stats: OutputStats) -> str:
    if not stats.argmax_total:
        return "-"
    agreement = stats.argmax_agreement
    if agreement is None:
        return f"0 clear of {stats.argmax_total}"
    return f"{100 * agreement:.1f}% {stats.argmax_agree}/{stats.argmax_counted}/{stats.argmax_total}"


_COLUMNS = "{:<5} {:<15} {:>9} {:>9} {:>10} {:>22}  {:<44} {}"


def format_rows(rows: list[ParityRow]) -> str:
    header = _COLUMNS.format("head", "output", "max_abs", "of_range", "cosine", "argmax", "tolerance", "verdict")
    lines = [header, "-" * len(header)]
    for row in rows:
        s, t = row.stats, row.tolerance
        verdict = "PASS" if row.passed else ("FAIL (NaN/Inf)" if s.non_finite else "FAIL")
        lines.append(
            _COLUMNS.format(
                row.head,
                row.output,
                f"{s.max_abs:.2e}",
                f"{s.of_range:.2e}",
                f"{s.cosine:.7f}",
                _argmax_cell(s),
                t.describe(),
                verdict,
            )
        )
    # Which floor a failed row missed, with its number: the verdict column says only FAIL.
    lines += [f"{row.head} {row.output} FAILED: {'; '.join(shortfalls(row.stats, row.tolerance))}"
              for row in rows if not row.passed]  # fmt: skip
    lines += [describe_retrieval(row) for row in rows if row.retrieval is not None]
    lines.append(
        "of_range: max_abs / max |reference|.  argmax: agreement, agreeing/clear/all positions "
        "(clear: the reference's top-2 margin > 2 x the abs bound, or > the margin the tolerance gives "
        "as a fraction of the batch's range)"
    )
    return "\n".join(lines)


ITEM_NAMES = {"text": "caption", "image": "image"}  # what a retrieval row's queries and items are


def describe_retrieval(row: ParityRow) -> str:
    """One line: what a retrieval user reads off the row."""
    found = row.retrieval
    assert found is not None
    queries, items = (ITEM_NAMES[kind] for kind in row.output.split("_to_"))
    swaps = found["queries"] - found["top1_same"]
    score = found["score"]
    closest = f" (every swap within {found['largest_swapped_margin']:.2g} of the reference's {score})" if swaps else ""
    k = found["k"]
    recall_1, recall_k = found["recall_at_1"], found["recall_at_k"]
    return (
        f"{row.head} {row.output}: each of {found['queries']} {queries}s ranks {found['items']} {items}s by {score}; "
        f"top-1 as the reference {found['top1_same']}/{found['queries']}{closest}; "
        f"top-{k} overlap {found['top_k_overlap']:.3f}; "
        f"Recall@1 {recall_1['reference']:.3f} reference, {recall_1['graph']:.3f} graph; "
        f"Recall@{k} {recall_k['reference']:.3f}, {recall_k['graph']:.3f}"
    )
