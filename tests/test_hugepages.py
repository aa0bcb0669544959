"""Huge pages for the engines' memory: the environment btdeploy's commands start with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from btdeploy import hugepages
from btdeploy.hugepages import HugePageStatus


def test_the_tunable_joins_the_others_once_and_leaves_again() -> None:
    added = hugepages.with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert added["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and added["HOME"] == "/h"
    assert hugepages.with_hugepages(added) == added
    assert hugepages.with_hugepages({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert hugepages.tunable_value(added) == "1" and hugepages.tunable_value({"HOME": "/h"}) is None
    removed = hugepages.without_hugepages(added)
    assert removed["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and removed["BTDEPLOY_HUGEPAGES"] == "0"
    assert "GLIBC_TUNABLES" not in hugepages.without_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def test_the_kernel_mode_is_the_bracketed_one(tmp_path: Path) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(setting) == "madvise"
    setting.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(setting) == "always"
    assert hugepages.thp_mode(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("thp", "glibc", "tunable", "opted_out", "wanted", "described"),
    [
        ("madvise", (2, 36), None, False, True, "btdeploy's commands turn it on"),
        ("madvise", (2, 36), "1", False, False, "on in this process (GLIBC_TUNABLES=glibc.malloc.hugetlb=1"),
        ("madvise", (2, 36), None, True, False, "off: BTDEPLOY_HUGEPAGES=0"),
        ("madvise", (2, 36), "0", False, False, "as set: GLIBC_TUNABLES gives glibc.malloc.hugetlb=0"),
        ("always", (2, 36), None, False, False, "on in this process (the kernel's `always` mode"),
        ("never", (2, 36), None, False, False, "transparent huge pages are off in the kernel (`never`)"),
        ("madvise", (2, 31), None, False, False, "glibc 2.31: glibc.malloc.hugetlb needs glibc 2.35"),
        ("madvise", None, None, False, False, "not glibc"),
        (None, (2, 36), None, False, False, "the kernel has no transparent huge pages"),
    ],
)
def test_when_the_commands_restart_with_huge_pages(
    thp: str | None, glibc: tuple[int, int] | None, tunable: str | None, opted_out: bool, wanted: bool, described: str
) -> None:
    here = HugePageStatus(thp, glibc, tunable, opted_out)
    assert here.wanted() is wanted
    assert described in here.describe()


def _clean_environment() -> dict[str, str]:
    """This process's environment without any huge page setting, as a user's shell would have it."""
    environ = hugepages.without_hugepages(os.environ)
    environ.pop("BTDEPLOY_HUGEPAGES")
    return environ


def test_a_process_started_for_engines_gets_huge_pages_where_the_machine_allows() -> None:
    environ = hugepages.engine_environment(_clean_environment())
    touch = "import numpy, btdeploy.hugepages as h; a = numpy.ones(2**24); print(h.resident_memory().huge_mb)"
    got = subprocess.run([sys.executable, "-c", touch], env=environ, capture_output=True, text=True, check=True)
    huge_mb = float(got.stdout.strip().splitlines()[-1])
    if hugepages.status(_clean_environment()).wanted():
        assert environ["GLIBC_TUNABLES"].endswith("glibc.malloc.hugetlb=1")
        assert huge_mb >= 64  # most of the 128 MB array
    else:  # a kernel without THP `madvise`, or an old glibc: left as it is
        assert environ == _clean_environment()


@pytest.mark.parametrize("opt_out", [False, True])
def test_the_bench_command_restarts_with_huge_pages_and_says_so(
    tiny_export: Path, tmp_path: Path, opt_out: bool
) -> None:
    environ = _clean_environment() | ({"BTDEPLOY_HUGEPAGES": "0"} if opt_out else {})
    settings = ["--variants", "ort", "--batch-sizes", "1", "--seq-lens", "8", "--iters", "2", "--warmup", "0"]
    command = [sys.executable, "-m", "btdeploy.cli", "bench", str(tiny_export), "--heads", "itm", *settings]
    command += ["--out", str(tmp_path)]
    subprocess.run(command, env=environ, capture_output=True, text=True, check=True)
    recorded = json.loads((tmp_path / "results.json").read_text())["machine"]["huge_pages"]
    before = hugepages.status(environ)
    if before.wanted():
        assert recorded.startswith("on in this process (GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    else:
        assert recorded == before.describe()
    assert f"huge pages: {recorded}" in (tmp_path / "results.md").read_text()
    if opt_out and before.unavailable() is None:
        assert recorded == "off: BTDEPLOY_HUGEPAGES=0"


def test_a_restart_that_cannot_happen_leaves_the_process_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError("no exec here")

    monkeypatch.setattr(hugepages, "status", lambda: HugePageStatus("madvise", (2, 36), None, False))
    monkeypatch.setattr(hugepages.os, "execve", refuse)
    hugepages.reexec_with_hugepages(["-m", "btdeploy.cli", "run"])  # returns: the caller goes on
    called: list[object] = []
    monkeypatch.setattr(hugepages.os, "execve", lambda *args: called.append(args))
    hugepages.reexec_with_hugepages(["-m", "btdeploy.cli", "run"])
    assert called and called[0][1][1:] == ["-m", "btdeploy.cli", "run"]  # type: ignore[index]
    assert called[0][2]["GLIBC_TUNABLES"].endswith("glibc.malloc.hugetlb=1")  # type: ignore[index]


def test_resident_memory_reads_the_kernels_rollup(tmp_path: Path) -> None:
    rollup = tmp_path / "smaps_rollup"
    rollup.write_text(
        "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0 [rollup]\nRss:              524288 kB\n"
        "Pss:              500000 kB\nAnonymous:        400000 kB\nAnonHugePages:    409600 kB\n"
    )
    held = hugepages.resident_memory(rollup)
    assert held == hugepages.ResidentMemory(512.0, 400.0)
    assert hugepages.resident_memory(tmp_path / "absent") is None  # not Linux: nothing to say
    rollup.write_text("Rss: 1 kB\n")
    assert hugepages.resident_memory(rollup) is None  # a kernel without THP accounting


def test_resident_memory_of_this_process_counts_a_new_array() -> None:
    before = hugepages.resident_memory()
    assert before is not None  # Linux, as btdeploy's machines and CI are
    block = np.ones(2**24)  # 128 MB, touched
    after = hugepages.resident_memory()
    assert after is not None and after.resident_mb - before.resident_mb > 100
    del block
