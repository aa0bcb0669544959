"""`btdeploy check`: rebuild each head's reference from its manifest and hold the runtime to its tolerances."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.files import write_json
from btdeploy.artifacts.graph_names import STEMS, graph_file
from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest, tool_versions
from btdeploy.backends.base import Backend
from btdeploy.backends.targets import RunOptions, get_target, integer_sums
from btdeploy.backends.tensorrt import environment as tensorrt_env
from btdeploy.cpu import describe_cpu
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.model.media import (
    export_processor,
    image_inputs,
    load_image,
    paired_files,
    processor_if_any,
    require_readable_images,
    text_inputs,
    text_length_problem,
)
from btdeploy.model.scenes import NOISE_ALONE
from btdeploy.progress import RowProgress, say, step
from btdeploy.verify.junit import junit_suite, write_junit
from btdeploy.verify.parity import (
    GENERATED_PIXELS,
    ParityRow,
    check_head,
    default_lengths_within,
    generated_batches,
    generated_pixels,
    parse_shapes,
)
from btdeploy.verify.retrieval import PairedScores, PairLayout, retrieval_rows

DEFAULT_BATCH_SIZES = (1, 3)
DEFAULT_TEXT_LENGTHS = (5, 40)


def check_export(
    root: Path,
    heads: list[str] | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    text_lengths: tuple[int, ...] | None = None,
    backend: str = "onnxruntime",
    providers: list[str] | None = None,
    report: Path | None = None,
    flavour: str | None = None,
    precision: str | None = None,
    split: bool = False,
    references: ReferenceCache | None = None,
    images: Path | None = None,
    texts: Path | None = None,
    device: str | None = None,
    junit: Path | None = None,
    checkpoint: Path | None = None,
    exact_sums: bool = True,
    every_pair: bool = False,
) -> list[ParityRow]:
    """Reference vs the chosen graph; a reduced `precision` reads model.<flavour>.<precision>.onnx
    (flavour ort unless given) and is held to that precision's tolerances. A `references` cache
    shared by several checks of the same heads runs the PyTorch reference once per input.
    `device` is where the torch backend runs (fp16 on cuda, bf16 on cuda or a CPU with native
    bfloat16); the reference it is held to stays FP32 on the CPU.

    The inputs are generated (padded random ids and pixels at every batch size x text length), or,
    with `images` and `texts`, real pairs through the checkpoint's processor in batches of the
    largest batch size: what a release gate on the user's own data needs, INT8 above all.
    `checkpoint` is the reference's checkpoint folder where it is no longer at the recorded path.
    `exact_sums`: ONNX Runtime sums the INT8 graphs' integer products as a VNNI CPU does (False:
    its saturating kernel, where this CPU has one). `every_pair`: run every caption with every
    image instead of image k with caption k, so that itm ranks them too (captions x images rows)."""
    for flag, path, example in (("--report", report, "parity.json"), ("--junit", junit, "parity.xml")):
        if path is not None and Path(path).is_dir():
            raise BtDeployError(f"{flag} {path} is a folder: give a file name such as {Path(path) / example}")
    pair = paired_files(images, texts, ("--images", "--texts"))  # read once, for every head
    if pair:
        require_readable_images(pair[0], "--images")
    if every_pair and pair is None:
        raise BtDeployError("--all-pairs runs every caption with every image: give --images DIR and --texts FILE")
    target = get_target(backend)
    options = check_options(backend, providers, flavour, precision, split, device, exact_sums, checkpoint)
    reference_target = get_target("torch")
    reference_options = reference_target.resolve({"checkpoint": checkpoint})
    rows: list[ParityRow] = []
    for folder in head_folders(Path(root), heads):
        manifest = read_manifest(folder)
        head = get_head(manifest.head)
        config = manifest.config
        lengths = text_lengths or default_lengths_within(DEFAULT_TEXT_LENGTHS, config)
        shapes = parse_shapes(list(batch_sizes), list(lengths), config)
        paired = None  # a retrieval head's scores of the pairs, ranked when every batch has run
        processor = None  # generated inputs draw scenes through it, where the export has one
        if pair is not None:
            pairs = real_pairs(manifest, *pair, texts_option=f"--texts {texts}", every_pair=every_pair)
            # Counted as they run: every caption with every image of a large set runs for minutes.
            total = -(-pairs.layout.rows // max(batch_sizes))
            batches: Iterable[dict[str, np.ndarray]] = _counted(pairs.batches(max(batch_sizes)), total, head.name)
            inputs = f"{pairs.describe()}, {max(batch_sizes)} at a time"
            if head.retrieval is not None:
                paired = PairedScores(head.retrieval, pairs.layout)
                if (why := paired.unrankable()) is not None:
                    say(f"check {head.name}: no ranking rows: {why}")
        else:
            processor = processor_if_any(manifest)
            batches = generated_batches(config, shapes, processor=processor)
            sizes = ", ".join(f"{b}x{n}" for b, n in shapes)
            inputs = f"batch x length {sizes} (random ids; {NOISE_ALONE if processor is None else GENERATED_PIXELS})"
        # The candidate first: a backend that cannot run here fails before the reference is built.
        candidate = target.make(manifest, options)
        reference = (references or ReferenceCache()).backend(
            manifest, partial(reference_target.make, manifest, reference_options)
        )
        with step(f"check {head.name}: {candidate.description} vs reference on {inputs}"):
            observe = paired.observe if paired is not None else None
            head_rows = check_head(head, reference, candidate, batches, options.precision, observe)
        if paired is not None:
            head_rows += retrieval_rows(head, paired, options.precision)
        if pair is None:  # each batch's report says how its pixels were made
            for row in head_rows:
                for shape, (batch, _) in zip(row.per_shape, shapes, strict=True):
                    shape["pixels"] = generated_pixels(batch, processor)
        graphs = _checked_graphs(manifest, options) if target.reads_onnx else {}
        model = manifest.data["model"]
        # The reference is held to the recorded weights hash (where the export recorded one).
        reference_record = {"checkpoint": str(checkpoint or model["source"]), "seed": model["seed"],
                            "weights_sha256": model.get("weights_sha256")}  # fmt: skip
        for row in head_rows:
            row.graphs, row.reference = graphs, reference_record
        rows += head_rows
        del reference, candidate
    if report is not None or junit is not None:
        data = report_data(rows, backend, options, inputs_record(images, texts, rows, batch_sizes, every_pair))
        if report is not None:
            write_json(Path(report), data)
        if junit is not None:
            write_junit(Path(junit), [junit_suite(graph_label(backend, options), rows, data)])
    return rows


def _counted(batches: Iterable[dict[str, np.ndarray]], total: int, head: str) -> Iterator[dict[str, np.ndarray]]:
    """The batches, each counted when the check has compared it (from the first batch on: the
    models are loaded by then)."""
    progress = RowProgress(total, f"check {head}: batches")
    for feeds in batches:
        yield feeds
        progress.advance()


def check_options(
    backend: str = "onnxruntime",
    providers: list[str] | None = None,
    flavour: str | None = None,
    precision: str | None = None,
    split: bool = False,
    device: str | None = None,
    exact_sums: bool = True,
    checkpoint: Path | None = None,
) -> RunOptions:
    """The options a check runs `backend` with: the ones asked for, and every graph held to its
    full recorded hash where the backend reads graphs itself."""
    target = get_target(backend)
    requested: dict[str, Any] = {
        "providers": providers, "flavour": flavour, "split": split, "precision": precision, "device": device,
        "exact_sums": exact_sums,
    }  # fmt: skip
    requested |= {"verify_hash": True} if "verify_hash" in target.options else {}
    requested |= {"checkpoint": checkpoint} if "checkpoint" in target.options else {}  # --backend torch
    return target.resolve(requested)


def saturation_advice(graph: str) -> str:
    """What a check of an ort INT8 graph on ONNX Runtime's saturating kernel held it to, and what not."""
    return (
        f"integer sums: with --no-exact-sums, ONNX Runtime on this CPU (no VNNI or AMX) summed the integer "
        f"products of {graph} two at a time in a saturating int16, where a CPU with VNNI or AMX, and this "
        "one by default, sums them exactly: this check holds the graph as it runs with exact_sums=False."
    )


def graph_label(backend: str, options: RunOptions) -> str:
    """What a check ran, as reports title it: `model.ort.int8.onnx`, `text/vision/fusion.ort.onnx`
    (split), or `tensorrt fp16 engine`."""
    if not get_target(backend).reads_onnx:
        return f"{backend} {options.precision} engine"
    files = graph_file(options.flavour, options.precision)
    named = files.replace("model.", "/".join(STEMS[1:]) + ".") if options.split else files
    return named if backend == "onnxruntime" else f"{named} on {backend}"


def inputs_record(
    images: Path | None,
    texts: Path | None,
    rows: list[ParityRow],
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    every_pair: bool = False,
) -> dict[str, Any]:
    """What a check ran on, for its report: the user's pairs, or generated inputs at these batch
    sizes and the text lengths the rows ran (the defaults stop at each model's length)."""
    if images is not None:
        files = {"images": str(images), "texts": str(texts), "batch_size": max(batch_sizes)}
        return {"kind": "files", **files, "every_pair": every_pair}
    lengths = sorted({shape["text_length"] for row in rows for shape in row.per_shape})
    scenes = any(shape.get("pixels") == "scenes" for row in rows for shape in row.per_shape)
    pixels = GENERATED_PIXELS if scenes else "random pixels"
    return {"kind": "generated", "batch_sizes": list(batch_sizes), "text_lengths": lengths, "images": pixels}


def _checked_graphs(manifest: Manifest, options: RunOptions) -> dict[str, str]:
    """The graph files a check ran, with the sha256 it held them to (check verifies every byte), so
    a report names exactly what passed."""
    stems = [stem for stem in STEMS if stem != "model"] if options.split else ["model"]
    files = [graph_file(options.flavour, options.precision, stem) for stem in stems]
    return {name: str(manifest.data["graphs"].get(name, {}).get("sha256")) for name in files}


@dataclass
class RealPairs:
    """Image-caption pairs from the user's files, in the rows their PairLayout gives (image k with
    caption k, or every caption with every image), preprocessed batch by batch as the checkpoint's
    processor does."""

    processor: Any  # the export's, loaded once for the length check and every batch
    images: list[Path]
    captions: list[str]
    every_pair: bool = False

    @property
    def layout(self) -> PairLayout:
        return PairLayout(len(self.captions), len(self.images), self.every_pair)

    def describe(self) -> str:
        made = "pairs (every caption with every image)" if self.every_pair else "real pair(s)"
        return f"{self.layout.rows} {made} from {len(self.images)} image(s) and {len(self.captions)} caption(s)"

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        processor, layout = self.processor, self.layout

        # Each image decoded and preprocessed once, kept as its pixel rows (the processor crops
        # every image to the model's size, so rows made apart stack as a batch's): where the
        # captions outnumber the images the last batch's worth, and with every pair every image,
        # which recurs for each caption (about 1 MB of pixels an image on base; decoding it again
        # had taken 8-14 ms a row).
        @lru_cache(maxsize=layout.images if layout.every_pair else batch_size)
        def pixels(index: int) -> np.ndarray:
            return image_inputs(processor, [load_image(self.images[index], processor.image_processor)])[0]

        for start in range(0, layout.rows, batch_size):
            rows = [layout.indices(row) for row in range(start, min(start + batch_size, layout.rows))]
            texts = text_inputs(processor, [self.captions[caption] for caption, _ in rows])
            yield {**texts, "pixel_values": np.stack([pixels(image) for _, image in rows])}


def real_pairs(
    manifest: Manifest, images: list[Path], captions: list[str], texts_option: str, every_pair: bool = False
) -> RealPairs:
    """The pairs, with every caption checked against the model's length before anything runs
    (`texts_option`: the flag and file the captions came from, for the refusal)."""
    pairs = RealPairs(export_processor(manifest), images, captions, every_pair)
    limit = int(manifest.data["limits"]["max_text_length"])
    problem = text_length_problem(pairs.processor.tokenizer, pairs.captions, limit)
    if problem:
        raise BtDeployError(f"{texts_option}: {problem}")
    return pairs


@dataclass
class ReferenceCache:
    """The PyTorch reference's outputs by head folder and input: the pipeline checks a dozen graphs
    of each head on the same inputs, and the reference gives the same answer every time."""

    outputs: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)

    def backend(self, manifest: Manifest, make: Callable[[], Backend]) -> Backend:
        return _CachedReference(self, manifest, make)

    def forget(self, folder: Path) -> None:
        """Drop a head's entries (its checks are done): reference outputs of mlm are ~100 MB."""
        self.outputs = {key: value for key, value in self.outputs.items() if key[0] != str(folder)}


class _CachedReference:
    """The reference of one check: outputs from the cache, the model built only on a miss (and
    dropped with this object, so it does not sit in memory while the next graph is made)."""

    name = "torch"

    def __init__(self, cache: ReferenceCache, manifest: Manifest, make: Callable[[], Backend]) -> None:
        self.cache, self.folder, self.make = cache, str(manifest.folder), make
        self.head = manifest.head
        self.description = f"PyTorch reference of {manifest.head}"
        self.model: Backend | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = (self.folder, _fingerprint(feeds))
        if key not in self.cache.outputs:
            if self.model is None:
                with step(f"check {self.head}: rebuilding the PyTorch reference"):
                    self.model = self.make()
            self.cache.outputs[key] = self.model.run(feeds)
        return self.cache.outputs[key]


def _fingerprint(feeds: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(feeds):
        values = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}:{values.dtype}:{values.shape};".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def report_data(rows: list[ParityRow], backend: str, options: RunOptions, inputs: dict[str, Any]) -> dict[str, Any]:
    target = get_target(backend)
    return {
        "backend": backend,
        "graph": graph_file(options.flavour, options.precision) if target.reads_onnx else None,
        "flavour": options.flavour,
        "precision": options.precision,
        "split": options.split,
        # every option the backend reads (the reference's device, ONNX Runtime's providers), and the GPU
        "options": {name: getattr(options, name) for name in sorted(target.options)},
        # the ort INT8 graphs answer differently where ONNX Runtime's integer sums saturate
        "integer_sums": integer_sums(options) if backend == "onnxruntime" else None,
        "gpu": (found := tensorrt_env.gpu()) and found[0],
        "passed": all(r.passed for r in rows),
        "inputs": inputs,
        "versions": tool_versions(),
        "cpu": describe_cpu(),
        "rows": [r.to_json() for r in rows],
    }
