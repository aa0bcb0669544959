"""btdeploy.load: the transformers calling convention, conversions, and every bad input's message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import btdeploy
from btdeploy.errors import BtDeployError
from btdeploy.model.inputs import sample_inputs


@pytest.fixture(scope="module")
def itm(tiny_export: Path) -> btdeploy.Runtime:
    return btdeploy.load(tiny_export, head="itm")


@pytest.fixture()
def feeds(itm: btdeploy.Runtime) -> dict[str, np.ndarray]:
    return sample_inputs(itm.config, 2, 7, seed=4)


def test_numpy_in_numpy_out_torch_in_torch_out(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]) -> None:
    as_numpy = itm(**feeds)
    assert isinstance(as_numpy.logits, np.ndarray) and as_numpy.logits.shape == (2, 2)
    as_torch = itm(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert isinstance(as_torch.logits, torch.Tensor)
    assert isinstance(as_torch.logits[0, 1].item(), float)
    np.testing.assert_array_equal(as_torch.logits.numpy(), as_numpy.logits)
    assert as_numpy["logits"] is as_numpy.logits and as_numpy[0] is as_numpy.logits
    assert list(as_numpy.keys()) == ["logits"]


def test_ignored_inputs_change_nothing(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]) -> None:
    plain = itm(**feeds).logits
    extra = itm(**feeds, pixel_mask=np.zeros((2, 64, 64), np.int64), token_type_ids=np.ones((2, 7), np.int64)).logits
    np.testing.assert_array_equal(plain, extra)


def test_int32_ids_bool_mask_and_float64_pixels_are_accepted(
    itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]
) -> None:
    converted = {
        "input_ids": feeds["input_ids"].astype(np.int32),
        "attention_mask": feeds["attention_mask"].astype(bool),
        "pixel_values": feeds["pixel_values"].astype(np.float64),
    }
    np.testing.assert_array_equal(itm(**converted).logits, itm(**feeds).logits)


def _with(feeds: dict[str, np.ndarray], **changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = dict(feeds)
    for key, value in changes.items():
        if value is None:
            result.pop(key)
        else:
            result[key] = value
    return result


BAD_INPUTS = {
    "missing": (lambda f: _with(f, pixel_values=None), "missing input\\(s\\) pixel_values: the itm head needs"),
    "unknown": (lambda f: _with(f, images=f["pixel_values"]), "unknown input\\(s\\) 'images': the itm head takes"),
    "float ids": (lambda f: _with(f, input_ids=f["input_ids"].astype(np.float32)), "input_ids must be a 2-D integer"),
    "1-D ids": (lambda f: _with(f, input_ids=f["input_ids"][0]), "input_ids must be a 2-D integer"),
    "mask shape": (
        lambda f: _with(f, attention_mask=f["attention_mask"][:, :3]),
        "attention_mask must be .* shaped like",
    ),
    "mask values": (
        lambda f: _with(f, attention_mask=f["attention_mask"] * 2),
        "attention_mask must hold only 0 and 1",
    ),
    "int pixels": (
        lambda f: _with(f, pixel_values=f["pixel_values"].astype(np.int64)),
        "pixel_values must be a 4-D float",
    ),
    "image size": (
        lambda f: _with(f, pixel_values=np.zeros((2, 3, 96, 96), np.float32)),
        "pixel_values has images of \\[3, 96, 96\\], the model takes \\[3, 64, 64\\]",
    ),
    "too long": (
        lambda f: _with(f, input_ids=np.zeros((2, 513), np.int64), attention_mask=np.ones((2, 513), np.int64)),
        "text of 513 tokens is longer than the model's 512 positions",
    ),
    "batch": (lambda f: _with(f, pixel_values=f["pixel_values"][:1]), "batch sizes disagree: 2 text\\(s\\) .* 1 image"),
    "vocab": (lambda f: _with(f, input_ids=f["input_ids"] + 5000), "input_ids has ids outside the vocabulary 0..999"),
    "empty": (
        lambda f: _with(f, input_ids=np.zeros((2, 0), np.int64), attention_mask=np.zeros((2, 0), np.int64)),
        "input_ids is empty",
    ),
    "wrong type": (lambda f: _with(f, input_ids="hello"), "input_ids must be a numpy array or torch tensor, got str"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_clear_line(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray], case: str) -> None:
    make, message = BAD_INPUTS[case]
    with pytest.raises(BtDeployError, match=message) as caught:
        itm(**make(feeds))
    assert "\n" not in str(caught.value)


def test_output_attribute_typo_names_the_real_outputs(itm: btdeploy.Runtime, feeds: dict[str, np.ndarray]) -> None:
    with pytest.raises(AttributeError, match="has no output 'logit'; it has logits"):
        _ = itm(**feeds).logit


def test_load_needs_a_head_when_the_folder_has_several(tiny_export: Path) -> None:
    with pytest.raises(BtDeployError, match="holds several heads \\(base, itc, itm, mlm\\): pass head="):
        btdeploy.load(tiny_export)
    with pytest.raises(BtDeployError, match="has no exported head\\(s\\) nope"):
        btdeploy.load(tiny_export, head="nope")
    assert btdeploy.load(tiny_export / "mlm").head.name == "mlm"
    with pytest.raises(BtDeployError, match="unknown backend 'tensorflow'"):
        btdeploy.load(tiny_export, head="itm", backend="tensorflow")


def test_a_corrupt_or_missing_model_file_is_a_clear_error(tiny_export: Path, tmp_path: Path) -> None:
    head = tmp_path / "itm"
    shutil.copytree(tiny_export / "itm", head)
    data = (head / "model.onnx").read_bytes()
    (head / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BtDeployError, match=r"model.onnx is not the graph its manifest recorded \(\d+ bytes, recorded"):
        btdeploy.load(head)
    # A manifest without graph records (written by hand, or by an older btdeploy): ONNX Runtime says it.
    manifest = json.loads((head / "manifest.json").read_text())
    del manifest["graphs"]
    (head / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BtDeployError, match="ONNX Runtime cannot load .*damaged or incomplete: export the head again"):
        btdeploy.load(head)
    (head / "model.onnx").unlink()
    with pytest.raises(BtDeployError, match="model.onnx is missing: export the head again"):
        btdeploy.load(head)
    (head / "manifest.json").write_text("{not json")
    with pytest.raises(BtDeployError, match="manifest.json is damaged"):
        btdeploy.load(head)
    with pytest.raises(BtDeployError, match="does not exist"):
        btdeploy.load(tmp_path / "absent")


def test_torch_backend_is_the_reference(tiny_export: Path, feeds: dict[str, np.ndarray]) -> None:
    from transformers import BridgeTowerForImageAndTextRetrieval

    from btdeploy.model.checkpoints import resolve_model

    reference = btdeploy.load(tiny_export, head="itm", backend="torch")
    model = BridgeTowerForImageAndTextRetrieval.from_pretrained(resolve_model("tiny").checkpoint).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(reference(**feeds).logits, expected, atol=1e-6, rtol=0)


def test_without_attention_mask_every_token_counts_as_in_transformers(itm: btdeploy.Runtime, tiny_export: Path) -> None:
    from transformers import BridgeTowerForImageAndTextRetrieval

    from btdeploy.model.checkpoints import resolve_model

    feeds = sample_inputs(itm.config, 2, 7, seed=5, pad=False)
    unmasked = {"input_ids": feeds["input_ids"], "pixel_values": feeds["pixel_values"]}
    model = BridgeTowerForImageAndTextRetrieval.from_pretrained(resolve_model("tiny").checkpoint).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in unmasked.items()}).logits.numpy()
    np.testing.assert_allclose(itm(**unmasked).logits, expected, atol=1e-5, rtol=0)
    # A padded batch without its mask attends to the padding too, as the reference does.
    padded = sample_inputs(itm.config, 2, 7, seed=5, pad=True)
    assert not padded["attention_mask"].all()
    without = itm(input_ids=padded["input_ids"], pixel_values=padded["pixel_values"]).logits
    np.testing.assert_array_equal(without, itm(**{**padded, "attention_mask": np.ones((2, 7), np.int64)}).logits)
