"""The shell recipes in export/ are thin calls of `btdeploy pipeline`: what each passes on, with
`btdeploy` on PATH replaced by a stand-in that prints its arguments."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "export"


def _recipe(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "btdeploy"
    stand_in.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    stand_in.chmod(0o755)
    environment = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), **env}
    return subprocess.run(
        ["bash", str(RECIPES / script), *args], capture_output=True, text=True, env=environment, check=False
    )


def test_a_recipe_passes_the_model_out_folder_and_calibration_to_the_pipeline(tmp_path: Path) -> None:
    plain = _recipe(tmp_path, "tiny.sh")
    assert plain.returncode == 0 and plain.stdout.split() == [
        "pipeline", "--model", "tiny", "--out", "btdeploy-out/tiny", "--split",
    ]  # fmt: skip
    calibrated = _recipe(tmp_path, "recipe.sh", "/data/ckpt", "out", CALIB_IMAGES="photos", CALIB_TEXTS="caps.txt",
                         CALIB_SIZE="64")  # fmt: skip
    assert calibrated.returncode == 0 and calibrated.stdout.split() == [
        "pipeline", "--model", "/data/ckpt", "--out", "out", "--split",
        "--calib-images", "photos", "--calib-texts", "caps.txt", "--calib-size", "64",
    ]  # fmt: skip


def test_the_large_recipe_runs_every_head_and_precision(tmp_path: Path) -> None:
    # It had kept to itm and mlm in FP32, from before every head fitted in memory (9.8 GB at most now).
    result = _recipe(tmp_path, "large.sh", "out")
    assert result.returncode == 0 and result.stdout.split() == ["pipeline", "--model", "large", "--out", "out"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CALIB_IMAGES": "photos"}, "set CALIB_TEXTS=FILE (one caption per line) too"),
        ({"CALIB_TEXTS": "caps.txt"}, "set CALIB_IMAGES=DIR too"),
    ],
)
def test_half_the_calibration_pair_is_refused_before_the_pipeline_starts(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    result = _recipe(tmp_path, "tiny.sh", **env)
    assert result.returncode != 0 and result.stdout == "" and expected in result.stderr
