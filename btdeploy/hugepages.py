"""Huge pages for the engines' memory: the commands that run models start with glibc's malloc
asking the kernel for 2 MB pages.

glibc leaves what it allocates on 4 KB pages unless the process starts with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc 2.35+; read once, at start-up), and with the
kernel's transparent huge pages in `madvise` mode, the common default, nothing else asks for
them. ONNX Runtime reads every prepacked weight on each run from memory it allocated that way;
on a 2-core Xeon VM, base itm ran 1.02-1.23x faster on 2 MB pages in two runs and 0.97-1.09x in
two later ones, FP32 and INT8, while OpenVINO, which allocates its own way, did not gain
(`benchmarks/lone_sessions.py --hugepages both`; benchmarks/results/base-peers-cpu).

`reexec_with_hugepages` starts the CLI's model-running commands (and each benchmark script that
times models in its own process) once more with the tunable, before they allocate anything;
child processes inherit it. `BTDEPLOY_HUGEPAGES=0` turns it off. A program that calls
`btdeploy.load` itself is started by its user: `btdeploy doctor` prints the line to start it with.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TUNABLES = "GLIBC_TUNABLES"
HUGETLB = "glibc.malloc.hugetlb"
SETTING = f"{HUGETLB}=1"  # 1: madvise(MADV_HUGEPAGE) on malloc's memory; 2 would need reserved hugetlbfs pages
OPT_OUT = "BTDEPLOY_HUGEPAGES"  # "0" keeps 4 KB pages
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
FIRST_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
ENGINE_COMMANDS = ("run", "rank", "bench", "serve")  # the CLI commands that run models start with it


def thp_mode(setting: Path = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (always, madvise, never), None where there is none."""
    try:
        chosen = re.search(r"\[(\w+)\]", setting.read_text())
    except OSError:
        return None
    return chosen.group(1) if chosen else None


def glibc_version() -> tuple[int, int] | None:
    library, version = platform.libc_ver()
    if library != "glibc" or not re.match(r"\d+\.\d+", version):
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def tunable_value(environ: Mapping[str, str]) -> str | None:
    """The value this environment gives glibc.malloc.hugetlb, None when it gives none."""
    for item in environ.get(TUNABLES, "").split(":"):
        name, _, value = item.partition("=")
        if name == HUGETLB:
            return value
    return None


@dataclass(frozen=True)
class HugePageStatus:
    thp: str | None  # the kernel's mode
    glibc: tuple[int, int] | None
    tunable: str | None  # glibc.malloc.hugetlb in this environment
    opted_out: bool

    def unavailable(self) -> str | None:
        """Why malloc's memory cannot be on huge pages here, None when it can."""
        if self.thp is None:
            return "the kernel has no transparent huge pages (not Linux, or no /sys/kernel/mm/transparent_hugepage)"
        if self.thp == "never":
            return "transparent huge pages are off in the kernel (`never`); `madvise` or `always` allows them"
        if self.glibc is None or self.glibc < FIRST_GLIBC:
            found = "not glibc" if self.glibc is None else f"glibc {self.glibc[0]}.{self.glibc[1]}"
            return f"{found}: glibc.malloc.hugetlb needs glibc 2.35 or later"
        return None

    def wanted(self) -> bool:
        """btdeploy's commands should start with the tunable: possible here, needed (the kernel's mode
        is `madvise`; `always` gives malloc's memory huge pages anyway), not set, not turned off."""
        return self.unavailable() is None and self.thp == "madvise" and self.tunable is None and not self.opted_out

    def describe(self) -> str:
        reason = self.unavailable()
        if reason is not None:
            return f"off: {reason}"
        if self.tunable == "1" or self.thp == "always":
            how = f"{TUNABLES}={HUGETLB}={self.tunable}" if self.tunable else "the kernel's `always` mode"
            return f"on in this process ({how}; kernel mode {self.thp})"
        if self.tunable is not None:
            return f"as set: {TUNABLES} gives {HUGETLB}={self.tunable}, which btdeploy's commands keep"
        if self.opted_out:
            return f"off: {OPT_OUT}=0"
        return (
            f"off in this process; btdeploy's commands turn it on (btdeploy {', '.join(ENGINE_COMMANDS)} start "
            f"with {TUNABLES}={SETTING}, kernel mode {self.thp}); start your own program the same way: "
            f"{TUNABLES}={SETTING} python app.py"
        )


def status(environ: Mapping[str, str] | None = None) -> HugePageStatus:
    environ = os.environ if environ is None else environ
    return HugePageStatus(thp_mode(), glibc_version(), tunable_value(environ), environ.get(OPT_OUT) == "0")


def with_hugepages(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES (other tunables kept)."""
    merged = dict(environ)
    if tunable_value(environ) is None:
        merged[TUNABLES] = ":".join(filter(None, [environ.get(TUNABLES, ""), SETTING]))
    return merged


def without_hugepages(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` on 4 KB pages: glibc.malloc.hugetlb taken out, btdeploy's re-start turned off."""
    kept = [item for item in environ.get(TUNABLES, "").split(":") if item and item.partition("=")[0] != HUGETLB]
    merged = {name: value for name, value in environ.items() if name != TUNABLES}
    if kept:
        merged[TUNABLES] = ":".join(kept)
    merged[OPT_OUT] = "0"
    return merged


def engine_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a process that runs models should start with: with the tunable where wanted."""
    environ = dict(os.environ if environ is None else environ)
    return with_hugepages(environ) if status(environ).wanted() else environ


def reexec_with_hugepages(arguments: list[str]) -> None:
    """Replace this process by `python ARGUMENTS` started with the tunable, where wanted: the CLI
    passes `-m btdeploy.cli ...`, a script its `sys.argv`. Call it before anything allocates much:
    glibc reads the tunable only at start-up."""
    if not sys.executable or not status().wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *arguments], with_hugepages(os.environ))
    except OSError:
        return  # the interpreter cannot be started again (an embedded one): run on 4 KB pages


@dataclass(frozen=True)
class ResidentMemory:
    """This process's resident memory and how much of it is on transparent huge pages, in MB."""

    resident_mb: float
    huge_mb: float


def resident_memory(rollup: Path = Path("/proc/self/smaps_rollup")) -> ResidentMemory | None:
    """What this process holds now (None where the kernel does not report it). An engine that
    allocates its own way shows here with little on huge pages even when malloc asks for them."""
    try:
        text = rollup.read_text()
    except OSError:
        return None
    resident, huge = (re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE) for key in ("Rss", "AnonHugePages"))
    if resident is None or huge is None:
        return None
    return ResidentMemory(int(resident.group(1)) / 1024, int(huge.group(1)) / 1024)
