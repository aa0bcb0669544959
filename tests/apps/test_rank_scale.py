"""`rank` streams its candidates: 10,000 captions cost about the memory of 100."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

MEASURE = """
import json, resource, sys
from pathlib import Path
from btdeploy.apps.rank import rank
root, image, captions = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]).read_text().splitlines()
rows, stages = rank(root, [image], captions, top_k=3, batch_size=int(sys.argv[4]))
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "stages": stages,
                  "top": [r.label for r in rows]}))
"""


def _peak(root: Path, image: Path, captions: list[str], folder: Path, batch_size: int = 64) -> dict[str, object]:
    path = folder / f"captions-{len(captions)}.txt"
    path.write_text("\n".join(captions))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), str(image), str(path), str(batch_size)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_rank_memory_is_flat_in_the_number_of_captions(tiny_export: Path, tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(1).random((80, 120, 3)) * 255).astype(np.uint8)).save(image)
    words = ["a cat", "two dogs", "a red bus", "the beach", "a man running", "a bird on a wire"]
    captions = [f"{words[i % len(words)]} number {i} in the picture" for i in range(10_000)]
    small = _peak(tiny_export, image, captions[:100], tmp_path)
    large = _peak(tiny_export, image, captions, tmp_path)
    assert small["stages"] == "ITC cosine over 100, top 3 to ITM; ITM on 3"
    assert large["stages"] == "ITC cosine over 10000, top 3 to ITM; ITM on 3"
    ratio = int(large["peak_kb"]) / int(small["peak_kb"])  # type: ignore[call-overload]
    assert ratio <= 1.5, f"peak RSS {large['peak_kb']} kB for 10,000 captions against {small['peak_kb']} kB for 100"
