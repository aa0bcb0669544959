"""`btdeploy serve` as a child process: started, awaited until every head answers, stopped by its pid.
Its stderr goes to a temporary log, removed when the server stops cleanly and otherwise kept, with
its path in the error or on stderr.

The load bench and the server tests use it; the server itself runs in `server.py`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from btdeploy.errors import BtDeployError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(export, ["--max-batch", "16"]) as server: server.url`"""

    def __init__(
        self, export: Path, arguments: list[str], ready_timeout_s: float = 300, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.command = [
            sys.executable,
            "-m",
            "btdeploy.cli",
            "serve",
            str(export),
            "--port",
            str(self.port),
            *arguments,
        ]
        self.ready_timeout_s = ready_timeout_s
        self.env = env  # None: this process's
        self.log = Path(tempfile.mkstemp(prefix="btdeploy-serve-", suffix=".log")[1])
        self.url = ""
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerProcess:
        with open(self.log, "w") as stderr:
            self.process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=self.env
            )
        assert self.process.stdout is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            line = self.process.stdout.readline()
            if line.startswith("ready on "):
                self.url = line.split()[-1]
                return self
        self.stop()
        raise BtDeployError(f"btdeploy serve did not become ready; its log: {self.log}\n{self.tail()}")

    def tail(self, characters: int = 3000) -> str:
        return self.log.read_text()[-characters:]

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (the server shuts Ray down itself), then SIGKILL if it does not exit in time."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        # The log is kept only where it can explain something: an error, or a server that did not exit cleanly.
        code = self.stop()
        if code == 0 and kind is None:
            self.log.unlink(missing_ok=True)
        elif code != 0:
            print(f"btdeploy serve exited with code {code}; its log: {self.log}", file=sys.stderr)
