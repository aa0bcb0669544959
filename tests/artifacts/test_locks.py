"""The head folder's lock: one writing step at a time, and a process's own step is not "another"."""

from __future__ import annotations

from pathlib import Path

import pytest

from btdeploy.artifacts.locks import head_lock, writer_of
from btdeploy.errors import BtDeployError


def test_a_refused_second_lock_leaves_the_holder_reading_its_own_folder(tmp_path: Path) -> None:
    """A refused attempt had dropped the folder from the process's held set on its way out, so
    the step still holding the lock read its own folder as written by another process."""
    folder = tmp_path / "itm"
    folder.mkdir()
    with head_lock(folder, "a step"):
        assert writer_of(folder) is None
        with pytest.raises(BtDeployError, match=r"being written by another btdeploy step \(a step, pid \d+\)"):
            with head_lock(folder, "a second step"):
                pass
        assert writer_of(folder) is None
    assert writer_of(folder) is None  # released
