"""`btdeploy serve` joining a Ray cluster that `ray start` began on this machine: it serves, and on
its stop leaves the cluster and the cluster's Serve running. (Without --address it starts a Ray of
its own beside such a cluster: tests/serve/test_serve_units.py checks what it asks ray.init.) Before
it joins, the cluster's own GCS and Ray Client server tell the two address forms apart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from btdeploy.errors import BtDeployError
from btdeploy.serve.process import ServerProcess, free_port
from btdeploy.serve.settings import ServeSettings, check_settings


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command, which may hold spaces: state, parent's pid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(_stat(entry.name)[1])
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
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_tree(head: subprocess.Popen[bytes]) -> None:
    """The cluster's processes, all of them at once, by pid: `ray start --block` stops them one by
    one when it is stopped, waiting about 30 s on Serve's actors."""
    processes = [head.pid, *_descendants(head.pid)]
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3  # the raylet and an agent outwait 15 s of SIGTERM: they get SIGKILL
    while time.monotonic() < deadline and any(_running(pid) for pid in processes[1:]):
        head.poll()
        time.sleep(0.2)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    head.wait(timeout=60)


def test_serve_joins_a_cluster_and_leaves_it_running(tiny_export: Path, tmp_path: Path) -> None:
    # Token authentication off: not whichever token an earlier Ray on this machine left in ~/.ray.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    gcs_port, client_port = free_port(), free_port()
    start_log = tmp_path / "ray-start.log"
    ray_start = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block"]
    options = [f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--num-cpus=2"]
    options.append(f"--ray-client-server-port={client_port}")
    with open(start_log, "w") as out:
        head = subprocess.Popen([*ray_start, *options, "--disable-usage-stats"], stdout=out, stderr=out, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in start_log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, start_log.read_text()
            time.sleep(0.2)

        _each_address_form_takes_its_own_port(tiny_export, gcs_port, client_port)
        joined = ServerProcess(tiny_export, ["--heads", "itm", "--address", f"127.0.0.1:{gcs_port}"], env=env)
        with joined:
            assert _answers(f"{joined.url}/v2/models/itm/ready")
            assert joined.stop() == 0, joined.tail()
        assert head.poll() is None, "joining and leaving stopped the cluster"
        # The cluster's Serve keeps its proxy after our application is deleted (other applications use it).
        assert _answers(f"{joined.url}/-/healthz")
    finally:
        _stop_tree(head)


def _each_address_form_takes_its_own_port(export: Path, gcs_port: int, client_port: int) -> None:
    """Ray's own services, asked before ray.init: HOST:PORT takes the GCS port and ray:// the Ray
    Client server's; each given the other's, ray.init said 'Failed to connect' alone after 20-35 s."""
    deadline = time.monotonic() + 60  # the Ray Client server may start listening after the runtime says it started
    while not _listens(client_port):
        assert time.monotonic() < deadline, f"nothing listens on the Ray Client port {client_port}"
        time.sleep(0.2)

    def settings(address: str) -> ServeSettings:
        return ServeSettings(export_dir=str(export), heads=("itm",), address=address)

    check_settings(settings(f"127.0.0.1:{gcs_port}"))
    check_settings(settings(f"ray://127.0.0.1:{client_port}"))
    with pytest.raises(BtDeployError, match=f"127.0.0.1:{client_port} is the Ray Client server's port"):
        check_settings(settings(f"127.0.0.1:{client_port}"))
    with pytest.raises(BtDeployError, match=f"127.0.0.1:{gcs_port} is the head's GCS port"):
        check_settings(settings(f"ray://127.0.0.1:{gcs_port}"))


def _listens(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False
