"""Whether `btdeploy serve`'s gateway keeps answering while it reads photos: the latency of
`/v2/health/live` with the server idle, then while clients send camera-sized JPEGs to `/v1/itm`.
The gateway decodes and preprocesses a task request's image, about 0.2 s for a 12-megapixel JPEG;
done on its event loop, every other request waited for it.

    python benchmarks/gateway_photos.py DIR [--megapixels 12] [--clients 4] [--requests 24] [--rounds 2]

DIR is an export folder with an itm head (the plain export is served). Each round polls the
liveness route alone for as long as the photo requests took in the round before (the first: 3 s),
then under the photo requests. Progress on stderr; the table on stdout.
"""

from __future__ import annotations

import argparse
import http.client
import io
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

from btdeploy.bench.load import drive
from btdeploy.bench.machine import cpu_text, machine_description
from btdeploy.cli import script_entry
from btdeploy.errors import BtDeployError
from btdeploy.runtime.runtime import find_head
from btdeploy.serve.process import ServerProcess

TASK = "/v1/itm?text=a%20cat%20on%20a%20couch&text=a%20football%20match"
LIVE = "/v2/health/live"


def photo(megapixels: float) -> bytes:
    """A noise JPEG of about that many pixels at 4:3, quality 90 (noise decodes no faster than a photo)."""
    from PIL import Image

    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = width * 3 // 4
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, "JPEG", quality=90)
    return encoded.getvalue()


class LivenessPoll:
    """Polls the liveness route every 10 ms on its own connection, keeping each answer's latency;
    an answer other than 200, or no answer, fails the run when the poll ends."""

    def __init__(self, url: str) -> None:
        self.url = urllib.parse.urlsplit(url)
        self.latencies_ms: list[float] = []
        self.failure: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        connection = http.client.HTTPConnection(self.url.hostname or "127.0.0.1", self.url.port, timeout=120)
        stopped = False
        try:
            while not stopped:  # at least one answer, however short the phase: the table's quantiles need one
                started = time.perf_counter()
                connection.request("GET", LIVE)
                reply = connection.getresponse()
                reply.read()
                if reply.status != 200:
                    self.failure = f"{LIVE} answered {reply.status}"
                    return
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
                stopped = self.stopping.wait(0.01)
        except OSError as error:  # the thread's own exception would not reach the table
            self.failure = f"{LIVE} did not answer: {error}"
        finally:
            connection.close()

    def __enter__(self) -> LivenessPoll:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        if self.failure is not None:
            raise BtDeployError(self.failure)


def quantiles(latencies_ms: list[float]) -> str:
    p50, p90, p99 = (float(np.percentile(latencies_ms, q)) for q in (50, 90, 99))
    return f"{len(latencies_ms)} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {max(latencies_ms):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an export folder with an itm head")
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    find_head(args.export, "itm")  # a folder without the head is refused before the server starts
    data = photo(args.megapixels)
    bodies = [(data, {"Content-Type": "image/jpeg"})] * args.requests
    rows = []
    with ServerProcess(args.export, ["--heads", "itm"]) as server:
        drive(server.url, TASK, bodies[: args.clients], args.clients)  # the first requests, untimed
        busy_s = 3.0
        for round_index in range(args.rounds):
            with LivenessPoll(server.url) as idle:
                time.sleep(busy_s)
            with LivenessPoll(server.url) as busy:
                run = drive(server.url, TASK, bodies, args.clients)
            busy_s = run["seconds"]
            failed = sum(status != 200 for status in run["statuses"])
            if failed:
                raise BtDeployError(f"{failed} of {len(bodies)} photo requests failed: {run['statuses']}")
            task_p50 = float(np.median(run["latencies"])) * 1000
            rows.append((round_index + 1, idle.latencies_ms, busy.latencies_ms, busy_s, task_p50))
            print(f"round {round_index + 1}/{args.rounds}: {len(bodies)} photo requests in {busy_s:.2f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    print(f"btdeploy serve {args.export} (itm, plain export); {cpu_text(machine_description(0))}")
    print(f"{args.requests} requests to /v1/itm, each a {len(data) / 1e6:.1f} MB JPEG of {args.megapixels:g} "
          f"megapixels and 2 captions, {args.clients} clients at a time; {LIVE} polled every 10 ms")  # fmt: skip
    print()
    print(f"| round | {LIVE} while | answers | p50 ms | p90 ms | p99 ms | max ms | photo requests: s, p50 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for round_number, idle_ms, busy_ms, seconds, task_p50 in rows:
        print(f"| {round_number} | idle | {quantiles(idle_ms)} | |")
        print(f"| {round_number} | photos arrive | {quantiles(busy_ms)} | {seconds:.2f} s, {task_p50:.0f} ms |")


if __name__ == "__main__":
    script_entry(main)
