"""What reading the export's processor costs a command that runs graphs, btdeploy's own reading
(btdeploy/model/preprocessor.py) against transformers' BridgeTowerProcessor, measured in one run:

- start: a fresh interpreter that reads the head's processor and preprocesses one picture with
  two texts, the two readings in turns, each round in the other order first; its wall time from
  the parent, its peak resident memory, and whether torch was imported;
- warm: the same preprocessing of a batch in this process, the two readings interleaved.

    python benchmarks/processor_start.py DIR [--head itm] [--rounds 5] [--batch 4] [--iters 20]

DIR is an export folder (or a head folder). Progress on stderr; the tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from btdeploy.bench.machine import cpu_text, machine_description
from btdeploy.cli import script_entry
from btdeploy.errors import BtDeployError
from btdeploy.runtime.runtime import find_head

READINGS = ("btdeploy", "transformers")
TEXTS = ["a cat on a couch", "two dogs playing football in the park"]

CHILD = """
import json, resource, sys, time
started = time.perf_counter()
from pathlib import Path
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.model import media
from btdeploy.model.preprocessor import Preprocessor

folder, reading, texts = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
manifest = read_manifest(folder)
processor = (
    Preprocessor.from_folder(manifest.processor_dir)
    if reading == "btdeploy"
    else media.transformers_processor(manifest.processor_dir)
)
picture = media.load_image(Path(sys.argv[4]), processor.image_processor)
media.pair_inputs(processor, [picture] * len(texts), texts)
print(json.dumps({
    "in_process_s": time.perf_counter() - started,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "torch": "torch" in sys.modules,
}))
"""


def picture_file(folder: Path) -> Path:
    """A 640x480 noise photo as PNG (what a camera's picture costs the resize and the crop)."""
    import numpy as np
    from PIL import Image

    path = folder / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path)
    return path


def fresh_start(head_folder: Path, reading: str, picture: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(head_folder), reading, json.dumps(TEXTS), str(picture)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if done.returncode != 0:
        raise BtDeployError(f"the {reading} reading failed in its process: {done.stderr.strip().splitlines()[-1:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return measured | {"wall_s": time.perf_counter() - started}


def warm_calls(head_folder: Path, batch: int, iters: int, picture: Path) -> dict[str, list[float]]:
    """ms per call of each reading's preprocessing of `batch` pictures and texts, interleaved."""
    from btdeploy.model import media
    from btdeploy.model.preprocessor import Preprocessor

    manifest = find_head(head_folder)
    processors = {
        "btdeploy": Preprocessor.from_folder(manifest.processor_dir),
        "transformers": media.transformers_processor(manifest.processor_dir),
    }
    image = media.load_image(picture)
    texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]
    times: dict[str, list[float]] = {reading: [] for reading in READINGS}
    for _ in range(iters + 2):  # two warm-up calls each, not kept
        for reading, processor in processors.items():
            started = time.perf_counter()
            media.pair_inputs(processor, [image] * batch, texts)
            times[reading].append((time.perf_counter() - started) * 1000)
    return {reading: values[2:] for reading, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="export folder (or head folder) whose processor is read")
    parser.add_argument("--head", default="itm", help="the head whose processor is read (default: itm)")
    parser.add_argument("--rounds", type=int, default=5, help="fresh processes per reading (default: 5)")
    parser.add_argument("--batch", type=int, default=4, help="pictures and texts per warm call (default: 4)")
    parser.add_argument("--iters", type=int, default=20, help="warm calls per reading (default: 20)")
    args = parser.parse_args()
    if min(args.rounds, args.batch, args.iters) < 1:
        raise BtDeployError("--rounds, --batch and --iters take 1 or more")
    manifest = find_head(args.export, args.head if (args.export / args.head).is_dir() else None)
    folder = manifest.folder
    scratch = tempfile.TemporaryDirectory(prefix="processor_start_")  # the picture, never in the export
    picture = picture_file(Path(scratch.name))
    starts: dict[str, list[dict[str, Any]]] = {reading: [] for reading in READINGS}
    for round_index in range(args.rounds):
        order = READINGS if round_index % 2 == 0 else READINGS[::-1]
        for reading in order:
            starts[reading].append(fresh_start(folder, reading, picture))
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{reading} {starts[reading][-1]['wall_s']:.2f} s" for reading in READINGS), file=sys.stderr)  # fmt: skip
    warm = warm_calls(folder, args.batch, args.iters, picture)
    scratch.cleanup()

    def median(reading: str, key: str) -> float:
        return statistics.median(run[key] for run in starts[reading])

    print(f"the {manifest.head} head's processor in {folder}; {cpu_text(machine_description(0))}")
    print()
    print(f"A fresh process reading the processor and preprocessing one picture with two texts "
          f"(medians of {args.rounds}):")  # fmt: skip
    print()
    print("| reading | wall s | in process s | peak RSS MB | torch imported |")
    print("|---|---:|---:|---:|---|")
    for reading in READINGS:
        imported = sum(run["torch"] for run in starts[reading])
        torch = "yes" if imported == args.rounds else "no" if imported == 0 else f"{imported} of {args.rounds}"
        print(f"| {reading} | {median(reading, 'wall_s'):.2f} | {median(reading, 'in_process_s'):.2f} | "
              f"{median(reading, 'peak_rss_mb'):.0f} | {torch} |")  # fmt: skip
    ratio = median("transformers", "wall_s") / median("btdeploy", "wall_s")
    print()
    print(f"transformers' start over btdeploy's: {ratio:.2f}x")
    print()
    print(f"Preprocessing {args.batch} pictures with {args.batch} texts in a warm process (ms per call, "
          f"{args.iters} interleaved calls each):")  # fmt: skip
    print()
    print("| reading | median ms | min ms | max ms |")
    print("|---|---:|---:|---:|")
    for reading in READINGS:
        values = warm[reading]
        print(f"| {reading} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")


if __name__ == "__main__":
    script_entry(main)
