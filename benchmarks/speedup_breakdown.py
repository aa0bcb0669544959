"""Where a speedup over torch-eager comes from: both profilers, one shape, time per kind of work.

    python benchmarks/speedup_breakdown.py EXPORT_DIR/itm --batch 4 --seq-len 40 \
        --variants ort-fused,ort-int8-dynamic [--rounds 5] [--out DIR]

torch-eager and each ONNX Runtime variant run interleaved (A B C, B C A, ...) under their
profilers. Kernel time is summed into three kinds, so the end-to-end ratio can be read as the
sum of its parts:

- weight GEMMs: the Linear layers (torch `addmm`/`mm`; ONNX Runtime's MatMul, Gemm and the
  int8 MatMulInteger family, with the dynamic quantization of their inputs);
- attention core: scores, softmax and the weighted sum (torch SDPA, `bmm`, `softmax`; the
  fused Attention operator);
- everything else (LayerNorm, GELU, adds, copies, the patch convolution).

Writes breakdown.md and breakdown.json to --out (default: the head folder's `bench/`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.onnxruntime import session_options
from btdeploy.bench.ort_profile import kernel_ms_per_op
from btdeploy.bench.runner import interleaved_order
from btdeploy.bench.variants import VARIANTS, BenchEnv
from btdeploy.cli import script_entry
from btdeploy.cpu import cpu_description
from btdeploy.hugepages import reexec_with_hugepages
from btdeploy.model.inputs import sample_inputs

KINDS = ("weight GEMMs", "attention core", "everything else")
ORT_GEMM_OPS = {
    "MatMul",
    "Gemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
    "FusedMatMul",
}
ORT_ATTENTION_OPS = {"Attention", "MultiHeadAttention"}
TORCH_GEMM_OPS = {"aten::addmm", "aten::mm", "aten::linear"}
TORCH_ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax", "aten::bmm")


def ort_graph(variant: str) -> str:
    graph = VARIANTS[variant].graph if variant in VARIANTS else None
    if graph is None:
        runnable = ", ".join(name for name, v in VARIANTS.items() if v.graph)
        raise SystemExit(
            f"--variants: {variant} is not an ONNX Runtime graph of the head folder; choose from {runnable}"
        )
    return graph


def ort_kind(op: str) -> str:
    if op in ORT_GEMM_OPS:
        return KINDS[0]
    return KINDS[1] if op in ORT_ATTENTION_OPS else KINDS[2]


def torch_kind(op: str) -> str:
    if op in TORCH_GEMM_OPS:
        return KINDS[0]
    return KINDS[1] if op.startswith(TORCH_ATTENTION_PREFIXES) else KINDS[2]


class OrtProfiled:
    def __init__(self, path: Path, threads: int, folder: str) -> None:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / path.stem)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> None:
        self.session.run(None, {name: feeds[name] for name in self.names})

    def kinds_ms(self, runs: int) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for op, ms in kernel_ms_per_op(self.session, runs).items():
            totals[ort_kind(op)] += ms
        return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("head_dir", type=Path, help="an exported head folder (with its optimized/quantized graphs)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=40)
    parser.add_argument("--variants", default="ort-fused,ort-int8-dynamic")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    manifest = read_manifest(args.head_dir)
    feeds = sample_inputs(manifest.config, args.batch, args.seq_len, seed=1, pad=False)
    torch.set_num_threads(args.threads)
    reference = VARIANTS["torch-eager"].build(manifest, BenchEnv(threads=args.threads, device="cpu"))
    names = ["torch-eager", *args.variants.split(",")]
    wall: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as folder:
        sessions = {n: OrtProfiled(args.head_dir / ort_graph(n), args.threads, folder) for n in names[1:]}
        runners: dict[str, Any] = {"torch-eager": lambda: reference.run(feeds)}
        runners.update({n: (lambda s=s: s.run(feeds)) for n, s in sessions.items()})
        for name in names:
            runners[name]()  # warm-up, outside the profiles' counted runs
        torch_kinds: dict[str, float] = defaultdict(float)
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}", flush=True)
            for name in interleaved_order(names, index):
                if name == "torch-eager":
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                        started = time.perf_counter()
                        runners[name]()
                        wall[name].append(time.perf_counter() - started)
                    for event in profile.key_averages():
                        torch_kinds[torch_kind(event.key)] += event.self_cpu_time_total / 1e3 / args.rounds
                else:
                    started = time.perf_counter()
                    runners[name]()
                    wall[name].append(time.perf_counter() - started)
        kinds = {"torch-eager": dict(torch_kinds)}
        kinds.update({n: s.kinds_ms(args.rounds) for n, s in sessions.items()})

    medians = {n: 1e3 * float(np.median(v)) for n, v in wall.items()}
    cpu = cpu_description()
    lines = [
        f"# Speedup by kind of work: {manifest.head}, batch {args.batch}, length {args.seq_len}",
        "",
        f"- CPU: {cpu['model']} ({cpu['logical_cores']} logical cores; flags: {', '.join(cpu['flags'])}), "
        f"{args.threads} thread(s)",
        f"- {args.rounds} interleaved rounds under the profilers (which add a little time to every variant)",
        "- kernel ms per run, and the ratio torch-eager / variant for each kind",
        "",
        "| kind | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for kind in KINDS:
        base = kinds["torch-eager"].get(kind, 0.0)
        cells = [f"{base:.1f}"]
        for name in names[1:]:
            value = kinds[name].get(kind, 0.0)
            cells.append(f"{value:.1f} ({base / value:.2f}x)" if value else "0")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    cells = [f"{medians['torch-eager']:.1f}"]
    cells += [f"{medians[n]:.1f} ({medians['torch-eager'] / medians[n]:.2f}x)" for n in names[1:]]
    lines.append("| wall-clock median | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or args.head_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.md").write_text(text)
    record = {"batch": args.batch, "seq_len": args.seq_len, "rounds": args.rounds, "kinds_ms": kinds, "wall_s": wall}
    (out / "breakdown.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
