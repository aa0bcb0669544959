"""`btdeploy.load_processor`: the export's processor for the Python API, with `load` a round trip
from a picture and texts to a head's answer that imports neither transformers nor torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import btdeploy
from btdeploy.errors import BtDeployError

ICON = sorted(Path("/usr/share/icons/Adwaita/512x512").glob("*/*.png"))[0]
TEXTS = ["a blue folder", "two cats on a couch, one <mask>"]

SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
import btdeploy

export, icon, out = sys.argv[1:4]
texts = json.loads(sys.argv[4])
processor = btdeploy.load_processor(export, "itm")
model = btdeploy.load(export, "itm")
image = Image.open(icon).convert("RGB")
encoding = processor([image] * len(texts), texts, padding=True, return_tensors="np")
np.savez(out, logits=model(**encoding).logits, **encoding)
print("imported:", sorted({"torch", "transformers"} & set(sys.modules)))
"""


def test_a_picture_and_texts_through_a_head_without_torch(tiny_export: Path, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import BridgeTowerProcessor

    saved = tmp_path / "answer.npz"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_export), str(ICON), str(saved), json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported: []" in done.stdout, done.stdout
    answer = np.load(saved)
    # The same round trip with transformers' processor, as the documentation's examples run it.
    theirs = BridgeTowerProcessor.from_pretrained(tiny_export / "itm" / "processor")
    image = Image.open(ICON).convert("RGB")
    encoding = theirs([image] * len(TEXTS), TEXTS, padding=True, return_tensors="np")
    for name, value in encoding.items():
        np.testing.assert_array_equal(answer[name], value, err_msg=name)
    logits = btdeploy.load(tiny_export, "itm")(**encoding).logits
    np.testing.assert_allclose(answer["logits"], logits, rtol=0, atol=1e-6)


def test_the_head_is_named_where_the_export_holds_several(tiny_export: Path) -> None:
    with pytest.raises(BtDeployError, match=r"holds several heads \(.*\): choose one"):
        btdeploy.load_processor(tiny_export)


def test_torch_tensors_are_refused_with_what_it_returns(tiny_export: Path) -> None:
    """It returns numpy arrays, which every backend takes; a caller asking for torch tensors is
    told so rather than handed arrays it did not expect."""
    processor = btdeploy.load_processor(tiny_export, "itm")
    with pytest.raises(BtDeployError, match=r"return_tensors='pt': btdeploy's processor returns numpy arrays"):
        processor(text=TEXTS, padding=True, return_tensors="pt")
