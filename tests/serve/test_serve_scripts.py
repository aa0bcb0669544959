"""The benchmark scripts that start `btdeploy serve` themselves (gateway_photos.py, serve_spin.py),
run end to end on the tiny served export with a few requests: their tables hold what the server
did, and they stop every server they started."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    BENCHMARKS,
    is_quotient_of_printed,
    markdown_table,
    ray_processes,
    ray_processes_left,
    run_benchmark,
)

from btdeploy.bench.machine import cpu_text, machine_description


def test_gateway_photos_times_the_liveness_route_idle_and_while_photos_arrive(served_export: Path) -> None:
    before = ray_processes()
    done = run_benchmark(
        "gateway_photos.py", served_export, "--megapixels", "0.3", "--clients", "2", "--requests", "4",
        "--rounds", "2", timeout=600,
    )  # fmt: skip
    assert not ray_processes_left(before), "Ray processes left behind"
    assert f"btdeploy serve {served_export} (itm, plain export); {cpu_text(machine_description(0))}" in done.stdout
    request_line = r"^4 requests to /v1/itm, each a [\d.]+ MB JPEG of 0.3 megapixels and 2 captions, 2 clients"
    assert re.search(request_line, done.stdout, re.M), done.stdout
    assert re.findall(r"^round (\d)/2: 4 photo requests in [\d.]+ s$", done.stderr, re.M) == ["1", "2"], done.stderr
    rows = markdown_table(done.stdout, "round")
    assert [(row[0], row[1]) for row in rows] == [
        ("1", "idle"), ("1", "photos arrive"), ("2", "idle"), ("2", "photos arrive")
    ]  # fmt: skip
    for row in rows:
        answers, p50, p90, p99, largest = int(row[2]), *map(float, row[3:7])
        assert answers >= 1, row
        assert 0 < p50 <= p90 <= p99 <= largest + 0.5, row  # the largest is printed to 1 ms
    assert int(rows[0][2]) >= 10, rows[0]  # round 1 polls the idle server for 3 s, every 10 ms
    for row in rows[1::2]:
        photos = re.fullmatch(r"([\d.]+) s, (\d+) ms", row[7])
        assert photos is not None and float(photos[1]) > 0 and int(photos[2]) > 0, row


def test_serve_spin_serves_every_request_in_the_batches_it_reports(served_export: Path) -> None:
    before = ray_processes()
    done = run_benchmark(
        "serve_spin.py", served_export, "--replicas", "1", "--concurrency", "2", "--requests", "4", "--rounds", "1",
        timeout=600,
    )  # fmt: skip
    assert not ray_processes_left(before), "Ray processes left behind"
    assert re.findall(r"^round 1/1, (--\S+): [\d.]+ req/s, 0 errors$", done.stderr, re.M) == ["--no-spin", "--spin"]
    rows = {row[0]: row for row in markdown_table(done.stdout, "setting")}
    assert list(rows) == ["--no-spin", "--spin"]
    for setting, (_, rate, p50, p99, errors, formed) in rows.items():
        assert float(rate) > 0 and 0 < float(p50) <= float(p99), setting
        assert errors == "0", setting
        batches = {int(size): int(count) for size, count in re.findall(r"(\d+): (\d+)", formed)}
        # The server's own batch counters: each of the 4 timed requests in exactly one batch of at most 2
        assert sum(size * count for size, count in batches.items()) == 4, (setting, formed)
        assert max(batches) <= 2, (setting, formed)
    ratio = re.search(r"--no-spin / --spin throughput, per round: ([\d.]+)x \(median ([\d.]+)x\)", done.stdout)
    assert ratio is not None, done.stdout
    per_round, median = map(float, ratio.groups())
    assert per_round == median  # one round
    no_spin, spin = float(rows["--no-spin"][1]), float(rows["--spin"][1])
    assert is_quotient_of_printed(per_round, no_spin, spin, 0.005, half_digit=0.005), (per_round, no_spin, spin)


@pytest.mark.parametrize("script", ["gateway_photos.py", "serve_spin.py"])
def test_a_folder_without_an_itm_head_is_refused_before_a_server_starts(script: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"{script}: error: {tmp_path} has no exported head(s) itm (found: none); "
        "export them with btdeploy export --heads\n"
    )
