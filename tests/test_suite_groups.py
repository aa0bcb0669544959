"""The README's test command runs on two workers: a test file stays on one worker, and the files
of tests/serve/ share one (each starts Ray and counts the Ray processes it leaves). The groups
only hold if conftest.py marks them before pytest-xdist reads the marks: marked after, every test
went to whichever worker was free and two servers ran at once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_each_file_is_one_group_and_the_serve_files_share_one(tmp_path: Path) -> None:
    # Tests that need no export: the check is of where they run, not of what they do.
    files = [
        "serve/test_cluster_address.py::test_settings_refuse_an_address_where_something_else_than_ray_listens",
        "serve/test_cluster_address.py::test_a_certificate_name_covers_a_host_as_grpc_reads_it",
        "serve/test_serve_units.py::test_task_requests_json_and_raw",
        "serve/test_serve_units.py::test_feature_cache_is_bounded_least_recently_used_first",
        "test_progress.py",
        "test_cpu.py",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-n", "2", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}"]
        + [str(TESTS / name) for name in files],
        capture_output=True,
        text=True,
        cwd=TESTS.parent,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = re.findall(r"PASSED (\S+?)::\S+@(\S+)", done.stdout)
    assert {Path(path).name for path, _ in ran} == {Path(name.split("::")[0]).name for name in files}, done.stdout[
        -3000:
    ]
    for path, group in ran:
        expected = "serve" if path.startswith("tests/serve/") else str(TESTS.parent / path)
        assert group == expected, (path, group)
