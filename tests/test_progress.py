"""Each step reports its own peak resident memory: what it allocated, not what came before it."""

from __future__ import annotations

import re
import subprocess
import sys

# In a fresh interpreter: in the test process, earlier tests leave freed memory that the
# allocator reuses without growing the resident size, which would hide the allocation.
SCRIPT = """
import numpy as np
from btdeploy.progress import step

with step("outer"):
    with step("big"):
        block = np.ones(400 * 2**20 // 8)  # 400 MB, touched
        del block
    with step("small"):
        np.ones(10)
"""


def test_each_step_reports_its_own_peak() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    found = re.findall(r"\] (\w+): done in [\d.]+s, peak RSS ([\d.]+) GB", result.stderr)
    peaks = {name: float(gb) * 1024 for name, gb in found}
    assert set(peaks) == {"outer", "big", "small"}, result.stderr
    assert peaks["big"] - peaks["small"] >= 350  # the big step's 400 MB is not charged to the next one
    assert peaks["outer"] >= peaks["big"]  # an outer step holds what its inner steps held
