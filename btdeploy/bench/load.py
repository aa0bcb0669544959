"""`btdeploy bench --workload serve`: a bounded load against `btdeploy serve` on 127.0.0.1.

Per bench variant (the names `btdeploy bench` times, on a backend serve runs), the same server is
started twice, with dynamic batching (`--max-batch`) and without (`--max-batch 1`); each is driven
at every concurrency with a fixed number of requests, distinct inputs per request (Open Inference
Protocol, binary tensors), and the same requests run through `btdeploy.load` in this process,
merged as the server merges them, give the ceiling. The rank workload (one image against many
captions, /v1/rank) is driven the same way where the variant's backend runs the split towers and
the export has them. Reported: throughput, p50/p90/p99, errors, answers that differ from the
in-process ones, and the batch sizes formed.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from btdeploy.artifacts.files import write_json, write_text
from btdeploy.artifacts.graph_names import Precision
from btdeploy.artifacts.manifest import Manifest
from btdeploy.backends.targets import RunOptions, Target, bench_variants
from btdeploy.bench.figures import pyplot, save_png
from btdeploy.bench.machine import cpu_text, machine_description
from btdeploy.bench.runner import one_text_length
from btdeploy.errors import BtDeployError
from btdeploy.model.inputs import sample_inputs
from btdeploy.progress import say
from btdeploy.serve.batching import merge_requests, split_outputs, text_axes
from btdeploy.serve.process import ServerProcess
from btdeploy.serve.protocol import DATATYPES
from btdeploy.serve.settings import BACKENDS, rank_unserved
from btdeploy.verify.parity import parse_shapes

REQUEST_TIMEOUT_S = 600
# A rank request scores one image against many captions (seconds each at base size on 2 cores):
# it is driven up to this concurrency, with at least this many requests per level.
RANK_MAX_CONCURRENCY = 16
RANK_MIN_REQUESTS = 4
COMPARE_CONCURRENCY = 16  # batching against no batching: enough requests in flight for batches to form


DEFAULT_SERVED = ("ort-fused", "ort-int8-dynamic")
# The run options `btdeploy serve` takes, as its flags (a variant's option away from its default).
_SERVE_FLAGS: dict[str, Callable[[Any], list[str]]] = {
    "flavour": lambda value: ["--flavour", str(value)],
    "precision": lambda value: ["--precision", str(value)],
    "exact_sums": lambda value: [] if value else ["--no-exact-sums"],
    "spin": lambda value: ["--spin" if value else "--no-spin"],
}


@dataclass(frozen=True)
class ServedVariant:
    """A bench variant as btdeploy serve runs it: in the server (its flags) and in this process (load's options)."""

    name: str
    target: Target
    run_options: RunOptions

    @classmethod
    def named(cls, name: str) -> ServedVariant:
        """The bench variant of that name; one line where it is not one serve can run."""
        known = bench_variants()
        servable = ", ".join(name for name, (target, _) in known.items() if target.name in BACKENDS)
        if name not in known:
            raise BtDeployError(f"unknown variant {name!r} (serve runs {servable})")
        target, variant = known[name]
        if target.name not in BACKENDS:
            raise BtDeployError(f"{name} runs on {target.name}, which btdeploy serve does not run (it runs {servable})")
        served = cls(name, target, variant.options)
        unflagged = [option for option in served.options if option not in _SERVE_FLAGS]
        if unflagged:
            raise BtDeployError(f"{name} sets {', '.join(unflagged)}, which btdeploy serve has no flag for")
        return served

    @property
    def options(self) -> dict[str, Any]:
        """The run options away from their defaults: what btdeploy.load is given in this process."""
        values = {f.name: (getattr(self.run_options, f.name), f.default) for f in fields(RunOptions)}
        return {name: value for name, (value, default) in values.items() if value != default}

    @property
    def precision(self) -> Precision:
        return self.run_options.precision

    def server_arguments(self) -> list[str]:
        flags = ["--backend", self.target.name]
        for name, value in self.options.items():
            flags += _SERVE_FLAGS[name](value)
        return flags


def served_variants(names: list[str], manifest: Manifest) -> list[ServedVariant]:
    """The variants to serve, each checked against the server's flags and the export before any starts;
    every problem in one line."""
    problems: list[str] = []
    served: list[ServedVariant] = []
    for name in names:
        try:
            variant = ServedVariant.named(name)
        except BtDeployError as error:
            problems.append(str(error))
            continue
        target, options = variant.target, variant.run_options
        reason = target.unavailable(options) or target.missing(manifest, options)
        if reason:
            problems.append(f"{name}: {reason}")
            continue
        served.append(variant)
    if problems:
        raise BtDeployError("--workload serve: " + "; ".join(problems))
    return served


@dataclass
class Level:
    workload: str  # "itm <variant>" or "rank <variant>"
    mode: str  # "batching", "no batching", "in-process" (merged as the server merges), "in-process, 1 at a time"
    concurrency: int
    requests: int
    seconds: float
    throughput: float  # requests per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int = 0
    wrong: int = 0  # answers off the in-process answer beyond the precision's tolerance
    max_abs_error: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)  # what the failed requests were told


def binary_body(feeds: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """An infer request with binary tensors (Triton's extension, tritonclient's default)."""
    inputs = [
        {
            "name": name,
            "shape": list(value.shape),
            "datatype": DATATYPES[value.dtype.name],
            "parameters": {"binary_data_size": value.nbytes},
        }
        for name, value in feeds.items()
    ]
    header = json.dumps({"inputs": inputs}).encode()
    body = header + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())
    return body, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


def drive(url: str, path: str, bodies: list[tuple[bytes, dict[str, str]]], concurrency: int) -> dict[str, Any]:
    """Send every body once, `concurrency` at a time, each worker on its own keep-alive connection."""
    parsed = urllib.parse.urlsplit(url)
    latencies: list[float] = [0.0] * len(bodies)
    answers: list[bytes | None] = [None] * len(bodies)
    statuses: list[int] = [0] * len(bodies)
    position = iter(range(len(bodies)))
    lock = threading.Lock()

    def worker() -> None:
        connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=REQUEST_TIMEOUT_S)
        while True:
            with lock:
                index = next(position, None)
            if index is None:
                break
            body, headers = bodies[index]
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers=headers)
                reply = connection.getresponse()
                data = reply.read()
                statuses[index], answers[index] = reply.status, data
            except (OSError, http.client.HTTPException):
                statuses[index] = -1
                connection.close()
                connection = http.client.HTTPConnection(
                    parsed.hostname or "127.0.0.1", parsed.port, timeout=REQUEST_TIMEOUT_S
                )
            latencies[index] = time.perf_counter() - started
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - started, "latencies": latencies, "statuses": statuses, "answers": answers}


def summarize(workload: str, mode: str, concurrency: int, run: dict[str, Any]) -> Level:
    latencies = np.array(run["latencies"]) * 1000
    p50, p90, p99 = (round(float(np.percentile(latencies, q)), 1) for q in (50, 90, 99))
    return Level(
        workload=workload,
        mode=mode,
        concurrency=concurrency,
        requests=len(latencies),
        seconds=round(run["seconds"], 3),
        throughput=round(len(latencies) / run["seconds"], 3),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        errors=sum(1 for status in run["statuses"] if status != 200),
        error_reasons=_reasons(run),
    )


def _reasons(run: dict[str, Any]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for status, answer in zip(run["statuses"], run.get("answers", []), strict=False):
        if status != 200:
            text = f"{status}: {(answer or b'no answer (connection failed)')[:160].decode(errors='replace')}"
            reasons[text] = reasons.get(text, 0) + 1
    return reasons


def get_json(url: str, path: str) -> Any:
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=60)
    connection.request("GET", path)
    data = json.loads(connection.getresponse().read())
    connection.close()
    return data


def batches_formed(before: dict[str, Any], after: dict[str, Any], head: str) -> dict[int, int]:
    old = before.get(head, {})
    return {int(k): v - old.get(k, 0) for k, v in after.get(head, {}).items() if v - old.get(k, 0)}


def _requests_per_level(concurrency: int, minimum: int) -> int:
    return max(minimum, 2 * concurrency)


def _compare(
    levels: Level, run: dict[str, Any], expected: list[Any], read: Callable[[bytes], Any], bound: float
) -> None:
    worst = 0.0
    for answer, status, want in zip(run["answers"], run["statuses"], expected, strict=False):
        if status != 200 or answer is None:
            continue
        error = float(np.abs(np.asarray(read(answer)) - np.asarray(want)).max())
        worst = max(worst, error)
        levels.wrong += error > bound
    levels.max_abs_error = round(worst, 6)


def _itm_logits(answer: bytes) -> np.ndarray:
    reply = json.loads(answer)
    output = reply["outputs"][0]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def _ceiling(
    workload: str, requests: list[Any], run_chunk: Callable[[list[Any]], list[Any]], batch: int
) -> tuple[Level, list[Any]]:
    """The same requests in this process, `batch` at a time as the server merges them: the ceiling,
    and each request's answer (what the server's answers are compared with)."""
    answers: list[Any] = []
    latencies: list[float] = []
    run_chunk(requests[:1])  # warm-up: sessions and the processor are ready before the clock starts
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        chunk = requests[start : start + batch]
        chunk_started = time.perf_counter()
        answers += run_chunk(chunk)
        latencies += [time.perf_counter() - chunk_started] * len(chunk)
    run = {"seconds": time.perf_counter() - started, "latencies": latencies, "statuses": [200] * len(requests)}
    return summarize(workload, "in-process", 0, run), answers


def _itm_chunk_runner(runtime: Any) -> Callable[[list[dict[str, np.ndarray]]], list[np.ndarray]]:
    axes = text_axes(runtime.head, runtime.config)
    pad = int(runtime.config.text_config.pad_token_id)

    def run(chunk: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        merged, slices = merge_requests(chunk, pad)
        values = {"logits": np.asarray(runtime(**merged).logits)}
        return [part["logits"] for part in split_outputs(values, slices, axes)]

    return run


def _server_arguments(variant: ServedVariant, batch: int) -> list[str]:
    arguments = ["--heads", "itm", *variant.server_arguments(), "--max-batch", str(batch), "--batch-wait-ms", "10"]
    return arguments + ["--timeout", str(REQUEST_TIMEOUT_S), "--max-body-mb", "64"]


def run_serve_bench(
    export: Path,
    variant_names: list[str],
    concurrency: list[int],
    min_requests: int,
    text_length: int | None,
    captions: int,
    max_batch: int,
    out: Path,
) -> list[Level]:
    from btdeploy.runtime.runtime import find_head, load

    manifest = find_head(export, "itm")
    config = manifest.config
    text_length = one_text_length(text_length, config)
    parse_shapes([1], [text_length], config)  # refuses a length past the model's
    variants = served_variants(variant_names, manifest)  # every problem before a server starts
    total = max(_requests_per_level(c, min_requests) for c in concurrency)
    feeds = [sample_inputs(config, 1, text_length, seed=10_000 + i, pad=False) for i in range(total)]
    bodies = [binary_body(f) for f in feeds]
    rank_bodies, rank_images = _rank_bodies(total, captions)
    levels: list[Level] = []
    notes: list[str] = []
    for variant in variants:
        runtime = load(export, head="itm", backend=variant.target.name, **variant.options)
        say(f"serve bench: itm {variant.name} in this process ({total} requests, {max_batch} merged at a time)")
        ceiling, expected = _ceiling(f"itm {variant.name}", feeds, _itm_chunk_runner(runtime), max_batch)
        # One request at a time in this process: with the merged run above, the most batching can give here.
        single, _ = _ceiling(f"itm {variant.name}", feeds[: max(16, max_batch)], _itm_chunk_runner(runtime), 1)
        single.mode = "in-process, 1 at a time"
        levels += [ceiling, single]
        bound = (
            runtime.head.output("logits").tolerances[variant.precision].bound(float(np.abs(np.stack(expected)).max()))
        )
        workloads = [(f"itm {variant.name}", "itm", "/v2/models/itm/infer", bodies, expected, _itm_logits, bound)]
        skipped = rank_unserved(variant.target.name, manifest)
        if skipped:
            notes.append(f"rank {variant.name}: not run, {skipped}")
            say(f"serve bench: rank {variant.name} not run: {skipped}")
        else:
            split = load(export, head="itm", backend=variant.target.name, split=True, **variant.options)
            say(f"serve bench: rank {variant.name} in this process")
            rank_count = max(RANK_MIN_REQUESTS, *(c for c in concurrency if c <= RANK_MAX_CONCURRENCY))
            rank_ceiling, rank_expected = _ceiling(
                f"rank {variant.name}", rank_bodies[:rank_count], _rank_chunk_runner(split), 1
            )
            levels.append(rank_ceiling)
            # A probability; INT8 moves it by a few hundredths.
            rank_bound = 1e-4 if variant.precision == Precision.FP32 else 0.05
            rank = (f"rank {variant.name}", "rank", "/v1/rank", rank_bodies, rank_expected, _rank_probabilities)
            workloads.append((*rank, rank_bound))
        for mode, batch in (("batching", max_batch), ("no batching", 1)):
            say(f"serve bench: starting btdeploy serve ({variant.name}, {mode})")
            with ServerProcess(export, _server_arguments(variant, batch)) as server:
                for workload, stats_key, path, pool, answers, read, tolerance in workloads:
                    if stats_key == "rank" and batch == 1:
                        continue  # rank requests are never merged: --max-batch does not change them
                    for level in concurrency:
                        count = _requests_per_level(level, min_requests)
                        if stats_key == "rank":
                            if level > RANK_MAX_CONCURRENCY:
                                continue
                            count = max(RANK_MIN_REQUESTS, level)
                        before = get_json(server.url, "/v2/stats/batches")
                        say(f"serve bench: {workload}, {mode}, concurrency {level}, {count} requests")
                        run = drive(server.url, path, pool[:count], level)
                        result = summarize(workload, mode, level, run)
                        result.batch_sizes = batches_formed(
                            before, get_json(server.url, "/v2/stats/batches"), stats_key
                        )
                        _compare(result, run, answers[:count], read, tolerance)
                        say(
                            f"  {result.throughput:.2f} req/s, p50 {result.p50_ms:.0f} ms, p99 {result.p99_ms:.0f} ms,"
                            f" {result.errors} errors, {result.wrong} wrong, batches {result.batch_sizes}"
                        )
                        levels.append(result)
    write_serve_report(levels, out, rank_images, captions, text_length, max_batch, notes)
    return levels


def _rank_bodies(total: int, captions: int) -> tuple[list[tuple[bytes, dict[str, str]]], int]:
    """Rank requests over 4 distinct images (so the feature cache is hit), distinct captions each."""
    from PIL import Image

    images = []
    for seed in range(4):
        buffer = io.BytesIO()
        pixels = (np.random.default_rng(seed).random((320, 400, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        images.append(base64.b64encode(buffer.getvalue()).decode())
    words = ["a", "photo", "of", "two", "cats", "dogs", "on", "the", "red", "sofa", "beach", "with", "small", "boat"]
    rng = np.random.default_rng(7)
    bodies = []
    for index in range(total):
        texts = [" ".join(rng.choice(words, 8)) for _ in range(captions)]
        body = json.dumps({"image": images[index % len(images)], "texts": texts}).encode()
        bodies.append((body, {"Content-Type": "application/json"}))
    return bodies, len(images)


def _rank_chunk_runner(runtime: Any) -> Callable[[list[Any]], list[Any]]:
    """The server's ranking in this process, on the same itm split graphs, its image features not
    cached (each request runs the vision tower, as the server does for an image it has not seen)."""
    from btdeploy.apps.rank import Ranker
    from btdeploy.serve.feature_cache import FeatureCache
    from btdeploy.serve.rank_images import RequestImages

    ranker = Ranker(runtime, None)
    return lambda chunk: [_rank_in_process(ranker, RequestImages(ranker.processor, FeatureCache(0)), b) for b in chunk]


def _rank_in_process(ranker: Any, source: Any, body: tuple[bytes, dict[str, str]]) -> np.ndarray:
    request = json.loads(body[0])
    ranking = ranker.rank([base64.b64decode(request["image"])], request["texts"], None, source)
    values = np.empty(len(ranking.rows), np.float32)
    for row in ranking.rows:
        values[row.index] = row.itm_probability
    return values


def _rank_probabilities(answer: bytes) -> np.ndarray:
    ranking = json.loads(answer)["ranking"]
    values = np.empty(len(ranking), np.float32)
    for row in ranking:
        values[row["index"]] = row["match_probability"]
    return values


def write_serve_report(
    levels: list[Level],
    out: Path,
    images: int,
    captions: int,
    text_length: int,
    max_batch: int,
    notes: list[str] | None = None,
) -> None:
    machine = machine_description(0)
    write_json(out / "serve.json", {"machine": machine, "levels": [asdict(level) for level in levels]})
    cpu = machine["cpu"]
    lines = [
        "# Serving bench: btdeploy serve (Ray Serve) under load, against btdeploy.load in one process",
        "",
        f"Machine: {cpu_text(machine)}; "
        f"huge pages {machine['huge_pages']}; no GPU. One replica per deployment. "
        f"itm requests: 1 image-text pair of {text_length} tokens each, "
        f"binary Open Inference Protocol tensors; rank requests: 1 image (of {images}, so the feature cache "
        f"hits) against {captions} captions. Batching: up to {max_batch} requests merged, 10 ms wait.",
        "",
        "| workload | mode | concurrency | requests | req/s | p50 ms | p90 ms | p99 ms | errors | wrong | max abs err"
        " | batches formed (size: count) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        sizes = ", ".join(f"{k}: {v}" for k, v in sorted(level.batch_sizes.items())) or "-"
        lines.append(
            f"| {level.workload} | {level.mode} | {level.concurrency or '-'} | {level.requests} "
            f"| {level.throughput:.2f} "
            f"| {level.p50_ms:.0f} | {level.p90_ms:.0f} | {level.p99_ms:.0f} | {level.errors} | {level.wrong} "
            f"| {level.max_abs_error:g} | {sizes} |"
        )
    failures = {reason: n for level in levels for reason, n in level.error_reasons.items()}
    if failures:
        lines += ["", "Failed requests were told:", ""] + [f"- {n} x `{reason}`" for reason, n in failures.items()]
    lines += [
        "",
        "Rank requests are not merged across requests (each already scores one image against many captions"
        f" in one fusion batch), so they run on the batching server only, at concurrency up to {RANK_MAX_CONCURRENCY}.",
    ]
    lines += [f"- {note}" for note in notes or []]
    lines += ["", "## Batching against no batching, same server", ""]
    compared = 0
    for workload in dict.fromkeys(level.workload for level in levels):
        served = {(x.mode, x.concurrency): x for x in levels if x.workload == workload}
        # At concurrency 16 where both servers ran it (enough requests in flight to merge), else the highest both ran.
        common = {c for mode, c in served if mode == "batching"} & {c for mode, c in served if mode == "no batching"}
        if not common:
            continue
        concurrency = COMPARE_CONCURRENCY if COMPARE_CONCURRENCY in common else max(common)
        on, off = served["batching", concurrency], served["no batching", concurrency]
        merged = next((x for x in levels if x.workload == workload and x.mode == "in-process"), None)
        single = next((x for x in levels if x.workload == workload and x.mode == "in-process, 1 at a time"), None)
        compared += 1
        gain = on.throughput / off.throughput
        line = (
            f"- {workload}, concurrency {concurrency}: {on.throughput:.2f} against {off.throughput:.2f} req/s,"
            f" **{gain:.2f}x**"
        )
        if merged and single:
            best = max(merged.throughput, single.throughput)
            line += (
                f"; in this process, merged {merged.throughput:.2f} and one at a time {single.throughput:.2f} req/s"
                f" (batching can give at most {merged.throughput / single.throughput:.2f}x on this machine);"
                f" the batching server reaches {on.throughput / best:.2f}x of the better one"
            )
        lines.append(line)
    if not compared:
        lines.append("- no concurrency ran on both servers: nothing to compare")
    write_text(out / "serve.md", "\n".join(lines) + "\n")
    _plot(levels, out / "serve.png", cpu["model"])
    say(f"wrote {out / 'serve.md'}")


def _plot(levels: list[Level], path: Path, cpu: str) -> None:
    plt = pyplot("serve plot")
    if plt is None:
        return

    workloads = list(dict.fromkeys(level.workload for level in levels))
    figure, axes = plt.subplots(2, len(workloads), figsize=(4.2 * len(workloads), 7), squeeze=False)
    for column, workload in enumerate(workloads):
        for style, mode in enumerate(("batching", "no batching")):
            points = sorted(
                (x.concurrency, x.throughput, x.p99_ms) for x in levels if x.workload == workload and x.mode == mode
            )
            if not points:
                continue
            concurrency, throughput, p99 = zip(*points, strict=True)
            axes[0][column].plot(concurrency, throughput, marker="o", linestyle=["-", "--"][style], label=mode)
            axes[1][column].plot(concurrency, p99, marker="o", linestyle=["-", "--"][style], label=mode)
        for line_style, ceiling_mode in ((":", "in-process"), ("-.", "in-process, 1 at a time")):
            ceiling = next((x for x in levels if x.workload == workload and x.mode == ceiling_mode), None)
            if ceiling:
                axes[0][column].axhline(ceiling.throughput, color="gray", linestyle=line_style, label=ceiling_mode)
        axes[0][column].set_title(workload)
        axes[0][column].set_ylabel("requests / s")
        axes[1][column].set_ylabel("p99 latency (ms)")
        axes[1][column].set_yscale("log")
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_xlabel("concurrent clients")
            axes[row][column].grid(True, which="both", alpha=0.3)
            axes[row][column].legend(fontsize=7)
    figure.suptitle(f"btdeploy serve, base itm ({cpu})")
    save_png(figure, path, dpi=100)
