"""`btdeploy serve` beside a Ray cluster that `ray start` began on this machine: joined with
--address it serves and leaves the cluster running; without --address it starts a Ray of its own
and leaves the cluster's Serve alone."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from btdeploy.serve.process import ServerProcess, free_port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the parent's pid is the field after the command, which may hold spaces
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _running(pid: int) -> bool:
    try:  # a process that has exited stays a zombie until its parent, or init, reaps it
        return (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]) != "Z"
    except (OSError, IndexError):
        return False


def _stop_tree(head: subprocess.Popen[bytes]) -> None:
    """The cluster's processes, all of them at once: `ray start --block` stops them one by one
    when it is stopped, waiting about 30 s on Serve's actors."""
    processes = [head.pid, *_descendants(head.pid)]
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_running(pid) for pid in processes[1:]):
        head.poll()
        time.sleep(0.2)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    head.wait(timeout=60)


def test_serve_joins_a_cluster_and_otherwise_starts_its_own_beside_it(tiny_export: Path, tmp_path: Path) -> None:
    """Without --address, ray.init had joined the cluster `ray start` began here, and the shutdown
    of a command that thought it had started Ray stopped that cluster's Serve and every
    application on it."""
    # Token authentication off: not whichever token an earlier Ray on this machine left in ~/.ray.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    gcs_port = free_port()
    start_log = tmp_path / "ray-start.log"
    ray_start = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block"]
    options = [f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--num-cpus=2"]
    with open(start_log, "w") as out:
        head = subprocess.Popen([*ray_start, *options, "--disable-usage-stats"], stdout=out, stderr=out, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in start_log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, start_log.read_text()
            time.sleep(0.2)

        joined = ServerProcess(tiny_export, ["--heads", "itm", "--address", f"127.0.0.1:{gcs_port}"], env=env)
        with joined:
            assert _answers(f"{joined.url}/v2/models/itm/ready")
            assert joined.stop() == 0, joined.tail()
        assert head.poll() is None, "joining and leaving stopped the cluster"
        # The cluster's Serve keeps its proxy after our application is deleted (other applications use it).
        assert _answers(f"{joined.url}/-/healthz")

        log = tmp_path / "own.log"
        command = [sys.executable, "-m", "btdeploy.cli", "serve", str(tiny_export), "--heads", "itm"]
        with open(log, "w") as stderr:
            own = subprocess.Popen([*command, "--port", str(free_port())], stderr=stderr, env=env)
        try:
            deadline = time.monotonic() + 120
            while (found := re.search(r"Ray at \S+:(\d+)", log.read_text())) is None:
                assert own.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            own.send_signal(signal.SIGTERM)
            assert own.wait(timeout=120) == 0, log.read_text()
        finally:
            if own.poll() is None:
                own.kill()
        assert int(found.group(1)) != gcs_port, f"joined the cluster instead of starting Ray: {log.read_text()}"
        assert _answers(f"{joined.url}/-/healthz"), f"the cluster's Serve was stopped: {log.read_text()}"
    finally:
        _stop_tree(head)
