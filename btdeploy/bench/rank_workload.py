"""`btdeploy bench --workload rank`: one image against N captions, split towers against the whole head.

The whole head runs the image tower once per caption (a batch of N copies of the image); the
split graphs run it once, the text tower on the N captions, and the fusion graph on N pairs.
Both are timed interleaved, at every precision for which both kinds of graph exist."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.files import write_json, write_text
from btdeploy.artifacts.graph_names import Flavour, Precision
from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest
from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
from btdeploy.backends.split import SplitBackend
from btdeploy.backends.targets import build_split
from btdeploy.bench.figures import pyplot, save_png
from btdeploy.bench.machine import cpu_text, machine_description
from btdeploy.bench.runner import one_text_length, time_case
from btdeploy.bench.stats import summarize
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.model.inputs import sample_inputs
from btdeploy.progress import say
from btdeploy.quantize.methods import quantized_graphs
from btdeploy.verify.parity import parse_shapes

# The whole and split graphs a CPU user runs: plain, ort and each precision of the ort flavour.
GRAPHS: list[tuple[Flavour | None, Precision]] = [
    (None, Precision.FP32),
    (Flavour.ORT, Precision.FP32),
    *((flavour, precision) for flavour, precision in quantized_graphs() if flavour == Flavour.ORT),
]


class _WholeHead:
    """The monolithic graph on one image repeated once per caption."""

    def __init__(self, backend: OnnxRuntimeBackend) -> None:
        self.backend = backend

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = feeds["input_ids"].shape[0]
        pixels = np.repeat(feeds["pixel_values"][:1], captions, axis=0)
        return self.backend.run({**feeds, "pixel_values": pixels})


class _SplitTowers:
    """Vision tower once, text tower on the captions, fusion on every pair."""

    def __init__(self, backend: SplitBackend) -> None:
        self.backend = backend

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = feeds["input_ids"].shape[0]
        image = self.backend.vision({"pixel_values": feeds["pixel_values"][:1]})
        text = self.backend.text(feeds)
        pairs = {name: np.repeat(values, captions, axis=0) for name, values in image.items()}
        return self.backend.fusion(text, pairs)


@dataclass
class RankCase:
    graph: str
    precision: str
    kind: str  # "monolithic" or "split"
    samples_s: list[float]
    median_ms: float


def _available(manifest: Manifest, flavour: Flavour | None, precision: Precision) -> bool:
    try:
        for stem in manifest.stems:
            manifest.graph_path(flavour, precision, stem)
    except BtDeployError:
        return False
    return True


def feature_bytes(backend: SplitBackend, pixel_values: np.ndarray) -> int:
    """Bytes of one image's cached features as saved (npz of the vision tower's outputs)."""
    arrays = backend.vision({"pixel_values": pixel_values[:1]})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return len(buffer.getvalue())


def run_rank_bench(
    root: Path, captions: int, text_length: int | None, warmup: int, iters: int, threads: int, out: Path
) -> list[RankCase]:
    if captions < 1:
        raise BtDeployError(f"--captions {captions} must be at least 1")
    manifest = read_manifest(head_folders(root, ["itm"])[0])
    if len(manifest.stems) == 1:
        raise BtDeployError(f"{manifest.folder} has no split graphs: export with btdeploy export --split")
    config = manifest.config
    text_length = one_text_length(text_length, config)
    parse_shapes([captions], [text_length], config)  # refuses a length past the model's
    feeds = sample_inputs(config, captions, text_length, seed=11, pad=False)
    head = get_head("itm")
    cases: list[RankCase] = []
    sizes: dict[str, int] = {}
    for flavour, precision in GRAPHS:
        if not _available(manifest, flavour, precision):
            say(f"bench rank: skipping {flavour or 'plain'} {precision}: its whole or split graphs are missing")
            continue
        label = f"{flavour or 'plain'} {precision}"
        whole = OnnxRuntimeBackend(manifest.graph_path(flavour, precision), head.output_names, ["cpu"], threads)
        split = build_split(manifest, flavour=flavour, precision=precision, providers="cpu", threads=threads)
        sizes[label] = feature_bytes(split, feeds["pixel_values"])
        runners: dict[str, Any] = {"monolithic": _WholeHead(whole), "split": _SplitTowers(split)}
        expected, got = runners["monolithic"].run(feeds), runners["split"].run(feeds)
        worst = float(np.abs(expected["logits"] - got["logits"]).max())
        samples, _, _ = time_case(runners, feeds, warmup, iters, None)
        for kind, values in samples.items():
            cases.append(RankCase(label, precision, kind, values, summarize(values, captions).median_ms))
        mono, parts = (summarize(samples[k], captions).median_ms for k in ("monolithic", "split"))
        say(f"bench rank {label}: monolithic {mono:.1f} ms, split {parts:.1f} ms ({mono / parts:.2f}x); "
            f"split vs whole logits max diff {worst:.1e}")  # fmt: skip
    _write(out, cases, sizes, captions, text_length, threads)
    return cases


def _write(out: Path, cases: list[RankCase], sizes: dict[str, int], captions: int, length: int, threads: int) -> None:
    machine = machine_description(threads)
    lines = [
        "# Ranking one image against many captions: split towers vs the whole ITM head",
        "",
        f"- workload: 1 image x {captions} captions of length {length} (no padding), itm head",
        f"- CPU: {cpu_text(machine)}, {threads} thread(s); huge pages {machine['huge_pages']}; ONNX Runtime CPU "
        "provider",
        "- monolithic: the whole graph on a batch of the image repeated per caption; split: vision tower once, "
        "text tower on the captions, fusion graph on the pairs",
        "- timing interleaved (monolithic, split / split, monolithic ...); medians",
        "",
        "| graph | monolithic ms | split ms | speedup | one image's cached features |",
        "|---|---:|---:|---:|---:|",
    ]
    by_graph: dict[str, dict[str, RankCase]] = {}
    for case in cases:
        by_graph.setdefault(case.graph, {})[case.kind] = case
    for graph, kinds in by_graph.items():
        mono, split = kinds["monolithic"].median_ms, kinds["split"].median_ms
        lines.append(f"| {graph} | {mono:.1f} | {split:.1f} | {mono / split:.2f}x | {sizes[graph] / 2**20:.2f} MiB |")
    write_text(out / "rank.md", "\n".join(lines) + "\n")
    write_json(out / "rank.json", {"captions": captions, "text_length": length, "threads": threads,
                                   "feature_bytes": sizes, "machine": machine,
                                   "cases": [case.__dict__ for case in cases]})  # fmt: skip
    _plot(out / "rank.png", by_graph, captions)


def _plot(path: Path, by_graph: dict[str, dict[str, RankCase]], captions: int) -> None:
    plt = pyplot("rank plot")
    if plt is None:
        return
    graphs = list(by_graph)
    x = np.arange(len(graphs))
    figure, axis = plt.subplots(figsize=(7, 4))
    for offset, kind in ((-0.2, "monolithic"), (0.2, "split")):
        axis.bar(x + offset, [by_graph[g][kind].median_ms for g in graphs], width=0.4, label=kind)
    axis.set_xticks(x, graphs)
    axis.set_ylabel("median ms")
    axis.set_title(f"itm: 1 image x {captions} captions")
    axis.legend()
    save_png(figure, path)
