"""The load bench's report compares batching with no batching where both servers ran."""

from __future__ import annotations

from pathlib import Path

from btdeploy.bench.load import Level, write_serve_report


def _level(mode: str, concurrency: int, throughput: float) -> Level:
    return Level("itm fp32", mode, concurrency, 16, 16 / throughput, throughput, 10.0, 12.0, 13.0)


def _comparison(levels: list[Level], tmp_path: Path) -> str:
    write_serve_report(levels, tmp_path, 1, 4, 8, 8)
    report = (tmp_path / "serve.md").read_text()
    return report.split("## Batching against no batching, same server", 1)[1]


def test_the_comparison_takes_concurrency_16_where_both_ran(tmp_path: Path) -> None:
    levels = [_level(mode, c, t * c) for c in (1, 4, 16) for mode, t in (("batching", 2.0), ("no batching", 1.0))]
    assert "- itm fp32, concurrency 16: 32.00 against 16.00 req/s, **2.00x**" in _comparison(levels, tmp_path)


def test_without_16_the_comparison_takes_the_highest_both_ran(tmp_path: Path) -> None:
    """A run with --concurrency 1,4 printed the heading and no comparison at all."""
    levels = [_level("batching", 1, 10.0), _level("batching", 4, 30.0), _level("no batching", 1, 9.0),
              _level("no batching", 4, 20.0), _level("batching", 8, 40.0)]  # fmt: skip
    assert "- itm fp32, concurrency 4: 30.00 against 20.00 req/s, **1.50x**" in _comparison(levels, tmp_path)


def test_nothing_in_common_says_so(tmp_path: Path) -> None:
    levels = [_level("batching", 4, 30.0), _level("no batching", 1, 9.0)]
    assert "no concurrency ran on both servers" in _comparison(levels, tmp_path)


def test_the_report_names_the_instruction_sets(tmp_path: Path) -> None:
    from btdeploy.bench.machine import cpu_description

    write_serve_report([_level("batching", 1, 10.0)], tmp_path, 1, 4, 8, 8)
    flags = ", ".join(cpu_description()["flags"])
    assert f"logical cores; flags: {flags})" in (tmp_path / "serve.md").read_text()
