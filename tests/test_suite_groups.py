"""The README's test command runs on two workers: a test file stays on one worker, and the files
of tests/serve/ share one (each starts Ray and counts the Ray processes it leaves). conftest.py's
scheduler reads the groups from each node id's file part; pytest 9.2 dropped the group suffix of
xdist's `xdist_group` marks, on which the groups had hung, and every file went to both workers."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_each_file_is_one_group_and_the_serve_files_share_one(tmp_path: Path) -> None:
    # Quick files that need no export, with enough tests that xdist's plain `load` would have
    # put some of each file on either worker: the check is of where they run, not of what they do.
    files = ["serve/test_cluster_address.py", "serve/test_serve_units.py", "test_progress.py", "test_cpu.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-n", "2", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}"]
        + [str(TESTS / name) for name in files],
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, path in re.findall(r"^\[(gw\d+)\] \[ *\d+%\] PASSED (tests/\S+?\.py)::", done.stdout, re.MULTILINE):
        workers[path].add(worker)
    assert set(workers) == {f"tests/{name}" for name in files}, done.stdout[-3000:]
    for path, ran_on in workers.items():
        assert len(ran_on) == 1, f"{path} ran on {sorted(ran_on)}"
    assert workers["tests/serve/test_cluster_address.py"] == workers["tests/serve/test_serve_units.py"]
