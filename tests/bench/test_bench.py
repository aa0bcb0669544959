"""The benchmark harness: statistics, interleaving, FLOP counting, skip reasons, reports."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    BENCHMARKS,
    benchmark_module,
    is_quotient_of_printed,
    markdown_table,
    markdown_tables,
    run_benchmark,
)
from PIL import Image

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.targets import bench_variants
from btdeploy.bench.flops import forward_flops
from btdeploy.bench.report import CSV_COLUMNS, write_reports
from btdeploy.bench.runner import BenchSettings, interleaved_order, resolve_variants, run_bench, time_case
from btdeploy.bench.stats import summarize
from btdeploy.bench.variants import VARIANTS, BenchEnv, Variant
from btdeploy.cpu import SaturationCount, sums_saturate_here, u8s8_gemm
from btdeploy.errors import BtDeployError
from btdeploy.export.exporter import head_module
from btdeploy.hugepages import thp_mode
from btdeploy.model.configs import build_config
from btdeploy.model.heads import HEADS
from btdeploy.model.inputs import sample_inputs
from btdeploy.signals import Terminated


def test_statistics_of_known_samples() -> None:
    seconds = [ms / 1000 for ms in range(100, 0, -1)]  # 1..100 ms, unsorted
    stats = summarize(seconds, batch=4)
    assert stats.samples == 100
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)  # linear interpolation between 90 and 91
    assert stats.p99_ms == pytest.approx(99.01)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.throughput == pytest.approx(4 / 0.0505)
    with pytest.raises(ValueError):
        summarize([], batch=1)


def test_interleaving_puts_every_variant_in_every_position() -> None:
    names = ["a", "b", "c"]
    orders = [interleaved_order(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(order[position] for order in orders) == names


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.description = name

    def run(self, feeds: dict) -> dict:
        self.log.append(self.name)
        return {}


def test_time_case_interleaves_after_warmup() -> None:
    log: list[str] = []
    backends = {n: Recorder(n, log) for n in ("a", "b")}
    samples, rss, first = time_case(backends, {}, warmup=1, iters=3, seconds=None)  # type: ignore[arg-type]
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {n: len(s) for n, s in samples.items()} == {"a": 3, "b": 3}
    assert all(value > 0 for value in rss.values())
    assert set(first) == {"a", "b"}  # the first warm-up call, kept out of the samples


def test_time_case_by_seconds_runs_at_least_three_rounds() -> None:
    log: list[str] = []
    samples, _, first = time_case({"a": Recorder("a", log)}, {}, warmup=0, iters=None, seconds=0.0)
    assert len(samples["a"]) == 3 and first == {}


SMALL = {
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "contrastive_hidden_size": 16,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
                    "vocab_size": 1000},
    "vision_config": {"hidden_size": 64, "num_hidden_layers": 2, "image_size": 32, "patch_size": 16},
}  # fmt: skip


def test_flops_match_a_hand_count() -> None:
    # Batch 1, text length 3, 5 image tokens (4 patches + CLS), width 64, FFN 96 (text and
    # cross) and 256 (vision), 2 uni-modal layers, 1 cross layer. 2 FLOPs per multiply-add.
    text_layer = 4 * (2 * 3 * 64 * 64) + 2 * (2 * 3 * 3 * 64) + 2 * (2 * 3 * 64 * 96)
    vision_layer = 4 * (2 * 5 * 64 * 64) + 2 * (2 * 5 * 5 * 64) + 2 * (2 * 5 * 64 * 256)
    patches = 2 * 4 * (3 * 16 * 16) * 64
    text_cross = (
        (4 * 2 * 3 * 64 * 64 + 2 * 2 * 3 * 3 * 64)
        + (2 * (2 * 3 * 64 * 64) + 2 * (2 * 5 * 64 * 64) + 2 * (2 * 3 * 5 * 64))
        + 2 * (2 * 3 * 64 * 96)
    )
    image_cross = (
        (4 * 2 * 5 * 64 * 64 + 2 * 2 * 5 * 5 * 64)
        + (2 * (2 * 5 * 64 * 64) + 2 * (2 * 3 * 64 * 64) + 2 * (2 * 5 * 3 * 64))
        + 2 * (2 * 5 * 64 * 96)
    )
    transforms = 2 * 3 * 64 * 64 + 2 * 5 * 64 * 64
    poolers = 2 * (2 * 64 * 64)
    itm_classifier = 2 * 128 * 2
    hand = (
        2 * text_layer + patches + 2 * vision_layer + text_cross + image_cross + transforms + poolers + itm_classifier
    )
    config = build_config(SMALL)
    assert forward_flops(config, HEADS["itm"], 1, 3) == hand
    assert forward_flops(config, HEADS["itm"], 5, 3) == 5 * hand


@pytest.mark.parametrize("head", list(HEADS))
def test_flops_agree_with_torch_flop_counter(head: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    config = build_config(SMALL)
    config._attn_implementation = "eager"
    module = head_module(HEADS[head].model_class_object()(config).eval(), HEADS[head])
    batch, length = 3, 7
    feeds = sample_inputs(config, batch, length)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*[torch.from_numpy(feeds[n]) for n in HEADS[head].input_names])
    # nn.MultiheadAttention runs the vision attention's two MatMuls (5 tokens, width 64, 2
    # layers) in a fused CPU kernel: torch 2.13 and 2.14's counter does not see it, 2.15's counts
    # it as scaled-dot-product attention. Either way they enter once, counted by hand.
    vision_attention = batch * 2 * 2 * (2 * 5 * 5 * 64)
    counted = counter.get_flop_counts()["Global"]
    fused = sum(flops for op, flops in counted.items() if "scaled_dot_product" in str(op))
    assert fused in (0, vision_attention)
    assert forward_flops(config, HEADS[head], batch, length) == counter.get_total_flops() - fused + vision_attention


def test_skip_reasons_say_why() -> None:
    import torch

    from btdeploy.artifacts.manifest import Manifest

    cpu, gpu = BenchEnv(threads=2, device="cpu"), BenchEnv(threads=2, device="cuda")
    manifest = Manifest(Path("/nonexistent/itm"), {"head": "itm"})
    assert VARIANTS["torch-eager"].unavailable(manifest, cpu) is None
    for name in ("torch-eager-fp16", "torch-compile-fp16"):
        assert "on a CUDA GPU only" in str(VARIANTS[name].unavailable(manifest, cpu)), name
    # Asked for the GPU, the reason is the truth about this machine.
    bf16_on_gpu = VARIANTS["torch-eager-bf16"].unavailable(manifest, gpu)
    assert bf16_on_gpu is None if torch.cuda.is_available() else "needs an NVIDIA GPU" in str(bf16_on_gpu)
    missing = str(VARIANTS["ort-fused"].unavailable(manifest, cpu))
    assert "itm/model.ort.onnx does not exist: run btdeploy optimize" in missing and "--flavour ort" in missing
    assert "TensorRT needs an NVIDIA GPU" in str(VARIANTS["trt-fp16"].unavailable(manifest, cpu))
    with pytest.raises(BtDeployError, match="unknown variant\\(s\\) ort-turbo"):
        resolve_variants(["ort", "ort-turbo"])


@pytest.mark.parametrize("exact_here", [True, False], ids=["vnni-cpu", "avx2-cpu"])
def test_saturating_variants_are_timed_only_where_they_change_the_kernel(
    monkeypatch: pytest.MonkeyPatch, exact_here: bool
) -> None:
    from btdeploy import cpu as cpu_module
    from btdeploy.artifacts.manifest import Manifest

    monkeypatch.setattr(cpu_module, "exact_integer_sums", lambda: ["avx512_vnni"] if exact_here else [])
    manifest = Manifest(Path("/nonexistent/itm"), {"head": "itm"})
    env = BenchEnv(threads=2, device="cpu")
    for precision in ("int8", "int8-dynamic"):
        reason = str(VARIANTS[f"ort-{precision}-saturating"].unavailable(manifest, env))
        assert ("sums integer products exactly (avx512_vnni)" in reason) == exact_here, reason
        assert (f"the same run as ort-{precision}'s" in reason) == exact_here, reason  # its own default twin
        declared = {name: variant.options for name, (_, variant) in bench_variants().items()}
        assert declared[f"ort-{precision}-saturating"].exact_sums is False
        assert declared[f"ort-{precision}"].exact_sums is True  # the default sums exactly
        if not exact_here:  # then only its graph is missing
            assert f"itm/model.ort.{precision}.onnx does not exist" in reason, reason
        # On a GPU provider there is no saturating kernel, whatever the CPU.
        on_gpu = str(VARIANTS[f"ort-{precision}-saturating"].unavailable(manifest, BenchEnv(threads=2, device="cuda")))
        assert on_gpu == f"a GPU provider has no saturating kernel: the same run as ort-{precision}'s", on_gpu


def test_bench_refuses_a_length_past_the_model_before_measuring_anything(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal had come after the matmul peak, seconds in; it now comes first."""
    from btdeploy.bench import machine

    def measured(threads: int) -> dict[str, float]:
        raise AssertionError("the matmul peak was measured before the shapes were checked")

    monkeypatch.setattr(machine, "matmul_peak_gflops", measured)
    settings = BenchSettings(batch_sizes=(1,), text_lengths=(4, 600), warmup=1, iters=1, threads=1)
    with pytest.raises(BtDeployError, match=r"--seq-lens 600 is outside 1\.\.512"):
        run_bench(tiny_export, ["itm"], ["ort"], settings)


def test_bench_writes_every_report(tiny_export: Path, tmp_path: Path) -> None:
    settings = BenchSettings(batch_sizes=(1, 2), text_lengths=(4, 9), warmup=1, iters=3, threads=1)
    torch.set_num_threads(2)
    run = run_bench(tiny_export, ["itm"], ["torch-eager", "ort", "ort-hf-optimizer", "ort-fused", "trt-int8"], settings)
    assert torch.get_num_threads() == 2  # the caller's setting put back (it had left 1 for the rest of the process)
    assert {(c.variant, c.batch, c.text_length) for c in run.cases} == {
        (v, b, n) for v in ("torch-eager", "ort", "ort-hf-optimizer") for b in (1, 2) for n in (4, 9)
    }
    assert sorted(s.variant for s in run.skips) == ["ort-fused", "trt-int8"]
    assert run.matmul_peak_gflops > 1
    for case in run.cases:
        assert len(case.samples_s) == 3 and case.stats.median_ms > 0
        assert case.speedups["torch-eager"] == pytest.approx(
            next(
                c.stats.median_ms
                for c in run.cases
                if (c.variant, c.batch, c.text_length) == ("torch-eager", case.batch, case.text_length)
            )
            / case.stats.median_ms
        )
        assert "ort-hf-optimizer" in case.speedups
    written = write_reports(run, tmp_path / "results")
    names = sorted(p.name for p in written)
    assert names == ["latency_itm.png", "results.csv", "results.json", "results.md"]
    rows = list(csv.DictReader((tmp_path / "results" / "results.csv").open()))
    assert len(rows) == 12 and list(rows[0]) == CSV_COLUMNS
    assert {r["engine"] for r in rows} == {"torch", "onnxruntime"}
    data = json.loads((tmp_path / "results" / "results.json").read_text())
    assert len(data["cases"]) == 12 and all(len(c["samples_s"]) == 3 for c in data["cases"])
    assert data["machine"]["cpu"]["logical_cores"] >= 1 and data["matmul_peak_gflops"] > 1
    assert len(data["against_peers"]) == 4 and all(r["paired"]["rounds"] == 3 for r in data["against_peers"])
    table = (tmp_path / "results" / "results.md").read_text()
    main, peers = table.split("## btdeploy against the peers")
    main, rounds = main.split("## Speedups round by round")
    assert "FP32 matmul peak measured in this run" in main and main.count("| itm |") == 12
    # Per case: ort against both baselines, and each baseline against the other.
    assert rounds.count("| itm |") == len(data["round_speedups"]) == 16
    assert all(r["paired"]["rounds"] == 3 for r in data["round_speedups"])
    # One row per case: btdeploy's only variant here (ort) against the faster of torch-eager and ort-hf-optimizer.
    assert peers.count("| itm |") == 4 and peers.count("| fp32 | ort ") == 4
    assert "`ort-fused` (itm): " in table and "itm/model.ort.onnx does not exist: run btdeploy optimize" in table
    with Image.open(tmp_path / "results" / "latency_itm.png") as image:
        assert image.size[0] > 800
    assert (read_manifest(tiny_export / "itm").folder / "hf-optimizer" / "model.hf-optimizer.onnx").is_file()


@pytest.mark.parametrize(("stop", "exit_code"), [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_interrupt_keeps_finished_cases(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, stop: type[KeyboardInterrupt], exit_code: int
) -> None:
    calls = {"n": 0}

    class Interrupting:
        description = "interrupting"

        def run(self, feeds: dict) -> dict:
            calls["n"] += 1
            if calls["n"] > 2:  # warm-up + one round of the first case, then Ctrl-C or SIGTERM
                raise stop
            return {}

    fake = Variant("fake", "torch", "fp32", lambda m, e: None, lambda m, e: Interrupting())  # type: ignore[arg-type, return-value]
    monkeypatch.setitem(VARIANTS, "fake", fake)
    settings = BenchSettings(batch_sizes=(1, 2), text_lengths=(4,), warmup=1, iters=1, threads=1)
    run = run_bench(tiny_export, ["itm"], ["fake"], settings)
    assert run.interrupted and run.exit_code == exit_code
    assert [(c.batch, c.text_length) for c in run.cases] == [(1, 4)]
    assert np.isfinite(run.cases[0].stats.median_ms)


def test_a_stop_before_any_case_finished_keeps_the_last_runs_reports(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.cli import main

    class StoppedAtOnce:
        description = "stopped at once"

        def run(self, feeds: dict) -> dict:
            raise KeyboardInterrupt

    fake = Variant("fake", "torch", "fp32", lambda m, e: None, lambda m, e: StoppedAtOnce())  # type: ignore[arg-type, return-value]
    monkeypatch.setitem(VARIANTS, "fake", fake)
    out = tmp_path / "bench"
    out.mkdir()
    last_run = {name: f"the last run's {name}" for name in ("results.md", "results.json", "results.csv")}
    for name, text in last_run.items():
        (out / name).write_text(text)
    argv = ["bench", str(tiny_export), "--heads", "itm", "--variants", "fake", "--batch-sizes", "1", "--seq-lens", "4"]
    assert main([*argv, "--iters", "1", "--out", str(out)]) == 130
    assert {path.name: path.read_text() for path in out.iterdir()} == last_run
    assert f"no case finished: nothing written to {out} (the reports already there are kept)" in capsys.readouterr().err


@pytest.mark.parametrize("rotate", [True, False])
def test_every_variant_is_built_in_every_position(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rotate: bool
) -> None:
    built: list[str] = []
    ran: list[str] = []

    def fake(name: str) -> Variant:
        def build(manifest: object, env: object) -> Recorder:
            built.append(name)
            return Recorder(name, ran)

        return Variant(name, "torch", "fp32", lambda m, e: None, build)

    for name in ("a", "b", "c"):
        monkeypatch.setitem(VARIANTS, name, fake(name))
    settings = BenchSettings(batch_sizes=(1,), text_lengths=(4, 5), warmup=1, iters=4, threads=1, rotate_builds=rotate)
    run = run_bench(tiny_export, ["itm"], ["a", "b", "c"], settings)
    # Each build is announced: a torch-compile build's first case takes minutes with no other line.
    announced = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines() if "building" in line]
    if rotate:
        assert built == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
        assert announced == [f"bench itm: building 3 variant(s) (build order {i}/3: {order})"
                             for i, order in enumerate(("a, b, c", "b, c, a", "c, a, b"), 1)]  # fmt: skip
        builds, rounds = 3, 6  # 4 rounds asked, split over 3 builds: 2 rounds each
    else:
        assert built == ["a", "b", "c"] and announced == ["bench itm: building 3 variant(s)"]
        builds, rounds = 1, 4
    assert {(c.variant, c.text_length): len(c.samples_s) for c in run.cases} == {
        (v, n): rounds for v in "abc" for n in (4, 5)
    }
    assert len(ran) == 2 * 3 * (builds + rounds)  # per case and variant: a warm-up run per build, then the rounds
    write_reports(run, tmp_path)
    timing = "builds of the variants in every order" if rotate else "each variant built once in the order given"
    rounds_line = "4 interleaved rounds asked, 6 run" if rotate else "4 interleaved rounds ("
    table = (tmp_path / "results.md").read_text()
    assert timing in table and rounds_line in table


def test_the_bench_counts_down_without_taking_a_compilation_for_its_pace(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A torch-compile variant's first call compiles for a minute; taken as the pace of the run,
    it had made a seven-minute bench say hours. The first build (loading the model) is one-off too.
    It compiles again at the first batch past 1 (a size of 1 is specialized): that minute is said
    ahead, where the countdown had promised seconds."""
    import time

    from btdeploy.bench import machine

    clock = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(machine, "matmul_peak_gflops", lambda threads: {"torch": 100.0})

    compiled_kinds: set[bool] = set()  # batch 1 or not, as torch.compile tells shapes apart; kept across builds

    class Timed:
        description = "timed"

        def __init__(self, compile_s: float) -> None:
            self.compile_s = compile_s
            self.compiles_per_size_one_kind = compile_s > 0

        def run(self, feeds: dict) -> dict:
            kind = feeds["input_ids"].shape[0] == 1
            if self.compiles_per_size_one_kind and kind not in compiled_kinds:
                clock[0] += self.compile_s  # the first call of each kind compiles
                compiled_kinds.add(kind)
            clock[0] += 0.01  # every run takes 10 ms
            return {}

    loaded: set[str] = set()

    def fake(name: str, compile_s: float) -> Variant:
        def build(manifest: object, env: object) -> Timed:
            first = name not in loaded  # the first build loads the model; later ones reuse the compilation
            clock[0] += 5.0 if first else 0.1
            loaded.add(name)
            return Timed(compile_s)

        return Variant(name, "torch", "fp32", lambda m, e: None, build)  # type: ignore[arg-type]

    monkeypatch.setitem(VARIANTS, "compiled", fake("compiled", 60.0))
    monkeypatch.setitem(VARIANTS, "plain", fake("plain", 0.0))
    settings = BenchSettings(batch_sizes=(1, 2), text_lengths=(4,), warmup=1, iters=4, threads=1)
    run_bench(tiny_export, ["itm"], ["compiled", "plain"], settings)
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert "bench: 4 part(s) to time (itm: 2 variant(s) x 2 shape(s) in 2 build order(s)); " in "\n".join(lines)
    parts = [line for line in lines if line.startswith("bench [")]
    assert [part.split("]")[0] for part in parts] == [f"bench [{k}/4" for k in range(1, 5)]
    # Part 1: 10 s of builds and 60 s of compiling, 0.05 s of runs: about 0.15 s are left, not 3.5 minutes,
    # and the minute batch 2 will compile.
    assert parts[0].startswith("bench [1/4] itm batch 1 length 4 (build order 1/2): compiled 10.0 ms, plain 10.0 ms")
    assert parts[0].endswith(": 1m10s elapsed, about 1m00s left")
    assert parts[1].endswith(": 2m10s elapsed, about 0s left")  # compiled for batch 2: no more compiling ahead
    assert parts[-1].endswith("elapsed")


def test_a_head_with_every_variant_skipped_times_nothing(tiny_export: Path) -> None:
    settings = BenchSettings(batch_sizes=(1,), text_lengths=(4,), warmup=1, iters=None, seconds=0.1, threads=1)
    run = run_bench(tiny_export, ["itm"], ["ort-fused", "trt-int8"], settings)
    assert run.cases == [] and sorted(s.variant for s in run.skips) == ["ort-fused", "trt-int8"]


def test_speedup_breakdown_finds_each_kind_of_work(optimized: Path, tmp_path: Path) -> None:
    # The breakdown sorts profiler events by operator name; a renamed GEMM or attention kernel
    # in either library would silently land in "everything else".
    run_benchmark("speedup_breakdown.py", optimized / "itm", "--batch", 2, "--seq-len", 8, "--variants", "ort-fused",
                  "--rounds", 2, "--threads", 1, "--out", tmp_path)  # fmt: skip
    record = json.loads((tmp_path / "breakdown.json").read_text())
    assert set(record["kinds_ms"]) == {"torch-eager", "ort-fused"}
    for variant, kinds in record["kinds_ms"].items():
        assert kinds["weight GEMMs"] > 0 and kinds["attention core"] > 0, (variant, kinds)
        wall_ms = 1e3 * float(np.median(record["wall_s"][variant]))
        assert sum(kinds.values()) < 1.5 * wall_ms, (variant, kinds, wall_ms)  # per run, not summed over rounds
    assert len(record["wall_s"]["ort-fused"]) == 2
    assert "| weight GEMMs |" in (tmp_path / "breakdown.md").read_text()


def test_the_report_sets_btdeploy_against_the_fastest_peer_per_precision() -> None:
    from btdeploy.bench.report import markdown
    from btdeploy.bench.runner import BenchRun, BenchSettings, CaseResult
    from btdeploy.bench.stats import summarize

    medians = {"ort-fused": 10.0, "ort-int8-dynamic": 4.0, "torch-eager": 30.0, "openvino-fp32": 12.0,
               "openvino-int8": 5.0, "torch-compile": 20.0}  # fmt: skip
    run = BenchRun(BenchSettings())
    for name, median in medians.items():
        stats = summarize([median / 1e3] * 3, 1)
        run.cases.append(CaseResult(name, "itm", 1, 16, [median / 1e3] * 3, stats, 10**9, 1.0, 1.0, first_call_ms=99.0))
    text = markdown(run)
    assert "| itm | 1 | 16 | fp32 | ort-fused 10.0 ms | openvino-fp32 12.0 ms | **1.20x** |" in text
    assert "| itm | 1 | 16 | int8 | ort-int8-dynamic 4.0 ms | openvino-int8 5.0 ms | **1.25x** |" in text


def test_an_opt_out_variant_is_timed_but_kept_off_btdeploys_side_of_the_peer_table() -> None:
    """The Zen 3 run's peer table set the saturating variant (--no-exact-sums, which large itm's
    INT8 graph fails its floor with) against OpenVINO: 2.15x, where the default gives 1.69x."""
    from btdeploy.bench.report import markdown, peer_comparisons
    from btdeploy.bench.runner import BenchRun, BenchSettings, CaseResult
    from btdeploy.bench.stats import summarize

    run = BenchRun(BenchSettings())
    times = {"ort-int8-dynamic": 6.0, "ort-int8-dynamic-saturating": 5.0, "openvino-int8": 9.0}
    for name, ms in times.items():
        seconds = [ms / 1e3] * 3
        run.cases.append(CaseResult(name, "itm", 1, 16, seconds, summarize(seconds, 1), 10**9, 1.0, 1.0))
    ((kind, ours),) = [(item.precision, item.ours.variant) for item in peer_comparisons(run)]
    assert (kind, ours) == ("int8", "ort-int8-dynamic")
    text = markdown(run)
    assert "| itm | 1 | 16 | int8 | ort-int8-dynamic 6.0 ms | openvino-int8 9.0 ms | **1.50x** |" in text
    note = "- not on btdeploy's side (an opt-out, not its default): ort-int8-dynamic-saturating, --no-exact-sums"
    assert note in text
    assert "| ort-int8-dynamic-saturating | 5.0 |" in text  # still timed, in the latency table
    # Alone with the peer it compares with nothing, and the note says what would.
    run.cases = [case for case in run.cases if case.variant != "ort-int8-dynamic"]
    assert peer_comparisons(run) == []
    text = markdown(run)
    candidates = "ort-int8, ort-int8-dynamic, trt-int8, trt-int8-cudagraph"
    assert f"- int8: only peers ran (openvino-int8); add {candidates} to compare" in text
    # Without a peer in its class there is no comparison to keep it out of: no note, no peer section.
    run.cases = [case for case in run.cases if case.variant != "openvino-int8"]
    assert "## btdeploy against the peers" not in markdown(run) and "opt-out" not in markdown(run)


def test_a_gpu_run_reports_no_cpu_peak_and_its_gpu_memory(tmp_path: Path) -> None:
    """On the GPU the CPU's FP32 GEMM peak is no ceiling (the first GPU check printed 10744 % of
    it): % peak is left out, the GPU memory is a column, and the JSON stays valid (null, not NaN)."""
    from btdeploy.bench.report import markdown
    from btdeploy.bench.runner import BenchRun, BenchSettings, CaseResult
    from btdeploy.bench.stats import summarize

    run = BenchRun(BenchSettings(device="cuda"), machine={"gpu": {"name": "NVIDIA H200"}})
    for name, median, gpu_mb in (("torch-eager", 30.0, 1300.0), ("torch-eager-fp16", 10.0, 700.0)):
        stats = summarize([median / 1e3] * 3, 1)
        run.cases.append(CaseResult(name, "itm", 8, 40, [median / 1e3] * 3, stats, 10**12, 1.0, 1.0, gpu_mb))
    text = markdown(run)
    assert "% peak: not given on the GPU" in text and "FP32 matmul peak" not in text
    assert "| RSS MB | GPU MB | first call ms |" in text
    row = "| itm | 8 | 40 | torch-eager-fp16 | 10.0 | 10.0 | 10.0 | 100.00 | 100000.0 | - | - | - | 1 | 700 | 0 |"
    assert row in text
    write_reports(run, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert [case["pct_matmul_peak"] for case in data["cases"]] == [None, None]


def test_the_peer_comparison_pairs_the_rounds() -> None:
    # The machine's speed drifts between rounds: here btdeploy met a slow minute where the peer
    # did not, so the medians say 0.40x while btdeploy was ahead in two of three rounds.
    from btdeploy.bench.report import markdown, peer_comparisons
    from btdeploy.bench.runner import BenchRun, BenchSettings, CaseResult
    from btdeploy.bench.stats import paired_ratio, summarize

    run = BenchRun(BenchSettings())
    for name, ms in {"ort-int8-dynamic": [10.0, 30.0, 30.0], "openvino-int8": [12.0, 12.0, 33.0]}.items():
        seconds = [v / 1e3 for v in ms]
        run.cases.append(CaseResult(name, "itm", 4, 40, seconds, summarize(seconds, 4), 10**9, 1.0, 1.0))
    (item,) = peer_comparisons(run)
    assert item.ratio_of_medians == pytest.approx(0.4)
    assert item.paired is not None and item.paired.median == pytest.approx(1.1) and item.paired.ahead == 2
    assert item.paired.low == pytest.approx(0.75) and item.paired.high == pytest.approx(1.15)
    assert "| **0.40x** | 1.10x (0.75-1.15) | 2 of 3 |" in markdown(run)
    assert item.as_record()["paired"]["median"] == pytest.approx(1.1)
    # A time-bounded run can give the two different round counts: no pairing then.
    run.cases[1].samples_s.append(0.012)
    assert peer_comparisons(run)[0].paired is None and "| - | - |" in markdown(run)
    with pytest.raises(ValueError, match="one per round"):
        paired_ratio([0.01], [0.01, 0.02])


def test_speedups_are_also_given_round_by_round() -> None:
    # torch-eager met a slow minute in the third round: the medians say 4x, the rounds 2x.
    from btdeploy.bench.report import markdown, round_speedups
    from btdeploy.bench.runner import BenchRun, BenchSettings, CaseResult
    from btdeploy.bench.stats import summarize

    run = BenchRun(BenchSettings())
    for name, ms in {"torch-eager": [10.0, 20.0, 30.0], "ort-fused": [5.0, 5.0, 30.0]}.items():
        seconds = [v / 1e3 for v in ms]
        run.cases.append(CaseResult(name, "itm", 1, 16, seconds, summarize(seconds, 1), 10**9, 1.0, 1.0))
    (item,) = round_speedups(run)  # the baseline is not set against itself
    # Per round 2x, 4x and 1x: median 2, middle half 1.5 to 3, faster in two rounds (the third a tie).
    assert (item.case.variant, item.baseline.variant) == ("ort-fused", "torch-eager")
    assert (item.paired.median, item.paired.low, item.paired.high, item.paired.ahead) == pytest.approx((2, 1.5, 3, 2))
    assert "| itm | 1 | 16 | ort-fused | torch-eager | 4.00x | 2.00x (1.50-3.00) | 2 of 3 |" in markdown(run)
    assert item.as_record()["ratio_of_medians"] == pytest.approx(4.0)
    run.cases[1].samples_s.append(0.005)  # a time-bounded run: different round counts, no pairing
    assert round_speedups(run) == [] and "## Speedups round by round" not in markdown(run)


def test_chosen_baselines_set_every_variant_against_them(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A peer as the baseline: every speedup (table column and round by round) is against it, and
    # the CSV keeps the default baselines' columns, as ONNX Runtime's benchmark CSV has them.
    from btdeploy.bench import machine

    monkeypatch.setattr(machine, "matmul_peak_gflops", lambda threads: {"torch": 100.0})
    settings = BenchSettings(batch_sizes=(1,), text_lengths=(4,), warmup=0, iters=3, threads=1, baselines=("ort",))
    run = run_bench(tiny_export, ["itm"], ["torch-eager", "ort"], settings)
    by_name = {case.variant: case for case in run.cases}
    eager, ort = by_name["torch-eager"], by_name["ort"]
    assert eager.speedups["ort"] == pytest.approx(ort.stats.median_ms / eager.stats.median_ms)
    assert ort.speedups["torch-eager"] == pytest.approx(eager.stats.median_ms / ort.stats.median_ms)
    write_reports(run, tmp_path)
    table = (tmp_path / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| head | batch |"))
    assert "| x ort |" in header and "x torch-eager" not in header and "x ort-hf-optimizer" not in header
    row = next(line for line in table.splitlines() if line.startswith("| itm | 1 | 4 | torch-eager |"))
    assert row.count("|") == header.count("|") and f"| {eager.speedups['ort']:.2f} |" in row
    data = json.loads((tmp_path / "results.json").read_text())
    # Round by round: torch-eager against ort only (ort is not set against itself).
    assert [(r["variant"], r["baseline"]) for r in data["round_speedups"]] == [("torch-eager", "ort")]
    ratios = [o / e for o, e in zip(ort.samples_s, eager.samples_s, strict=True)]
    assert data["round_speedups"][0]["paired"]["median"] == pytest.approx(float(np.median(ratios)))
    assert data["settings"]["baselines"] == ["ort"]
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
    assert float(rows["ort"]["speedup_vs_torch_eager"]) == pytest.approx(ort.speedups["torch-eager"], abs=1e-3)


def test_a_baseline_the_run_does_not_time_is_refused_before_any_work(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.bench import machine
    from btdeploy.cli import main

    def measured(threads: int) -> dict[str, float]:
        raise AssertionError("the matmul peak was measured before the baselines were checked")

    monkeypatch.setattr(machine, "matmul_peak_gflops", measured)
    settings = BenchSettings(batch_sizes=(1,), text_lengths=(4,), warmup=0, iters=1, threads=1)
    with pytest.raises(BtDeployError, match="--baselines openvino-int8: not among the variants this run times \\(ort, "
                       "torch-eager\\); add it to --variants"):  # fmt: skip
        run_bench(tiny_export, ["itm"], ["ort", "torch-eager"], replace(settings, baselines=("openvino-int8",)))
    with pytest.raises(BtDeployError, match="--baselines: unknown variant\\(s\\) openvino-int4: choose from"):
        run_bench(tiny_export, ["itm"], ["ort"], replace(settings, baselines=("openvino-int4",)))
    # Without --baselines, defaults the run does not time are simply absent.
    assert settings.speedups_against == ("torch-eager", "ort-hf-optimizer")
    assert main(["bench", str(tiny_export), "--workload", "rank", "--baselines", "ort"]) == 2
    assert "--baselines sets the speedups of --workload heads; --workload rank reports its own" in (
        capsys.readouterr().err
    )


def test_fp16_and_bf16_are_compared_as_one_precision_class() -> None:
    """A user picks whichever 16-bit float is fastest where they run: TensorRT fp16 against torch
    bf16 on a GPU, ort-fp16 against torch bf16 on a CPU with native bfloat16. FP32 and INT8 peers
    stay in their own classes."""
    from btdeploy.bench.report import markdown, peer_comparisons
    from btdeploy.bench.runner import BenchRun, BenchSettings, CaseResult
    from btdeploy.bench.stats import summarize

    run = BenchRun(BenchSettings())
    times = {"ort-fp16": 9.0, "torch-eager-bf16": 6.0, "torch-compile-fp16": 8.0, "ort-fused": 7.0,
             "torch-compile": 14.0, "ort-int8-dynamic": 3.0}  # fmt: skip
    for name, ms in times.items():
        seconds = [ms / 1e3] * 3
        run.cases.append(CaseResult(name, "itm", 1, 16, seconds, summarize(seconds, 1), 10**9, 1.0, 1.0))
    found = {item.precision: (item.ours.variant, item.peer.variant) for item in peer_comparisons(run)}
    assert found == {"fp32": ("ort-fused", "torch-compile"), "16-bit float": ("ort-fp16", "torch-eager-bf16")}
    assert "| itm | 1 | 16 | 16-bit float | ort-fp16 9.0 ms | torch-eager-bf16 6.0 ms | **0.67x** |" in markdown(run)
    assert "only peers ran" not in markdown(run)


def test_a_class_only_peers_ran_in_is_named_with_what_would_compare() -> None:
    """The second bf16 run had OpenVINO in bf16 and no btdeploy 16-bit variant: the class was left
    out of the peer table without a word."""
    from btdeploy.bench.report import markdown
    from btdeploy.bench.runner import BenchRun, BenchSettings, CaseResult
    from btdeploy.bench.stats import summarize

    run = BenchRun(BenchSettings())
    for name, ms in {"ort-fused": 7.0, "openvino-fp32": 7.2, "openvino-fused-bf16": 3.5, "openvino-bf16": 3.6}.items():
        seconds = [ms / 1e3] * 3
        run.cases.append(CaseResult(name, "itm", 1, 16, seconds, summarize(seconds, 1), 10**9, 1.0, 1.0))
    text = markdown(run)
    assert "| itm | 1 | 16 | fp32 | ort-fused 7.0 ms | openvino-fp32 7.2 ms |" in text
    note = "- 16-bit float: only peers ran (openvino-fused-bf16, openvino-bf16); add ort-fp16, trt-fp16, "
    assert note in text and "16-bit float |" not in text
    run.cases = [case for case in run.cases if case.variant.endswith("bf16")]  # no table at all, the note still
    assert "## btdeploy against the peers" in markdown(run) and note in markdown(run)
    assert "| head | batch | length | precision |" not in markdown(run)


def test_pipeline_steps_sets_runs_side_by_side() -> None:
    module = benchmark_module("pipeline_steps")
    made = {"step": "optimize ort", "seconds": 44.8, "peak_rss_gb": 11.744}
    kept = {"step": "export", "seconds": 6.3, "peak_rss_gb": 0.23, "reused": True}
    first = {"wall_seconds": 90.0, "peak_rss_gb": 11.744, "passed": True, "steps": [kept, made]}
    second = {"wall_seconds": 30.0, "peak_rss_gb": 2.0, "passed": False, "steps": [made | {"seconds": 12.0}]}
    lines = module.step_table([first, second], ["a", "b"]).splitlines()
    assert lines[0] == "| step | a | b |"
    assert lines[2] == "| export | 6 s / 0.23 GB reused | - |"
    assert lines[3] == "| optimize ort | 45 s / 11.74 GB | 12 s / 11.74 GB |"
    assert lines[4] == "| **whole run** | **1.5 min / 11.74 GB** | **0.5 min / 2.00 GB FAILED** |"


def test_pipeline_runs_reads_a_real_runs_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pipeline_runs.py reads the lines `btdeploy pipeline` prints, not lines of its own making: a
    tiny run's stderr (the progress log alone, as `2> run.log` keeps it), every head counted; the
    same log cut before the last step ends leaves the last head out, as a stopped run's."""
    from btdeploy.apps.pipeline import run_pipeline
    from btdeploy.artifacts.graph_names import Flavour

    module = benchmark_module("pipeline_runs")
    run_pipeline("tiny", tmp_path / "out", heads=["itm", "mlm"], precisions=("int8-dynamic",), flavours=(Flavour.ORT,))
    log = tmp_path / "run.log"
    log.write_text(capsys.readouterr().err)
    run = module.read_run(log, "a")
    assert list(run.head_seconds) == ["itm", "mlm"] and all(s > 0 for s in run.head_seconds.values())
    assert set(run.quantize) == {("itm", "ort.int8-dynamic"), ("mlm", "ort.int8-dynamic")}
    assert all(seconds >= 0 and peak > 0 for seconds, peak in run.quantize.values())
    lines = log.read_text().splitlines()
    last_step = max(i for i, line in enumerate(lines) if "pipeline [" in line)
    cut = tmp_path / "cut.log"
    cut.write_text("\n".join(lines[:last_step]))
    assert list(module.read_run(cut, "b").head_seconds) == ["itm"]


def test_precision_table_gives_each_heads_worst_row_of_a_check_report(tiny_export: Path, tmp_path: Path) -> None:
    from btdeploy.cli import main

    report = tmp_path / "parity.json"
    assert main(["check", str(tiny_export), "--batch-sizes", "1", "--seq-lens", "5", "--report", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    printed = run_benchmark("precision_table.py", tiny_export, report).stdout
    assert printed.startswith("| head | graph | worst output | cosine |")
    assert len(printed.splitlines()) == 2 + len(HEADS)  # the table alone
    table = markdown_table(printed, "head")
    assert len(table) == len(HEADS)
    for head, graph, output, cosine, *_, size, verdict in table:
        worst = min((row for row in rows if row["head"] == head), key=lambda row: row["cosine"])
        assert (graph, output, verdict) == ("model.onnx", worst["output"], "PASS")
        assert float(cosine) == pytest.approx(worst["cosine"], abs=5e-7)
        assert float(size) == pytest.approx((tiny_export / head / "model.onnx").stat().st_size / 2**20, abs=0.05)


def test_integer_matmul_bias_times_two_int8_forms_that_compute_the_same(tiny_export: Path, tmp_path: Path) -> None:
    """The ort INT8 graph as btdeploy writes it (integer GEMMs with the bias inside) against the
    Q/DQ form ONNX Runtime would fuse itself: the script's A / B is the quotient of the medians it
    prints, and the two forms' outputs agree."""
    import shutil

    from btdeploy.optimize.optimizer import optimize_head
    from btdeploy.quantize.quantizer import quantize_head

    shutil.copytree(tiny_export / "itm", tmp_path / "itm")
    optimize_head(tmp_path / "itm", "trt")  # the ort flavour's int8 starts from the trt graph's calibration
    quantize_head(tmp_path / "itm", "int8", "ort", calib_size=4)
    done = run_benchmark("integer_matmul_bias.py", tmp_path, "--head", "itm", "--shapes", "1x8,2x5", "--repeats", 2,
                         "--runs", 2)  # fmt: skip
    rows = markdown_table(done.stdout, "batch x length")
    assert [row[0] for row in rows] == ["1 x 8", "2 x 5"], done.stdout
    for _, a, b, ratio, _, difference in rows:
        assert is_quotient_of_printed(float(ratio), float(a), float(b), 0.0005)
        assert float(difference) <= 1e-5  # the same integer products, the bias added in float either way


@pytest.mark.parametrize("script", ["profile_ort.py", "profile_openvino.py"])
def test_the_profile_scripts_attribute_kernel_time_to_layers(tiny_export: Path, script: str) -> None:
    # Both read the same command line (btdeploy/bench/profile_case.py); each must print a total
    # and per-layer rows whose shares add up to about all of it.
    import re

    graph = tiny_export / "itm" / "model.onnx"
    done = run_benchmark(script, graph, "--batch", 2, "--seq-len", 6, "--runs", 2, "--threads", 1)
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{graph} batch 2 length 6: "), lines[0]
    shares = [float(m.group(1)) for line in lines[1:] if (m := re.search(r"([\d.]+) %$", line))]
    assert len(shares) >= 3
    assert 90.0 <= sum(shares) <= 100.5  # openvino prints its 20 largest only


def test_interference_times_the_target_in_every_condition(tiny_export: Path) -> None:
    done = run_benchmark("interference.py", tiny_export, "--head", "itm", "--target", "ort", "--others", "torch-eager",
                         "--batch", 1, "--seq-len", 4, "--rounds", 2, "--pause", 0.01, "--threads", 1)  # fmt: skip
    rows = [line for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| condition")]  # fmt: skip
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert labels == ["alone", "after a pause", "after torch-eager", "after torch-eager, pause"]
    for row in rows:
        median, minimum = (float(cell) for cell in row.split(" | ")[1:3])
        assert 0 < minimum <= median


def _ratio_of_printed(ratio: float, a: float, b: float) -> bool:
    """`ratio` (printed to 3 decimals) is a / b, where a and b were printed to 0.1 ms."""
    return is_quotient_of_printed(ratio, a, b, ratio_half_digit=5e-4)


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_build_order_times_each_session_by_the_position_it_was_built_in(optimized: Path) -> None:
    done = run_benchmark("build_order.py", optimized / "itm" / "model.ort.onnx", "--sessions", 3, "--rounds", 3,
                         "--repeats", 2, "--threads", 1, timeout=300)  # fmt: skip
    assert [line for line in done.stderr.splitlines() if line.startswith("repeat ")] == [
        "repeat 1/2 ...", "repeat 2/2 ..."
    ]  # fmt: skip
    rows = markdown_table(done.stdout, "repeat")
    assert [row[0] for row in rows] == ["1", "2"]  # one fresh process per repeat
    for _, *built, ratio in rows:
        medians = [float(cell) for cell in built]
        assert len(medians) == 3 and min(medians) > 0
        assert _ratio_of_printed(float(ratio), medians[0], min(medians[1:])), (ratio, medians)


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_graph_ab_times_each_graph_alone_and_alternates(optimized: Path) -> None:
    head = optimized / "itm"
    done = run_benchmark("graph_ab.py", head / "model.onnx", head / "model.ort.onnx", "--head-dir", head, "--shapes",
                         "1x4,2x5", "--repeats", 2, "--runs", 2, "--threads", 1, timeout=300)  # fmt: skip
    order = [line.split(": ")[1] for line in done.stderr.splitlines() if line.startswith("repeat ")]
    assert order == ["A", "B", "B", "A"]  # one process each, alternating
    rows = markdown_table(done.stdout, "batch x length")
    assert [row[0] for row in rows] == ["1 x 4", "2 x 5"]
    for _, a_ms, b_ms, ratio, paired, difference in rows:
        assert float(a_ms) > 0 and float(b_ms) > 0 and float(paired) > 0
        assert _ratio_of_printed(float(ratio), float(a_ms), float(b_ms)), (ratio, a_ms, b_ms)
        assert 0 < float(difference) < 1e-4  # the fused graph differs from the export by rounding only
    _assert_memory_rows(markdown_table(done.stdout, "graph"), ["A", "B"])


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_graph_ab_paired_times_both_graphs_in_each_process_in_both_build_orders(optimized: Path) -> None:
    head = optimized / "itm"
    done = run_benchmark("graph_ab.py", head / "model.onnx", head / "model.ort.onnx", "--head-dir", head, "--shapes",
                         "1x4,2x5", "--repeats", 2, "--runs", 3, "--threads", 1, "--paired", timeout=300)  # fmt: skip
    orders = [line.split("(built ")[1][:2] for line in done.stderr.splitlines() if line.startswith("process ")]
    assert orders == ["AB", "BA"]
    rows = markdown_table(done.stdout, "batch x length")
    assert [row[0] for row in rows] == ["1 x 4", "2 x 5"]
    for _, ratio, won, difference in rows:
        assert 0.2 < float(ratio) < 5
        wins, of, rounds = won.split()
        assert of == "of" and int(rounds) == 6 and 0 <= int(wins) <= 6  # 3 rounds in each of 2 processes
        assert 0 < float(difference) < 1e-4


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_graph_ab_b_config_sets_the_option_on_bs_session_only(optimized: Path) -> None:
    import argparse

    from btdeploy.backends import onnxruntime as onnxruntime_backend

    graph_ab = benchmark_module("graph_ab")
    head, key = optimized / "itm", "session.set_denormal_as_zero"
    args = argparse.Namespace(
        a=head / "model.ort.onnx", b=head / "model.ort.onnx", head_dir=head, threads=1, b_config=[f"{key}=1"]
    )
    (a, _), (b, _) = graph_ab._backend("A", args), graph_ab._backend("B", args)
    b_options, a_options = b.session.get_session_options(), a.session.get_session_options()
    assert b_options.get_session_config_entry(key) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        a_options.get_session_config_entry(key)
    for options in (a_options, b_options):  # btdeploy's own entries stay on both
        assert options.get_session_config_entry(onnxruntime_backend.SPIN_WITHIN_RUN) == "1"
    assert onnxruntime_backend.session_options.__qualname__ == "session_options"  # the swap was undone
    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "graph_ab.py"), str(args.a), str(args.b), "--head-dir", str(head),
         "--b-config", key],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "--b-config takes KEY=VALUE" in refused.stderr


def _assert_memory_rows(rows: list[list[str]], names: list[str]) -> None:
    """Each child's resident memory as its kernel reported it: a session of the tiny model, so more
    than Python's own few MB and well under 2 GB, with no more on huge pages than resident."""
    assert [row[0] for row in rows] == names
    for _, resident, huge in rows:
        assert 50 < float(resident) < 2000, resident
        assert 0 <= float(huge) <= float(resident)


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_lone_sessions_sets_each_goal_pair_side_by_side(optimized: Path) -> None:
    done = run_benchmark("lone_sessions.py", optimized, "--head", "itm", "--variants", "ort-fused,openvino-fp32",
                         "--shapes", "1x4", "--repeats", 1, "--runs", 2, "--threads", 1, "--hugepages", "both",
                         timeout=300)  # fmt: skip
    assert len([line for line in done.stderr.splitlines() if line.startswith("repeat ")]) == 4  # one process each
    (row,) = markdown_table(done.stdout, "batch x length")
    ours, peer, ours_small, peer_small = (float(cell) for cell in row[1:])
    assert min(ours, peer, ours_small, peer_small) > 0
    huge, small, shipped = (table for (table,) in markdown_tables(done.stdout, "goal ratio"))
    assert huge[0] == "openvino-fp32 / ort-fused"
    assert small[0] == "openvino-fp32 (4 KB pages) / ort-fused (4 KB pages)"
    assert shipped[0] == "openvino-fp32 (4 KB pages) / ort-fused"  # each engine as its users start it
    pairs = ((huge, peer, ours), (small, peer_small, ours_small), (shipped, peer_small, ours))
    for (_, cell), slower, faster in pairs:
        assert _ratio_of_printed(float(cell.split()[0]), slower, faster), (cell, slower, faster)
    names = ["ort-fused", "openvino-fp32", "ort-fused (4 KB pages)", "openvino-fp32 (4 KB pages)"]
    memory = markdown_table(done.stdout, "variant")
    _assert_memory_rows(memory, names)
    if thp_mode() == "madvise":  # only malloc's asking puts memory on huge pages there
        assert all(float(huge_mb) < 16 for _, _, huge_mb in memory[2:])  # started without the tunable


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_lone_sessions_runs_every_variant_under_each_interpreter(optimized: Path, tmp_path: Path) -> None:
    # another interpreter: this one behind a wrapper that leaves a line per child it starts
    calls = tmp_path / "calls.txt"
    wrapper = tmp_path / "python-other"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    done = run_benchmark("lone_sessions.py", optimized, "--head", "itm", "--variants", "ort-fused,openvino-fp32",
                         "--shapes", "1x4", "--repeats", 1, "--runs", 2, "--threads", 1, "--python", f"other={wrapper}",
                         timeout=300)  # fmt: skip
    started = calls.read_text().splitlines()
    # the version probe, then one child per variant under the wrapper, none of this label's children elsewhere
    assert len(started) == 3 and started[0].startswith("-c ")
    assert sorted(line.split("--child ")[1] for line in started[1:]) == ["openvino-fp32 @other", "ort-fused @other"]
    (row,) = markdown_table(done.stdout, "batch x length")
    times = dict(zip(["ort-fused @this", "openvino-fp32 @this", "ort-fused @other", "openvino-fp32 @other"],
                     (float(cell) for cell in row[1:]), strict=True))  # fmt: skip
    ratios = {cells[0]: cells[1] for cells in markdown_table(done.stdout, "under each interpreter / under @this")}
    assert sorted(ratios) == ["openvino-fp32 @other", "ort-fused @other"]
    for name, cell in ratios.items():
        variant = name.split(" @")[0]
        assert _ratio_of_printed(float(cell.split()[0]), times[name], times[f"{variant} @this"]), (name, cell)
    goals = [table[0] for (table,) in markdown_tables(done.stdout, "goal ratio")]
    assert goals == ["openvino-fp32 @this / ort-fused @this", "openvino-fp32 @other / ort-fused @other"]


def test_lone_sessions_refuses_an_interpreter_it_cannot_find(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "lone_sessions.py"), str(tmp_path), "--python", f"new={tmp_path / 'none'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "lone_sessions.py: error: --python takes LABEL=PATH to an interpreter" in done.stderr


def test_skip_layernorm_kernel_times_each_form_of_the_kernel() -> None:
    import onnxruntime

    args = ("--rows", 8, "--width", 32, "--threads", 1, "--runs", 5)
    done = run_benchmark("skip_layernorm_kernel.py", *args, timeout=120)
    assert done.stdout.startswith(f"onnxruntime {onnxruntime.__version__}, 8 x 32, 1 threads")
    rows = markdown_table(done.stdout, "kernel")
    fused = [("SkipLayerNormalization", bias, out) for bias in ("False", "True") for out in ("False", "True")]
    assert [tuple(row[:3]) for row in rows] == fused + [("Add + LayerNormalization", "False", "True")]
    assert all(float(us) > 0 for *_, us in rows)
    difference = re.search(r"against Add \+ LayerNormalization: (\S+)$", done.stdout, re.MULTILINE)
    assert difference and float(difference.group(1)) < 1e-5, done.stdout  # one LayerNorm, two kernels


def test_gelu_kernels_benchmark_times_every_kernel_and_tells_exact_from_approximate() -> None:
    done = run_benchmark("gelu_kernels.py", "--shape", "2x32x256", "--threads", 1, "--rounds", 4, timeout=120)
    rows = {row[0]: row[1:] for row in markdown_table(done.stdout, "kernel")}
    assert len(rows) == 8 and all(float(ms) > 0 and float(ns) > 0 for ms, ns, _ in rows.values())
    errors = {name: float(error) for name, (_, _, error) in rows.items() if error}
    exact = [name for name in errors if "approximation" not in name]
    approximate = [name for name in errors if "approximation" in name]
    assert len(exact) == 2 and len(approximate) == 2
    assert all(errors[name] < 1e-5 for name in exact), errors  # float32 rounding of the erf GELU
    assert all(errors[name] > 1e-4 for name in approximate), errors  # tanh's 4.7e-4 at |x| near 2


def test_attention_core_benchmark_times_every_form_in_one_run_against_onnx_attention() -> None:
    import re

    done = run_benchmark("attention_core.py", "--batch", 2, "--tokens", 20, "--runs", 2, "--threads", 1, timeout=120)
    assert done.stdout.splitlines()[0].startswith("one attention block, 2 x 20 x 768, 12 heads")
    rows = {}
    for line in done.stdout.splitlines()[1:]:
        name, ms, ratio, rest = re.fullmatch(r"  (.+?)\s+([\d.]+) ms\s+([\d.]+)x(.*)", line).groups()  # type: ignore[union-attr]
        cosines = [float(c) for c in re.findall(r"cosine ([\d.]+)", rest)]
        worst = [float(a) / float(r) for a, r in re.findall(r"max_abs (\S+) of range ([\d.]+)", rest)]
        rows[name] = (float(ms), float(ratio), cosines, worst)
    assert list(rows) == ["Attention FP32", "MultiHeadAttention FP32", "Attention FP16 (CPU kernel)", "INT8 core",
                          "INT8 Q.K^T, FP32 P.V", "OpenVINO Attention FP32"]  # fmt: skip
    assert rows["Attention FP32"][1] == 1.0 and all(ms > 0 for ms, *_ in rows.values())
    reference_ms = rows["Attention FP32"][0]
    for name, (ms, ratio, _, _) in rows.items():  # each ratio is its median over FP32 Attention's (ms to 0.001)
        slack = ms / reference_ms * (5e-4 / ms + 5e-4 / reference_ms) + 5e-3
        assert abs(ratio - ms / reference_ms) <= slack, (name, ratio, ms, reference_ms)
    # the same block in OpenVINO: float rounding only; the INT8 forms: a real, bounded error, both queries
    assert len(rows["OpenVINO Attention FP32"][2]) == 2 and max(rows["OpenVINO Attention FP32"][3]) < 1e-5
    for name in ("INT8 core", "INT8 Q.K^T, FP32 P.V"):
        cosines, worst = rows[name][2], rows[name][3]
        assert len(cosines) == 2 and all(0.99 < c < 1 for c in cosines) and all(1e-4 < w < 0.2 for w in worst), name


@pytest.mark.parametrize("gelu", [False, True])
def test_integer_gemm_forms_compute_the_same_dense_layer(gelu: bool) -> None:
    """The ort form (uint8 input, integer GEMM with bias) and the Q/DQ form OpenVINO reads (int8 input)
    both equal numpy's quantize -> int8 GEMM -> per-column step -> bias [-> exact GELU], the ort form
    with the sums this CPU's uint8 x int8 kernel makes (saturating int16 pairs without VNNI)."""
    import math

    import onnxruntime as ort
    from onnx import numpy_helper

    bench = benchmark_module("integer_gemm")
    k, n, seed = 64, 48, 3
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32) * 2
    ort_form, qdq_form = bench.ort_model(k, n, gelu, seed), bench.qdq_model(k, n, gelu, seed)
    weights = {i.name: numpy_helper.to_array(i) for i in qdq_form.graph.initializer}
    steps = np.clip(np.round(x / weights["x_step"]), -128, 127)  # int8 and uint8 - 128 hold the same range
    uint8 = (steps + bench.ORT_ZERO).astype(np.uint8)
    count = SaturationCount()
    sums = {
        "exact": steps @ weights["w"].astype(np.float64),
        "this cpu": u8s8_gemm(uint8, weights["w"], sums_saturate_here(), count, a_zero=bench.ORT_ZERO),
    }
    assert np.array_equal(u8s8_gemm(uint8, weights["w"], False, a_zero=bench.ORT_ZERO), sums["exact"])
    if sums_saturate_here():
        assert count.saturated > 0  # the input reaches the saturation the ort form must then show
    wants = {}
    for kind, total in sums.items():
        want = total * weights["x_step"] * weights["w_step"] + weights["bias"]
        wants[kind] = want * 0.5 * (1 + np.vectorize(math.erf)(want / math.sqrt(2))) if gelu else want
    for form, kind in ((ort_form, "this cpu"), (qdq_form, "exact")):
        session = ort.InferenceSession(form.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x})[0]
        assert got.shape == (5, n)
        want = wants[kind]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=kind)


@pytest.mark.parametrize("gmacs", [0.34, 0.0042, 7.25, 99.96, 1234.4])
def test_integer_gemm_rate_keeps_three_significant_digits(gmacs: float) -> None:
    # a few rows on a loaded machine run below 1 GMAC/s; the table once printed them as 0
    text = benchmark_module("integer_gemm")._rate_text(gmacs)
    assert abs(float(text) - gmacs) <= 0.005 * gmacs, text


def test_integer_gemm_benchmark_times_every_layer_on_both_engines() -> None:
    done = run_benchmark("integer_gemm.py", "--rows", "4,8", "--threads", 1, "--rounds", 2, "--calls", 1, timeout=120)
    rows = markdown_table(done.stdout, "rows")
    layers = len(benchmark_module("integer_gemm").LAYERS)
    # per row count: every layer on both engines; where it has no GELU also the GEMM alone and OpenVINO's GEMM kernel
    assert len(rows) == 2 * (4 * layers - 2), done.stdout
    assert {row[0] for row in rows} == {"4", "8"}
    for _, layer, engine, ms, rate, ratio in rows:
        assert float(ms) > 0 and float(rate) > 0
        assert (ratio != "") == engine.startswith("openvino"), (layer, engine, ratio)


# Nodes per GELU in each form the ceiling script can meet (the Erf chain: Div, Erf, Add, Mul, Mul).
_GELU_NODES = {"Gelu": 1, "BiasGelu": 1, "QuickGelu": 1, "Erf chain": 5, "QuickGELU chain": 3}


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
@pytest.mark.parametrize("flavour", ["ort", "trt", "trt-compat"])
def test_gelu_ceiling_takes_out_every_gelu_and_nothing_else(optimized: Path, flavour: str, tmp_path: Path) -> None:
    import onnx

    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
    from btdeploy.model.heads import get_head

    head = optimized / "itm"
    source, out = head / f"model.{flavour}.onnx", tmp_path / "no_gelu.onnx"
    done = run_benchmark("gelu_ceiling.py", source, out, timeout=120)
    counts = done.stdout.split("(")[1].rstrip(")\n").split(", ")
    removed = {kind: int(count) for count, kind in (c.split(" ", 1) for c in counts)}
    config = read_manifest(head).config
    # one FFN per layer: text, vision, and both sides of each cross-modal layer
    text, vision = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    layers = text + vision + 2 * config.num_hidden_layers
    assert sum(removed.values()) == layers, removed

    def working_nodes(path: Path) -> list[str]:
        return [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type != "Constant"]

    before, after = working_nodes(source), working_nodes(out)
    assert len(before) - len(after) == sum(_GELU_NODES[kind] * n for kind, n in removed.items())
    assert not {"Gelu", "BiasGelu", "QuickGelu", "Erf", "Sigmoid"} & set(after)
    names = list(get_head(read_manifest(head).head).output_names)
    feeds = sample_inputs(config, batch=2, text_length=5)
    want = OnnxRuntimeBackend(source, names, ["cpu"], 1).run(feeds)
    got = OnnxRuntimeBackend(out, names, ["cpu"], 1).run(feeds)
    assert all(got[n].shape == want[n].shape for n in names)
    assert max(float(np.abs(got[n] - want[n]).max()) for n in names) > 1e-3  # the activations are really gone


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_unfused_skip_layernorm_computes_the_same_in_standard_kernels(optimized: Path, tmp_path: Path) -> None:
    import onnx

    from btdeploy.backends.onnxruntime import OnnxRuntimeBackend
    from btdeploy.model.heads import get_head

    head = optimized / "itm"
    source, out = head / "model.ort.onnx", tmp_path / "unfused.onnx"
    done = run_benchmark("unfuse_skip_layernorm.py", source, out, timeout=120)

    def ops(path: Path) -> list[str]:
        return [n.op_type for n in onnx.load(str(path)).graph.node]

    before, after = ops(source), ops(out)
    fused = before.count("SkipLayerNormalization")
    config = read_manifest(head).config
    # every residual pair of every layer and each bridge is one SkipLayerNormalization in the ort graph
    assert fused >= 2 * (config.text_config.num_hidden_layers + config.num_hidden_layers), before
    assert f"{fused} SkipLayerNormalization written back" in done.stdout
    assert "SkipLayerNormalization" not in after
    assert after.count("LayerNormalization") == before.count("LayerNormalization") + fused
    assert after.count("Add") - before.count("Add") >= fused  # one per pair, two where a bias was folded in
    names = list(get_head(read_manifest(head).head).output_names)
    feeds = sample_inputs(config, batch=2, text_length=5)
    want = OnnxRuntimeBackend(source, names, ["cpu"], 1).run(feeds)
    got = OnnxRuntimeBackend(out, names, ["cpu"], 1).run(feeds)
    for name in names:  # the same arithmetic, float32 rounding apart
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_unfusing_a_graph_without_skip_layernorm_says_what_to_give(optimized: Path, tmp_path: Path) -> None:
    source = optimized / "itm" / "model.trt.onnx"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "unfuse_skip_layernorm.py"), str(source), str(tmp_path / "out.onnx")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"unfuse_skip_layernorm.py: error: {source} holds no SkipLayerNormalization" in done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_every_benchmark_script_keeps_the_error_contract(tmp_path: Path) -> None:
    """Scripts in benchmarks/ are commands too: a bad path is one line and exit 2, never a traceback."""
    import subprocess
    import sys

    from conftest import BENCHMARKS

    scripts = sorted(BENCHMARKS.glob("*.py"))
    entries = [s.name for s in scripts if "script_entry(" in s.read_text() or 'main(["bench"' in s.read_text()]
    assert entries == [s.name for s in scripts] and len(scripts) > 10
    for script in ("lone_sessions.py", "pipeline_steps.py", "speedup_breakdown.py"):
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), str(tmp_path / "nowhere")], capture_output=True, text=True
        )
        errors = [line for line in done.stderr.splitlines() if line.startswith(f"{script}: error: ")]
        assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, (script, done.stderr)


def test_the_tf32_script_without_a_cuda_provider_says_why_before_any_session(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tf32 = benchmark_module("ort_cuda_tf32")
    reason = "ONNX Runtime could not start CUDAExecutionProvider here (libcublasLt.so.13: cannot open shared object)"
    monkeypatch.setattr(tf32, "start_problem", lambda provider: reason)
    monkeypatch.setattr(tf32, "_session", lambda *args: pytest.fail("a session was opened"))
    monkeypatch.setattr(sys, "argv", ["ort_cuda_tf32.py", str(tiny_export / "itm")])
    with pytest.raises(BtDeployError) as raised:
        tf32.main()
    assert str(raised.value) == reason


def test_a_gpu_bench_without_a_gpu_is_refused_before_any_work(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from btdeploy.backends.tensorrt import environment
    from btdeploy.bench import machine
    from btdeploy.cli import main

    def measured(threads: int) -> dict[str, float]:
        raise AssertionError("the matmul peak was measured before the device was checked")

    monkeypatch.setattr(environment, "gpu", lambda: None)
    monkeypatch.setattr(machine, "matmul_peak_gflops", measured)
    settings = BenchSettings(batch_sizes=(1,), text_lengths=(4,), warmup=1, iters=1, threads=1, device="cuda")
    with pytest.raises(BtDeployError, match="--device cuda: torch sees no NVIDIA GPU here; bench on the CPU"):
        run_bench(tiny_export, ["itm"], ["torch-eager-fp16", "ort"], settings)
    assert main(["bench", str(tiny_export), "--workload", "rank", "--device", "cuda"]) == 2
    assert (
        "--workload rank runs ONNX Runtime or OpenVINO on the CPU: leave out --device cuda" in capsys.readouterr().err
    )


def test_the_bench_names_the_gpu_the_backends_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """One lookup of the GPU (the backends'); the bench adds its memory."""
    from types import SimpleNamespace

    import torch

    from btdeploy.bench import machine

    monkeypatch.setattr(machine, "gpu", lambda: None)
    assert machine.gpu_description() is None
    monkeypatch.setattr(machine, "gpu", lambda: ("NVIDIA H200", (9, 0)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=143771 * 2**20))
    assert machine.gpu_description() == {"name": "NVIDIA H200", "memory_gb": 140.4, "sm": "90"}


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_u8s8_saturation_emulates_the_integer_sums_of_this_cpu(optimized: Path, tmp_path: Path) -> None:
    # ONNX Runtime's u8 x s8 GEMMs sum exactly with VNNI or AMX and in saturating int16 pairs
    # without (AVX2). The script emulates both; ONNX Runtime here must match the emulation of this
    # CPU's class, so the other emulation is what the other class of CPU runs.
    import shutil

    from btdeploy.cpu import exact_integer_sums
    from btdeploy.quantize.quantizer import quantize_head

    head = tmp_path / "itm"
    shutil.copytree(optimized / "itm", head)
    quantize_head(head, "int8", "ort", calib_size=4, announce_generated=False)
    quantize_head(head, "int8-dynamic", "ort", announce_generated=False)
    report = tmp_path / "saturation.json"
    run_benchmark("u8s8_saturation.py", head, "--shapes", "1x5,3x12", "--json", report, timeout=300)
    data = json.loads(report.read_text())
    exact_here = bool(exact_integer_sums())
    assert data["exact_sums_here"] == exact_here
    assert [(r["graph"], r["integer_sums"]) for r in data["rows"]] == [
        (graph, kind)
        for graph in ("ort.int8", "ort.int8-dynamic")
        for kind in ("onnxruntime here", "onnxruntime here, exact_sums", "exact (VNNI, AMX)", "saturating (AVX2)")
    ]
    # Both kinds of CPU get graphs within the INT8 floors.
    assert all(r["passed"] for r in data["rows"]), [r["missed"] for r in data["rows"]]
    static, dynamic = data["agreement"]
    assert static["saturated_pairs"] > 0 and dynamic["saturated_pairs"] > 0  # saturation really happens
    assert static["exact_vs_saturating"] > 1e-4
    # The static graph's activations are quantized the same way by both engines, so ONNX Runtime's
    # answers sit on the emulation of this CPU's kernel (the dynamic graph's run-time ranges round
    # differently in ONNX Runtime's fused operator, so its answers sit between the two).
    here, other = ("exact", "saturating") if exact_here else ("saturating", "exact")
    assert static[f"onnxruntime_vs_{here}"] < 0.25 * static[f"onnxruntime_vs_{other}"], static
    # With exact_sums ONNX Runtime sums as a VNNI CPU does, on either class.
    assert static["onnxruntime_exact_sums_vs_exact"] < 0.25 * static["onnxruntime_exact_sums_vs_saturating"], static
    # Only the ort INT8 graphs hold integer GEMMs; anything else is refused in one line.
    import subprocess
    import sys

    for bad, said in (("--graphs=trt.int8", "only ort.int8 and ort.int8-dynamic"), ("--shapes=1x999", "1..")):
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / "u8s8_saturation.py"), str(head), bad], capture_output=True, text=True
        )
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("optimized", ["tiny"], indirect=True)
def test_activation_scales_differ_where_the_trt_flavour_moved_the_value_bias(optimized: Path, tmp_path: Path) -> None:
    # The trt flavour adds each block's value bias after the output projection (the attention
    # pass); trt-compat keeps it in the attention output. Calibrated on the same rows, the two INT8
    # graphs must quantize every MatMul input alike except the output projections' inputs.
    import shutil
    import subprocess
    import sys

    import onnx

    from btdeploy.quantize.quantizer import quantize_head

    head = tmp_path / "itm"
    shutil.copytree(optimized / "itm", head)
    for flavour in ("trt", "trt-compat", "ort"):  # ort is made from trt's calibration
        quantize_head(head, "int8", flavour, calib_size=4, announce_generated=False)
    fused = onnx.load(str(head / "model.trt.onnx")).graph
    attention_outputs = {o for n in fused.node if n.op_type == "Attention" for o in n.output}
    output_projections = {n.input[1] for n in fused.node if n.op_type == "MatMul" and n.input[0] in attention_outputs}

    def compared(other: str) -> dict[str, Any]:
        report = tmp_path / f"{other}.json"
        run_benchmark("activation_scales.py", head / "model.trt.int8.onnx", head / f"model.{other}.int8.onnx",
                      "--json", report, timeout=120)  # fmt: skip
        return json.loads(report.read_text())

    compat = compared("trt-compat")
    assert compat["matched"] == compat["int8_matmuls"][0] == compat["int8_matmuls"][1] > len(output_projections) > 0
    assert {r["weight"] for r in compat["rows"] if r["differs"]} == output_projections
    assert compat["differ_by_maker"] == {"Attention -> Reshape": len(output_projections)}
    assert compat["largest_agreeing_deviation"] < 1e-3
    shared = compared("ort")  # the same calibration, in ONNX Runtime's integer GEMMs
    assert shared["matched"] > 0 and shared["differ"] == 0
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "activation_scales.py"), str(head / "model.trt.onnx"),
         str(head / "model.trt.int8.onnx")], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "holds no INT8 MatMul" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fork_stress_forks_right_after_runs_and_counts_the_children_that_end(tiny_export: Path, backend: str) -> None:
    """Each child answers twice and ends; the count line is what the forked-workers results quote."""
    done = run_benchmark("fork_stress.py", tiny_export, "--backend", backend, "--forks", 8, timeout=600)
    last = done.stdout.strip().splitlines()[-1]
    # Every fork waited for the pool's workers to sleep: none running at the fork itself.
    assert last == (
        f"{backend} itm, children running the inherited model, forked 0 s after a run (wait for sleeping threads: "
        "at most 0.5 s): 0 of 8 hung; another thread running at the fork in 0 of 8"
    )
    assert "8 of 8 forks, 0 hung" in done.stderr


def test_command_ab_times_two_checkouts_in_turns_and_shows_what_differs(tiny_export: Path, tmp_path: Path) -> None:
    """benchmarks/command_ab.py: every command run by both checkouts in fresh processes, medians of
    wall time and peak memory, whether both printed the same, and the lines only one side printed."""
    import shutil

    repository = Path(__file__).resolve().parents[2]
    before = tmp_path / "before"
    shutil.copytree(repository / "btdeploy", before / "btdeploy", ignore=shutil.ignore_patterns("__pycache__"))
    version = before / "btdeploy" / "version.py"
    version.write_text(version.read_text().replace('__version__ = "', '__version__ = "0.0.1-old-'))
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(picture)
    score = f"run {tiny_export} --head itm --image {picture} --text 'a cat' --json"
    done = run_benchmark(
        "command_ab.py", "--before", before, "--after", repository, "--rounds", "2",
        "--command", score, "--command=--version", timeout=600,
    )  # fmt: skip
    rows = {row[0].strip("`"): row[1:] for row in markdown_table(done.stdout, "command")}
    assert list(rows) == [score, "--version"]
    for cells in rows.values():
        before_s, after_s, ratio = float(cells[0]), float(cells[1]), float(cells[2].rstrip("x"))
        assert before_s > 0 and after_s > 0 and is_quotient_of_printed(ratio, before_s, after_s, 0.005, 0.005)
        assert 20 < float(cells[3]) < 4000 and 20 < float(cells[4]) < 4000  # MB of one child, not the parent
    assert rows[score][5] == "yes" and rows["--version"][5] == "no"
    assert "before: btdeploy 0.0.1-old-" in done.stdout and "after: btdeploy " in done.stdout
    assert done.stderr.count("round ") == 2 * 2 * 2  # rounds x commands x sides
    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "command_ab.py"), "--before", str(tmp_path), "--command=--version"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"--before {tmp_path} holds no btdeploy package" in refused.stderr
