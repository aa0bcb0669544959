"""Each step reports its own peak resident memory: what it allocated, not what came before it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from btdeploy.progress import step


def _peaks(text: str) -> dict[str, float]:
    return {m[0]: float(m[1]) * 1024 for m in re.findall(r"\] (\w+): done in [\d.]+s, peak RSS ([\d.]+) GB", text)}


def test_each_step_reports_its_own_peak(capsys: pytest.CaptureFixture[str]) -> None:
    with step("outer"):
        with step("big"):
            block = np.ones(400 * 2**20 // 8)  # 400 MB, touched
            del block
        with step("small"):
            np.ones(10)
    peaks = _peaks(capsys.readouterr().err)
    assert set(peaks) == {"outer", "big", "small"}
    assert peaks["big"] - peaks["small"] >= 350  # the big step's 400 MB is not charged to the next one
    assert peaks["outer"] >= peaks["big"]  # an outer step holds what its inner steps held
