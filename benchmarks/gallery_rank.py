"""A folder of images ranked against a caption, or captions (labels) against an image: every item
through its tower on each query (`rank --images`, `rank --texts`), against the gallery
`btdeploy index` stored once (`rank --gallery`).

    python benchmarks/gallery_rank.py DIR [--sizes 8,32,128] [--labels 100,1000] [--top-k 5] [--rounds 3]
        [--out FOLDER]

DIR: an export with the itc and itm heads' split graphs (`btdeploy export --heads itc,itm --split`).
For each gallery size the script writes that many generated 640 x 480 JPEGs (or distinct five-word
captions), indexes them (timed once: `index_images` / `index_texts`, the tower loaded as the command
loads it), then times both ways of ranking in interleaved rounds on heads loaded once, and checks
that both give the same ranking. Prints a Markdown table (medians, the ratio, how many queries repay
the index) and, with --out, writes it with a plot of latency against gallery size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages

CAPTION = "two dogs running on a beach at sunset"


def _photos(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        pixels = (rng.random((480, 640, 3)) * 255).astype(np.uint8)
        paths.append(folder / f"photo{index:04d}.jpg")
        Image.fromarray(pixels).save(paths[-1], "JPEG", quality=90)
    return paths


def _labels(count: int) -> list[str]:
    """Distinct short captions, as a label set would be."""
    words = ["a", "red", "small", "old", "dog", "cat", "car", "boat", "on", "the", "beach", "road", "at", "night"]
    rng = np.random.default_rng(count)
    labels: dict[str, None] = {}
    while len(labels) < count:
        labels[" ".join(rng.choice(words, 5))] = None
    return list(labels)


def _measure(
    root: Path, cases: list[tuple[str, int]], top_k: int, rounds: int, work: Path
) -> list[dict[str, float | str]]:
    """Per case (kind, size): the index's seconds, and the medians of ranking with and without it."""
    from btdeploy.apps.gallery import Gallery, GalleryItems, index_images, index_texts
    from btdeploy.apps.rank import CANDIDATE_HEAD, SCORING_HEAD, Ranker, load_head
    from btdeploy.bench.runner import interleaved_order
    from btdeploy.progress import say

    ranker = Ranker(load_head(root, SCORING_HEAD, "onnxruntime"), load_head(root, CANDIDATE_HEAD, "onnxruntime"))
    (query_image,) = _photos(work / "query", 1)
    rows: list[dict[str, float | str]] = []
    for kind, size in cases:
        out = work / f"gallery-{kind}-{size}.npz"
        started = time.perf_counter()
        if kind == "image":
            files: list[Path] = _photos(work / f"photos-{size}", size)
            index_images(root, work / f"photos-{size}", out)
        else:
            labels = _labels(size)
            (work / f"labels-{size}.txt").write_text("\n".join(labels) + "\n")
            index_texts(root, work / f"labels-{size}.txt", out)
        index_s = time.perf_counter() - started
        gallery = Gallery.load(out)
        reader = GalleryItems(ranker.processor, gallery, out)
        if kind == "image":
            ways = {
                "direct": partial(ranker.rank, files, [CAPTION], top_k),
                "gallery": partial(ranker.rank, gallery.candidates, [CAPTION], top_k, reader),
            }
        else:
            ways = {
                "direct": partial(ranker.rank, [query_image], labels, top_k),
                "gallery": partial(ranker.rank, [query_image], gallery.candidates, top_k, reader),
            }
        rankings = {name: run() for name, run in ways.items()}  # warm-up, and the check
        direct_rows, gallery_rows = (rankings[name].rows for name in ("direct", "gallery"))
        if [(r.index, round(r.itm_probability or 0, 5)) for r in direct_rows] != [
            (r.index, round(r.itm_probability or 0, 5)) for r in gallery_rows
        ]:
            raise SystemExit(f"{size} {kind}s: the gallery ranked otherwise than the items themselves")
        times: dict[str, list[float]] = {name: [] for name in ways}
        for round_index in range(rounds):
            for name in interleaved_order(list(ways), round_index):
                started = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - started)
            say(f"gallery bench: {size} {kind}s, round {round_index + 1}/{rounds}")
        direct_s, gallery_s = (statistics.median(times[name]) for name in ("direct", "gallery"))
        rows.append({"kind": kind, "items": size, "index_s": index_s, "direct_s": direct_s, "gallery_s": gallery_s})
    return rows


HOW = {
    "image": ("images", "rank --images", "a caption against a folder of images"),
    "text": ("captions", "rank --texts", "an image against a captions file (labels)"),
}


def _table(rows: list[dict[str, float | str]], top_k: int, rounds: int) -> str:
    lines = [
        f"Median seconds a query, {rounds} interleaved rounds; top {top_k} to ITM. Without the gallery: "
        "`rank --images` (the vision tower on every image) or `rank --texts` (the text tower on every caption); "
        f"with it: `rank --gallery`. Caption query: {CAPTION!r}; image query: one generated photo.",
        "",
        "| gallery of | items | index (once) s | without the gallery s | rank --gallery s | speedup "
        "| queries that repay the index |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        index_s, direct_s, gallery_s = (float(row[key]) for key in ("index_s", "direct_s", "gallery_s"))
        saved = direct_s - gallery_s
        repay = f"{index_s / saved:.1f}" if saved > 0 else "-"
        lines.append(
            f"| {HOW[str(row['kind'])][0]} | {row['items']} | {index_s:.2f} | {direct_s:.3f} | {gallery_s:.3f} | "
            f"{direct_s / gallery_s:.1f}x | {repay} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, float | str]], path: Path) -> None:
    from btdeploy.bench.figures import pyplot, save_png

    plt = pyplot("gallery plot")
    if plt is None:
        return
    kinds = [kind for kind in HOW if any(row["kind"] == kind for row in rows)]
    figure, panels = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for axes, kind in zip(panels[0], kinds, strict=True):
        mine = [row for row in rows if row["kind"] == kind]
        sizes = [float(row["items"]) for row in mine]
        plural, direct, query = HOW[kind]
        axes.plot(sizes, [float(row["direct_s"]) for row in mine], marker="o", label=f"{direct} (a tower per item)")
        axes.plot(sizes, [float(row["gallery_s"]) for row in mine], marker="o", label="rank --gallery (stored)")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel(f"{plural} ranked")
        axes.set_ylabel("seconds a query (median)")
        axes.set_title(query)
        axes.legend()
        axes.grid(True, which="both", alpha=0.3)
    save_png(figure, path)


def main() -> None:
    from btdeploy.artifacts.files import write_text
    from btdeploy.bench.machine import cpu_text, machine_description

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--sizes", default="8,32,128", help="galleries of images: their sizes, comma-separated")
    parser.add_argument(
        "--labels", default="", help="galleries of captions: their sizes, comma-separated (e.g. 100,1000)"
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write results.md and gallery_rank.png here")
    args = parser.parse_args()
    cases = [("image", int(part)) for part in args.sizes.split(",") if part]
    cases += [("text", int(part)) for part in args.labels.split(",") if part]
    with tempfile.TemporaryDirectory(prefix="btdeploy-gallery-") as work:
        rows = _measure(args.dir, cases, args.top_k, args.rounds, Path(work))
    report = f"Machine: {cpu_text(machine_description(0))}\n\n{_table(rows, args.top_k, args.rounds)}\n"
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "results.md", report)
        _plot(rows, args.out / "gallery_rank.png")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
