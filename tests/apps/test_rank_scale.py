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
ranking = rank(root, [image], captions, top_k=3, batch_size=int(sys.argv[4]))
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "stages": ranking.stages,
                  "top": [r.label for r in ranking.rows]}))
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


SCORE = """
import json, resource, sys
import numpy as np
import btdeploy
from btdeploy.model.inputs import sample_inputs
runtime = btdeploy.load(sys.argv[1], head="itm", split=True)
count = int(sys.argv[2])
feeds = sample_inputs(runtime.config, 1, 12, seed=5)
rng = np.random.default_rng(0)
ids = np.repeat(feeds["input_ids"], count, axis=0)
ids[:, 1:11] = rng.integers(10, runtime.config.text_config.vocab_size, size=(count, 10))
texts = runtime.encode_texts(input_ids=ids, attention_mask=np.ones_like(ids))
images = runtime.encode_images(feeds["pixel_values"])
logits = runtime.score(images, texts)["logits"]
assert logits.shape == (1, count, 2) and np.isfinite(logits).all()
print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_score_memory_is_flat_in_the_number_of_captions(tmp_path: Path) -> None:
    from btdeploy.export.exporter import export_head
    from btdeploy.model.checkpoints import resolve_model

    export_head(resolve_model("tiny"), "itm", tmp_path / "out", split=True)

    def peak(count: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", SCORE, str(tmp_path / "out"), str(count)],
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_kb"])

    small, large = peak(100), peak(10_000)
    assert large / small <= 1.5, f"peak RSS {large} kB for 10,000 captions against {small} kB for 100"
