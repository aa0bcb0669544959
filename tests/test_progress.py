"""Each step reports its own peak resident memory: what it allocated, not what came before it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

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


# 400 MB held only by a reference cycle, as Model Optimizer's GraphSurgeon graphs hold weights;
# the cyclic collector off, as it is in effect where a process holds many long-lived objects.
CYCLE_SCRIPT = """
import gc
import numpy as np
from btdeploy import progress
from btdeploy.progress import step

class Holder:
    pass

def cycle_holding_400_mb():
    a, b = Holder(), Holder()
    a.other, b.other = b, a
    a.block = np.ones(400 * 2**20 // 8)

gc.disable()
progress.COLLECT_EVERY_S = 0.0
cycle_holding_400_mb()
with step("next"):
    np.ones(10)
with step("outer"):
    cycle_holding_400_mb()
    with step("nested"):
        np.ones(10)
progress.COLLECT_EVERY_S = 3600.0
with step("soon"):  # the last collection was under COLLECT_EVERY_S ago
    np.ones(10)
"""


def test_an_outermost_step_starts_without_the_garbage_of_reference_cycles() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CYCLE_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    found = re.findall(r"\] (\w+): done in [\d.]+s, peak RSS ([\d.]+) GB", result.stderr)
    peaks = {name: float(gb) * 1024 for name, gb in found}
    assert set(peaks) == {"next", "outer", "nested", "soon"}, result.stderr
    assert peaks["next"] < 300, result.stderr  # the cycle's 400 MB was freed before the step began
    assert peaks["nested"] - peaks["next"] >= 350  # a nested step does not collect
    assert peaks["soon"] - peaks["next"] >= 350  # nor one soon after the last collection


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A clock the test moves by hand: progress reads now[0] as time.monotonic()."""
    from btdeploy import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    return clock


def test_the_countdown_scales_what_is_left_by_how_the_finished_parts_went(
    now: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy import progress

    countdown = progress.Countdown("job", [10.0, 30.0, 60.0])
    now[0] += 20.0  # the first part took twice its estimate: the rest is expected to as well
    countdown.advance("first")
    now[0] += 60.0
    countdown.advance("second")
    now[0] += 150.0
    countdown.advance("last")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("job [1/3] first: 20s elapsed, about 3m00s left")
    assert lines[1].endswith("job [2/3] second: 1m20s elapsed, about 2m00s left")
    assert lines[2].endswith("job [3/3] last: 3m50s elapsed")


def test_row_progress_speaks_every_few_seconds_and_at_the_end(
    now: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy import progress

    rows = progress.RowProgress(10, "calibrating", every_s=10.0)
    for _ in range(10):
        now[0] += 3.0
        rows.advance()
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["calibrating: 4/10, 12s elapsed, about 18s left", "calibrating: 8/10, 24s elapsed, about 6s left",
                     "calibrating: 10/10, 30s elapsed"]  # fmt: skip


def test_a_skipped_part_leaves_the_estimate_to_the_parts_that_did_work(
    now: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy import progress

    countdown = progress.Countdown("job", [50.0, 10.0, 20.0])
    now[0] += 1.0
    countdown.advance("kept", skipped=True)  # 1 s for a part estimated at 50 s
    now[0] += 20.0
    countdown.advance("made")  # 20 s for 10: the last part (20) should take about 40 s
    lines = capsys.readouterr().err.splitlines()
    assert lines[1].endswith("job [2/3] made: 21s elapsed, about 42s left")


def test_one_off_time_counts_as_elapsed_but_not_towards_the_pace(
    now: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy import progress

    countdown = progress.Countdown("job", [10.0, 10.0, 20.0])
    now[0] += 100.0
    countdown.advance("compiled", one_off_s=90.0)  # 10 s of work for 10: the rest (30) takes about 30 s
    now[0] += 10.0
    countdown.advance("second")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("job [1/3] compiled: 1m40s elapsed, about 30s left")
    assert lines[1].endswith("job [2/3] second: 1m50s elapsed, about 20s left")
