"""The split runtime with ONNX Runtime's default session options against btdeploy's: one image
against one caption (encode the image, encode the caption, score the pair), three sessions one
after another, the way `btdeploy.load(..., split=True)` runs them.

    python benchmarks/split_spin.py DIR/itm [--flavour ort] [--rounds 3] [--runs 12]

By default ONNX Runtime's workers spin on after a run; btdeploy stops them when a run ends
(`session_options` in btdeploy/backends/onnxruntime.py), so that the next session gets the cores.
Each round starts one child process per option set, in turn, so that neither set's threads
share a process with the other's; a child reports its median and minimum over --runs, and the
CPU time its process took in the 0.3 s after a run, while idle. Progress on stderr; the table on
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from btdeploy.backends.onnxruntime import STOP_SPINNING_AFTER_RUN, session_options
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages

OPTION_SETS = ("onnxruntime-default", "btdeploy")


def _ort_default_spinning(threads: int | None = None, spin: bool = True) -> Any:
    """btdeploy's session options with ONNX Runtime's default back: workers spin on after a run."""
    options = session_options(threads, spin)
    options.add_session_config_entry(STOP_SPINNING_AFTER_RUN, "0")  # overwrites btdeploy's "1"
    return options


def child(folder: Path, option_set: str, flavour: str | None, runs: int, threads: int) -> dict[str, float]:
    import btdeploy
    import btdeploy.backends.onnxruntime as onnxruntime_backend
    from btdeploy.artifacts.manifest import read_manifest
    from btdeploy.model.inputs import sample_inputs

    if option_set == "onnxruntime-default":
        onnxruntime_backend.session_options = _ort_default_spinning  # what the backend calls for every session
    runtime = btdeploy.load(folder, flavour=flavour, split=True, threads=threads)
    assert isinstance(runtime, btdeploy.SplitRuntime)
    feeds = sample_inputs(read_manifest(folder).config, 1, 16, pad=False)

    def once() -> float:
        started = time.perf_counter()
        images = runtime.encode_images(feeds["pixel_values"])
        texts = runtime.encode_texts(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"])
        runtime.score(images, texts)
        return 1e3 * (time.perf_counter() - started)

    once()
    once()
    samples = [once() for _ in range(runs)]
    cpu = time.process_time()
    time.sleep(0.3)
    idle_cpu_ms = 1e3 * (time.process_time() - cpu)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "idle_cpu_ms": idle_cpu_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a head folder exported with --split")
    parser.add_argument("--flavour", default="ort", help="ort, trt or plain (the unoptimized export)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=OPTION_SETS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    flavour = None if args.flavour == "plain" else args.flavour
    if args.child:
        print(json.dumps(child(args.folder, args.child, flavour, args.runs, args.threads)))
        return

    results: dict[str, list[dict[str, float]]] = {name: [] for name in OPTION_SETS}
    for round_index in range(args.rounds):
        order = OPTION_SETS if round_index % 2 == 0 else OPTION_SETS[::-1]
        for name in order:
            command = [sys.executable, __file__, str(args.folder), "--flavour", args.flavour, "--runs", str(args.runs),
                       "--threads", str(args.threads), "--child", name]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(output.strip().splitlines()[-1]))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    default, ours = results[OPTION_SETS[0]], results["btdeploy"]
    paired = [d["median_ms"] / b["median_ms"] for d, b in zip(default, ours, strict=True)]
    print(f"split runtime, {args.folder} ({args.flavour}), one image x one caption of 16 tokens, {args.threads} "
          f"threads; {args.rounds} rounds of one process per option set, {args.runs} runs each")  # fmt: skip
    print("| session options | median ms (per round) | min ms | idle CPU ms in 0.3 s after a run |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        medians = " / ".join(f"{r['median_ms']:.1f}" for r in rows)
        low = min(r["min_ms"] for r in rows)
        idle = max(r["idle_cpu_ms"] for r in rows)
        print(f"| {name} | {medians} | {low:.1f} | {idle:.1f} |")
    print(f"\ndefault / btdeploy, per round: {' '.join(f'{p:.2f}x' for p in paired)} "
          f"(median {statistics.median(paired):.2f}x)")  # fmt: skip


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
