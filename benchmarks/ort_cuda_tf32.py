"""What TF32 costs an FP32 graph on ONNX Runtime's CUDA provider, and what it saves.

    python benchmarks/ort_cuda_tf32.py DIR/itm [--flavour ort] [--shapes 1x40,8x40] [--iters 20]

The CUDA provider multiplies FP32 in TF32 by default on Ampere and newer GPUs; btdeploy turns that
off (backends/onnxruntime.py, PROVIDER_OPTIONS) so that an FP32 graph meets FP32's bound. This runs
one FP32 graph on the CPU provider and on the CUDA provider with TF32 off and on, on the same
generated inputs, and prints, per shape, each CUDA session's largest difference from the CPU
session in every output and its median latency (inputs from the host, outputs back to it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.graph_names import parse_flavour
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.backends.onnxruntime import PROVIDER_OPTIONS, session_options
from btdeploy.backends.provider_probe import start_problem
from btdeploy.bench.machine import gpu_description
from btdeploy.cli import script_entry
from btdeploy.cpu import describe_cpu
from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.model.inputs import sample_inputs
from btdeploy.runtime.validation import prepare_inputs


def _session(path: Path, provider: Any) -> Any:
    import onnxruntime as ort

    name = provider if isinstance(provider, str) else provider[0]
    providers = [provider] if name == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), session_options(), providers=providers)
    if session.get_providers()[0] != name:
        raise BtDeployError(f"ONNX Runtime could not start {name} here (it runs on {session.get_providers()})")
    return session


def _median_ms(session: Any, outputs: list[str], feeds: dict[str, np.ndarray], iters: int) -> float:
    session.run(outputs, feeds)  # the first run of a shape picks its kernels
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(outputs, feeds)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="one head folder of an export")
    parser.add_argument("--flavour", default="ort", help="the FP32 graph of this flavour (ort, trt; none: the export)")
    parser.add_argument("--shapes", default="1x40,8x40", help="batch x text length, comma list")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    manifest = read_manifest(args.folder)
    if problem := start_problem("CUDAExecutionProvider"):
        raise BtDeployError(problem)
    head = get_head(manifest.head)
    path = manifest.graph_path(None if args.flavour == "none" else parse_flavour(args.flavour))
    print(f"CPU: {describe_cpu()}; GPU: {gpu_description()}")
    print(f"{path.name}, {head.name} head; largest |CUDA - CPU| per output, median of {args.iters} runs")
    btdeploys = PROVIDER_OPTIONS["CUDAExecutionProvider"]  # what every btdeploy session opens it with
    sessions = {
        "cpu": _session(path, "CPUExecutionProvider"),
        "cuda, tf32 off": _session(path, ("CUDAExecutionProvider", btdeploys)),
        "cuda, tf32 on": _session(path, ("CUDAExecutionProvider", {**btdeploys, "use_tf32": "1"})),
    }
    for shape in args.shapes.split(","):
        batch, length = (int(n) for n in shape.split("x"))
        feeds = prepare_inputs(head, manifest.config, sample_inputs(manifest.config, batch, length, seed=batch)).feeds
        names = [i.name for i in sessions["cpu"].get_inputs()]
        feeds = {name: feeds[name] for name in names}
        expected = dict(zip(head.output_names, sessions["cpu"].run(head.output_names, feeds), strict=True))
        for label in ("cuda, tf32 off", "cuda, tf32 on"):
            session = sessions[label]
            got = dict(zip(head.output_names, session.run(head.output_names, feeds), strict=True))
            errors = ", ".join(f"{n} {float(np.max(np.abs(got[n] - expected[n]))):.2e}" for n in head.output_names)
            ms = _median_ms(session, head.output_names, feeds, args.iters)
            print(f"{shape:>6} {label:<15} {ms:8.2f} ms  {errors}")
    return 0


if __name__ == "__main__":
    script_entry(main)
