"""Where the time goes: ONNX Runtime's profiler on one graph and shape, summed per operator type.

    python benchmarks/profile_ort.py DIR/itm/model.ort.onnx --batch 4 --seq-len 40 [--runs 3]

Prints each operator type's share of the kernel time, largest first.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from btdeploy.artifacts.manifest import read_manifest
from btdeploy.bench.ort_profile import kernel_ms_per_op
from btdeploy.model.inputs import sample_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path, help="a model*.onnx inside an exported head folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    config = read_manifest(args.model.parent).config
    feeds = sample_inputs(config, args.batch, args.seq_len, pad=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)  # warm-up, excluded below
        for _ in range(args.runs):
            session.run(None, feeds)
        per_op = kernel_ms_per_op(session, args.runs)
    total = sum(per_op.values())
    print(f"{args.model} batch {args.batch} length {args.seq_len}: {total:.1f} ms of kernel time per run")
    for op, ms in sorted(per_op.items(), key=lambda item: -item[1]):
        print(f"  {op:<28} {ms:9.1f} ms  {100 * ms / total:5.1f} %")


if __name__ == "__main__":
    main()
