"""Where the time goes in OpenVINO: its per-layer counters on one graph and shape, summed per layer
type and kernel, next to benchmarks/profile_ort.py for ONNX Runtime.

    python benchmarks/profile_openvino.py DIR/itm/model.trt.int8.onnx --batch 1 --seq-len 16

Runs with the bench's settings (f32 inference precision, latency hint, --threads threads).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict

from btdeploy.backends.openvino import compile_on_cpu, compile_settings, import_openvino
from btdeploy.bench.profile_case import parse_profile_case
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages


def main() -> None:
    args = parse_profile_case(__doc__)
    feeds = args.feeds

    core = import_openvino().Core()
    settings = compile_settings(args.threads, profile=True)
    request = compile_on_cpu(core, core.read_model(str(args.model)), settings).create_infer_request()
    request.infer(feeds)  # warm-up, excluded below
    per_layer: dict[tuple[str, str], float] = defaultdict(float)
    walls = []
    for _ in range(args.runs):
        started = time.perf_counter()
        request.infer(feeds)
        walls.append((time.perf_counter() - started) * 1e3)
        for info in request.profiling_info:  # the counters of the last inference
            if info.status == info.Status.EXECUTED:
                per_layer[(info.node_type, info.exec_type)] += info.real_time.total_seconds() * 1e3 / args.runs
    total = sum(per_layer.values())
    print(f"{args.model} batch {args.batch} length {args.seq_len}: {total:.1f} ms of layer time per run "
          f"(wall median {statistics.median(walls):.1f} ms)")  # fmt: skip
    for (layer, kernel), ms in sorted(per_layer.items(), key=lambda item: -item[1])[:20]:
        print(f"  {layer:<30} {kernel:<26} {ms:9.1f} ms  {100 * ms / total:5.1f} %")


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
