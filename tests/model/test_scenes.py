"""Synthetic scenes for generated calibration: picture-like (flat and graded regions with edges),
the same for the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from btdeploy.model.inputs import sample_inputs
from btdeploy.model.scenes import scenes


def _flat_fraction(image: np.ndarray) -> float:
    """The share of horizontally neighbouring pixels within 40 levels of each other in every channel
    (a camera's grain stays within that; two random pixels rarely do)."""
    steps = np.abs(np.diff(image.astype(np.int16), axis=1))
    return float((steps <= 40).all(axis=-1).mean())


def test_scenes_are_pictures_not_noise() -> None:
    pictures = scenes(12, 64, seed=3)
    assert len(pictures) == 12 and all(p.shape == (64, 64, 3) and p.dtype == np.uint8 for p in pictures)
    # Mostly flat or slowly graded, as photos and icons are; random pixels almost never are.
    assert min(_flat_fraction(p) for p in pictures) > 0.8
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert _flat_fraction(noise) < 0.05
    # Yet with edges and colour: each uses a good part of the 0..255 range, and they differ.
    assert min(int(p.max()) - int(p.min()) for p in pictures) > 60
    assert len({p.tobytes() for p in pictures}) == 12
    assert all(np.array_equal(a, b) for a, b in zip(pictures, scenes(12, 64, seed=3), strict=True))
    assert not np.array_equal(pictures[0], scenes(1, 64, seed=4)[0])
    assert scenes(0, 64, seed=3) == []


def test_generated_calibration_rows_alternate_noise_and_scenes(tiny_export: Path) -> None:
    """Even rows keep the generated noise and token ids; odd rows hold a scene as the processor
    makes it: within the pixel range the processor's normalisation gives 0..255, and mostly flat."""
    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.model.media import export_processor
    from btdeploy.quantize.calibration import GENERATED_IMAGES, generated_rows, plan_calibration

    manifest = read_manifest(tiny_export / "itm")
    feeds = generated_rows(manifest, 5, 12)
    noise = sample_inputs(manifest.config, 5, 12, seed=1234)
    assert np.array_equal(feeds["input_ids"], noise["input_ids"])
    assert np.array_equal(feeds["pixel_values"][0::2], noise["pixel_values"][0::2])
    image_processor = export_processor(manifest).image_processor
    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    for row in (1, 3):
        pixels = feeds["pixel_values"][row]
        assert not np.allclose(pixels, noise["pixel_values"][row])
        assert (pixels >= (0 - mean) / std - 1e-4).all() and (pixels <= (1 - mean) / std + 1e-4).all()
        levels = np.rint((pixels * std + mean) * 255).transpose(1, 2, 0)
        assert _flat_fraction(levels) > 0.8
    assert plan_calibration(manifest, None, None, 5).source["images"] == GENERATED_IMAGES


def test_checks_on_generated_inputs_see_scenes_in_batches_of_several_rows(tiny_export: Path) -> None:
    """A batch of one row keeps the noise; every row of a larger batch is a scene of its own, with
    the same token ids as before."""
    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.model.media import export_processor
    from btdeploy.verify.parity import generated_batches

    manifest = read_manifest(tiny_export / "itc")
    processor = export_processor(manifest)
    shapes = [(1, 5), (3, 7)]
    plain = list(generated_batches(manifest.config, shapes))
    given = list(generated_batches(manifest.config, shapes, processor=processor))
    for noise, batch in zip(plain, given, strict=True):
        assert np.array_equal(noise["input_ids"], batch["input_ids"])
        assert np.array_equal(noise["attention_mask"], batch["attention_mask"])
    assert np.array_equal(given[0]["pixel_values"], plain[0]["pixel_values"])
    image_processor = processor.image_processor
    mean = np.asarray(image_processor.image_mean)[:, None, None]
    std = np.asarray(image_processor.image_std)[:, None, None]
    for row in range(3):
        pixels = given[1]["pixel_values"][row]
        assert not np.allclose(pixels, plain[1]["pixel_values"][row])
        levels = np.rint(np.clip(pixels * std + mean, 0, 1) * 255).transpose(1, 2, 0)
        assert _flat_fraction(levels) > 0.8, row
    assert len({given[1]["pixel_values"][row].tobytes() for row in range(3)}) == 3


def test_an_export_without_a_processor_is_calibrated_and_checked_on_noise(tiny_export: Path, tmp_path: Path) -> None:
    """A checkpoint saved without its processor has no scenes to draw: generated calibration and the
    check's generated batches keep to random pixels, and say so, where they had refused to run."""
    import shutil

    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.model.scenes import NOISE_ALONE
    from btdeploy.quantize.calibration import generated_rows, plan_calibration
    from btdeploy.verify.check import check_export, inputs_record

    shutil.copytree(tiny_export / "itm", tmp_path / "itm")
    shutil.rmtree(tmp_path / "itm" / "processor")
    manifest = read_manifest(tmp_path / "itm")
    noise = sample_inputs(manifest.config, 4, 9, seed=1234)
    assert np.array_equal(generated_rows(manifest, 4, 9)["pixel_values"], noise["pixel_values"])
    assert plan_calibration(manifest, None, None, 4).source["images"] == NOISE_ALONE
    rows = check_export(tmp_path, ["itm"], batch_sizes=(1, 2), text_lengths=(6,))
    assert rows[0].passed and [shape["pixels"] for shape in rows[0].per_shape] == ["random", "random"]
    assert inputs_record(None, None, rows, (1, 2))["images"] == "random pixels"
