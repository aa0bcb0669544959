"""A folder of images ranked against a caption: every image through the vision tower on each query
(`rank --images`), against the gallery `btdeploy index` stored once (`rank --gallery`).

    python benchmarks/gallery_rank.py DIR [--sizes 8,32,128] [--top-k 5] [--rounds 3] [--out FOLDER]

DIR: an export with the itc and itm heads' split graphs (`btdeploy export --heads itc,itm --split`).
For each gallery size the script writes that many generated 640 x 480 JPEGs, indexes them (timed
once: `index_images`, its tower loaded as the command loads it), then times both ways of ranking
in interleaved rounds on heads loaded once, and checks that both give the same ranking. Prints a
Markdown table (medians, the ratio, how many queries repay the index) and, with --out, writes it
with a plot of latency against gallery size.
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


def _measure(root: Path, sizes: list[int], top_k: int, rounds: int, work: Path) -> list[dict[str, float]]:
    from btdeploy.apps.gallery import Gallery, GalleryItems, index_images
    from btdeploy.apps.rank import CANDIDATE_HEAD, SCORING_HEAD, Ranker, load_head
    from btdeploy.bench.runner import interleaved_order
    from btdeploy.progress import say

    ranker = Ranker(load_head(root, SCORING_HEAD, "onnxruntime"), load_head(root, CANDIDATE_HEAD, "onnxruntime"))
    rows = []
    for size in sizes:
        folder = work / f"photos-{size}"
        files = _photos(folder, size)
        started = time.perf_counter()
        index_images(root, folder, work / f"gallery-{size}.npz")
        index_s = time.perf_counter() - started
        gallery = Gallery.load(work / f"gallery-{size}.npz")
        source = GalleryItems(ranker.processor, gallery, work / f"gallery-{size}.npz")
        ways = {
            "folder": partial(ranker.rank, files, [CAPTION], top_k),
            "gallery": partial(ranker.rank, gallery.candidates(), [CAPTION], top_k, source),
        }
        rankings = {name: run() for name, run in ways.items()}  # warm-up, and the check
        folder_rows, gallery_rows = (rankings[name].rows for name in ("folder", "gallery"))
        if [(r.index, round(r.itm_probability or 0, 5)) for r in folder_rows] != [
            (r.index, round(r.itm_probability or 0, 5)) for r in gallery_rows
        ]:
            raise SystemExit(f"{size} images: the gallery ranked otherwise than the folder")
        times: dict[str, list[float]] = {name: [] for name in ways}
        for round_index in range(rounds):
            for name in interleaved_order(list(ways), round_index):
                started = time.perf_counter()
                ways[name]()
                times[name].append(time.perf_counter() - started)
            say(f"gallery bench: {size} images, round {round_index + 1}/{rounds}")
        folder_s, gallery_s = (statistics.median(times[name]) for name in ("folder", "gallery"))
        rows.append({"images": size, "index_s": index_s, "folder_s": folder_s, "gallery_s": gallery_s})
    return rows


def _table(rows: list[dict[str, float]], top_k: int, rounds: int) -> str:
    lines = [
        f"Median seconds a query, {rounds} interleaved rounds; top {top_k} to ITM; caption {CAPTION!r}.",
        "",
        "| images | index (once) s | rank --images s | rank --gallery s | speedup | queries that repay the index |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        saved = row["folder_s"] - row["gallery_s"]
        repay = f"{row['index_s'] / saved:.1f}" if saved > 0 else "-"
        lines.append(
            f"| {int(row['images'])} | {row['index_s']:.2f} | {row['folder_s']:.3f} | {row['gallery_s']:.3f} | "
            f"{row['folder_s'] / row['gallery_s']:.1f}x | {repay} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, float]], path: Path) -> None:
    from btdeploy.bench.figures import pyplot, save_png

    plt = pyplot("gallery plot")
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(6, 4))
    sizes = [row["images"] for row in rows]
    axes.plot(sizes, [row["folder_s"] for row in rows], marker="o", label="rank --images (vision tower per image)")
    axes.plot(sizes, [row["gallery_s"] for row in rows], marker="o", label="rank --gallery (stored embeddings)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("images in the folder")
    axes.set_ylabel("seconds a query (median)")
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    save_png(figure, path)


def main() -> None:
    from btdeploy.artifacts.files import write_text
    from btdeploy.bench.machine import cpu_text, machine_description

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--sizes", default="8,32,128", help="gallery sizes, comma-separated")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write results.md and gallery_rank.png here")
    args = parser.parse_args()
    sizes = [int(part) for part in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="btdeploy-gallery-") as work:
        rows = _measure(args.dir, sizes, args.top_k, args.rounds, Path(work))
    report = f"Machine: {cpu_text(machine_description(0))}\n\n{_table(rows, args.top_k, args.rounds)}\n"
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(args.out / "results.md", report)
        _plot(rows, args.out / "gallery_rank.png")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
