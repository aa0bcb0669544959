"""Where the time goes: ONNX Runtime's profiler on one graph and shape, summed per operator type.

    python benchmarks/profile_ort.py DIR/itm/model.ort.onnx --batch 4 --seq-len 40 [--runs 3]

Prints each operator type's share of the kernel time, largest first.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnxruntime as ort

from btdeploy.backends.onnxruntime import session_options
from btdeploy.bench.ort_profile import kernel_ms_per_op
from btdeploy.bench.profile_case import parse_profile_case
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages


def main() -> None:
    args = parse_profile_case(__doc__)
    feeds = args.feeds
    options = session_options(args.threads)
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
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
