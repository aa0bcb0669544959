"""`btdeploy serve` with its replicas' ONNX Runtime workers spinning between operators (`--spin`)
and without (`--no-spin`), under the same load: which serves more when replicas share the cores.
(Without either flag, serve spins only where one model replica may run.)

    python benchmarks/serve_spin.py DIR [--precision int8-dynamic] [--flavour ort] [--replicas 2]
        [--concurrency 16] [--requests 48] [--rounds 2]

Each round starts the server once per setting, in turn (the order alternates between rounds),
sends the same itm requests (one image-text pair of 16 tokens each, binary Open Inference
Protocol tensors) --concurrency at a time, and reads the batches the server formed. Progress on
stderr; the table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from btdeploy.bench.load import Level, batches_formed, binary_body, drive, get_json, summarize
from btdeploy.cli import script_entry
from btdeploy.hugepages import reexec_with_hugepages
from btdeploy.model.inputs import sample_inputs
from btdeploy.runtime.runtime import find_head
from btdeploy.serve.process import ServerProcess

SETTINGS = {"--no-spin": ["--no-spin"], "--spin": ["--spin"]}
INFER = "/v2/models/itm/infer"


def serve_once(
    export: Path, arguments: list[str], bodies: list[Any], concurrency: int, replicas: int
) -> tuple[Level, dict[int, int]]:
    with ServerProcess(export, arguments) as server:
        drive(server.url, INFER, bodies[: 2 * replicas], replicas)  # every replica's first runs, untimed
        before = get_json(server.url, "/v2/stats/batches")
        run = drive(server.url, INFER, bodies, concurrency)
        level = summarize("itm", " ".join(arguments), concurrency, run)
        return level, batches_formed(before, get_json(server.url, "/v2/stats/batches"), "itm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an export folder with an itm head")
    parser.add_argument("--precision", default="int8-dynamic")
    parser.add_argument("--flavour", default="ort", help="ort, trt or plain (the unoptimized export)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    config = find_head(args.export, "itm").config
    bodies = [binary_body(sample_inputs(config, 1, 16, seed=10_000 + i, pad=False)) for i in range(args.requests)]
    common = ["--heads", "itm", "--precision", args.precision, "--replicas", str(args.replicas)]
    common += ["--max-batch", "16", "--batch-wait-ms", "10", "--timeout", "600"]
    common += [] if args.flavour == "plain" else ["--flavour", args.flavour]

    results: dict[str, list[tuple[Level, dict[int, int]]]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        order = list(SETTINGS) if round_index % 2 == 0 else list(SETTINGS)[::-1]
        for name in order:
            level, batches = serve_once(args.export, common + SETTINGS[name], bodies, args.concurrency, args.replicas)
            results[name].append((level, batches))
            print(f"round {round_index + 1}/{args.rounds}, {name}: {level.throughput:.2f} req/s, "
                  f"{level.errors} errors", file=sys.stderr, flush=True)  # fmt: skip

    print(f"btdeploy serve {args.export} itm {args.precision} ({args.flavour}), {args.replicas} replica(s), "
          f"{args.requests} requests {args.concurrency} at a time; {args.rounds} rounds")  # fmt: skip
    print("| setting | req/s (per round) | p50 ms | p99 ms | errors | batches formed (size: count) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rows in results.items():
        rates = " / ".join(f"{level.throughput:.2f}" for level, _ in rows)
        p50 = statistics.median(level.p50_ms for level, _ in rows)
        p99 = max(level.p99_ms for level, _ in rows)
        errors = sum(level.errors for level, _ in rows)
        formed: dict[int, int] = {}
        for _, batches in rows:
            for size, count in batches.items():
                formed[size] = formed.get(size, 0) + count
        print(f"| {name} | {rates} | {p50:.0f} | {p99:.0f} | {errors} | {dict(sorted(formed.items()))} |")
    sleeping, spinning = results["--no-spin"], results["--spin"]
    paired = [a.throughput / b.throughput for (a, _), (b, _) in zip(sleeping, spinning, strict=True)]
    print(f"\n--no-spin / --spin throughput, per round: {' '.join(f'{p:.2f}x' for p in paired)} "
          f"(median {statistics.median(paired):.2f}x)")  # fmt: skip


if __name__ == "__main__":
    reexec_with_hugepages(sys.argv)  # timed as btdeploy's commands run models
    script_entry(main)
