"""`btdeploy serve` on loopback, one server for the module: protocol and task answers against
`btdeploy.load`, 200 concurrent requests, bad requests, a killed replica, metrics, clean shutdown."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ray_processes, ray_processes_left

from btdeploy.artifacts.graph_names import Precision
from btdeploy.model.heads import HEADS, get_head
from btdeploy.model.inputs import sample_inputs

TIMEOUT_S = 20  # the server's --timeout: no request may wait longer for its answer
MAX_BODY_MB = 1


@dataclass
class Server:
    url: str
    export: Path

    def request(
        self,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = TIMEOUT_S + 15,
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def json(self, path: str, value: Any = None) -> tuple[int, Any]:
        status, body = self.request(path, None if value is None else json.dumps(value).encode())
        return status, json.loads(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, private_cache: Path) -> Iterator[Server]:
    from btdeploy.apps.gallery import index_images
    from btdeploy.export.exporter import export_heads
    from btdeploy.model.checkpoints import resolve_model
    from btdeploy.serve.process import ServerProcess

    export = tmp_path_factory.mktemp("serve-export")
    export_heads(resolve_model("tiny"), list(HEADS), export, split=True)
    photos = export / "photos"
    photos.mkdir()
    for seed in range(6):
        (photos / f"photo{seed}.png").write_bytes(_png(20 + seed))
    index_images(export, photos, export / "gallery.npz")
    before = ray_processes()
    arguments = ["--timeout", str(TIMEOUT_S), "--max-body-mb", str(MAX_BODY_MB), "--max-batch", "8"]
    arguments += ["--gallery", str(export / "gallery.npz")]
    process = ServerProcess(export, [*arguments, "--batch-wait-ms", "20"])
    with process:
        assert process.url == f"http://127.0.0.1:{process.port}"
        yield Server(process.url, export)
        # Shutdown: SIGTERM stops the server, and no Ray process it started is left behind.
        assert process.process is not None and process.process.stdout is not None
        stdout = process.process.stdout.fileno()
        os.set_blocking(stdout, False)
        with contextlib.suppress(BlockingIOError):
            os.read(stdout, 1 << 20)  # what Ray relayed while the tests ran
        os.set_blocking(stdout, True)
        assert process.stop() == 0, process.tail()
        # The stop printed nothing on stdout: Ray had relayed "(raylet) Task
        # ServeController.graceful_shutdown failed ... killed by `ray.kill`" there on every clean stop.
        assert process.process.stdout.read() == ""
        log = process.log.read_text()
        # serve.run's "New http_options/controller_options will not be applied" (they had been) is not printed
        assert "will not be applied" not in log
        stop_lines = log.split("] stopping\n")[-1].splitlines()
        assert len(stop_lines) == 1 and stop_lines[0].endswith("] stopped"), process.tail()
    assert not process.log.exists()  # a clean stop leaves no log behind in the temporary folder
    assert not ray_processes_left(before), "Ray processes left behind"


@pytest.fixture(scope="module")
def runtimes(server: Server) -> dict[str, Any]:
    from btdeploy.runtime.runtime import load

    return {name: load(server.export, head=name) for name in HEADS}


def _infer_body(feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    names = {np.dtype("int64"): "INT64", np.dtype("float32"): "FP32"}
    return {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": names[v.dtype], "data": v.ravel().tolist()}
            for k, v in feeds.items()
        ]
    }


def _outputs(reply: dict[str, Any]) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in reply["outputs"]}


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((48, 60, 3)) * 255).astype("uint8")).save(buffer, "PNG")
    return buffer.getvalue()


def test_metadata_matches_the_manifest(server: Server) -> None:
    from btdeploy.runtime.runtime import find_head

    for name in HEADS:
        status, metadata = server.json(f"/v2/models/{name}")
        assert status == 200
        manifest = find_head(server.export, name).data
        for kind in ("inputs", "outputs"):
            expected = [
                (e["name"], e["dtype"], [d if isinstance(d, int) else -1 for d in e["shape"]]) for e in manifest[kind]
            ]
            got = [
                (t["name"], {"INT64": "int64", "FP32": "float32"}[t["datatype"]], t["shape"]) for t in metadata[kind]
            ]
            assert got == expected
    assert server.json("/v2/health/live") == (200, {"live": True})
    assert server.json("/v2/health/ready") == (200, {"ready": True})


@pytest.mark.parametrize("head_name", list(HEADS))
def test_protocol_infer_equals_load(server: Server, runtimes: dict[str, Any], head_name: str) -> None:
    feeds = sample_inputs(runtimes[head_name].config, 3, 7, seed=5)
    status, reply = server.json(f"/v2/models/{head_name}/infer", _infer_body(feeds))
    assert status == 200, reply
    expected = runtimes[head_name](**feeds)
    got = _outputs(reply)
    assert list(got) == get_head(head_name).output_names
    for name, value in got.items():
        assert value.shape == np.asarray(expected[name]).shape
        assert (
            np.abs(value - np.asarray(expected[name])).max()
            <= get_head(head_name).output(name).tolerances[Precision.FP32].max_abs
        )


def test_tritonclient_talks_to_the_server(server: Server, runtimes: dict[str, Any]) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_ready() and client.is_model_ready("mlm")
    feeds = sample_inputs(runtimes["mlm"].config, 2, 6, seed=9)
    inputs = []
    for name, value in feeds.items():
        tensor = triton.InferInput(name, list(value.shape), "INT64" if value.dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(value)  # the binary extension, tritonclient's default
        inputs.append(tensor)
    result = client.infer("mlm", inputs, outputs=[triton.InferRequestedOutput("logits")])
    assert np.abs(result.as_numpy("logits") - runtimes["mlm"](**feeds).logits).max() <= 1e-4


def _processor(server: Server) -> Any:
    from transformers import BridgeTowerProcessor

    return BridgeTowerProcessor.from_pretrained(server.export / "itm" / "processor")


def _expected_pairs(server: Server, runtime: Any, png: bytes, texts: list[str]) -> tuple[dict[str, Any], Any]:
    from PIL import Image

    processor = _processor(server)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    encoding = processor([image] * len(texts), texts, padding=True, return_tensors="np")
    return encoding, runtime(**encoding)


def test_task_endpoints_equal_load(server: Server, runtimes: dict[str, Any]) -> None:
    import torch

    png = _png(1)
    texts = ["a cat on a <mask>", "two dogs in the <mask> park"]
    body = {"image": base64.b64encode(png).decode(), "texts": texts}
    status, itm = server.json("/v1/itm", body)
    assert status == 200, itm
    _, expected = _expected_pairs(server, runtimes["itm"], png, texts)
    logits = expected.logits
    probability = np.exp(logits[:, 1]) / np.exp(logits).sum(-1)
    assert np.abs(np.array([a["match_probability"] for a in itm["answers"]]) - probability).max() <= 1e-5
    # The same request with the raw image as the body and the captions in the query.
    query = "&".join("text=" + urllib.parse.quote(t) for t in texts)
    status, raw = server.request(f"/v1/itm?{query}", png, "image/png")
    assert status == 200 and json.loads(raw)["answers"] == itm["answers"]
    status, itc = server.json("/v1/itc", body)
    _, expected = _expected_pairs(server, runtimes["itc"], png, texts)
    cosine = (expected.text_embeds * expected.image_embeds).sum(-1)
    assert np.abs(np.array([a["cosine"] for a in itc["answers"]]) - cosine).max() <= 1e-5
    status, mlm = server.json("/v1/mlm", body)
    encoding, expected = _expected_pairs(server, runtimes["mlm"], png, texts)
    processor = _processor(server)
    for row, answer in enumerate(mlm["answers"]):
        masked = encoding["input_ids"][row] == processor.tokenizer.mask_token_id
        tokens = [processor.decode([int(t)]) for t in expected.logits[row].argmax(-1)[masked]]
        assert answer["predicted_tokens"] == tokens and answer["text"] == texts[row]
        assert [[c["token"] for c in per_mask] for per_mask in answer["candidates"]] == [[t] for t in tokens]
    # ?top_k=: each <mask>'s likeliest tokens and their probabilities, as torch's softmax and topk give them.
    status, ranked = server.json("/v1/mlm?top_k=3", body)
    assert status == 200, ranked
    for row, answer in enumerate(ranked["answers"]):
        masked = torch.from_numpy(encoding["input_ids"][row] == processor.tokenizer.mask_token_id)
        best = torch.softmax(torch.from_numpy(expected.logits[row])[masked].double(), -1).topk(3)
        assert len(answer["candidates"]) == int(masked.sum())
        for per_mask, probabilities, ids in zip(answer["candidates"], best.values, best.indices, strict=True):
            assert [c["token"] for c in per_mask] == [processor.decode([int(i)]) for i in ids]
            assert [c["probability"] for c in per_mask] == pytest.approx(probabilities.tolist(), abs=1e-5)
        assert answer["filled"] == mlm["answers"][row]["filled"]


def test_rank_uses_cached_image_features(server: Server) -> None:
    png = _png(2)
    texts = ["a red car", "a bowl of fruit", "a man riding a horse"]
    body = {"image": base64.b64encode(png).decode(), "texts": texts}
    status, first = server.json("/v1/rank", body)
    assert status == 200, first
    status, second = server.json("/v1/rank", body)
    assert (first["cached_images"], second["cached_images"]) == (0, 1)
    assert second["ranking"] == first["ranking"]
    # Without top_k every caption reaches ITM, ordered as /v1/itm scores them; each with its /v1/itc cosine.
    assert first["stages"] == "ITC cosine over 3, top 3 to ITM; ITM on 3 (split graphs, the itc towers' features)"
    _, itm = server.json("/v1/itm", body)
    _, itc = server.json("/v1/itc", body)
    expected = sorted((-a["match_probability"], i) for i, a in enumerate(itm["answers"]))
    assert [r["index"] for r in first["ranking"]] == [i for _, i in expected]
    for row in first["ranking"]:
        assert abs(row["match_probability"] - itm["answers"][row["index"]]["match_probability"]) <= 1e-5
        assert abs(row["itc_cosine"] - itc["answers"][row["index"]]["cosine"]) <= 1e-5
    # The reverse: one caption against several images, the known one from the cache.
    images = [base64.b64encode(p).decode() for p in (_png(3), png)]
    status, reverse = server.json("/v1/rank", {"images": images, "text": texts[0], "top_k": 1})
    assert status == 200 and reverse["cached_images"] == 1 and len(reverse["ranking"]) == 1


def _assert_same_rows(served: list[dict[str, Any]], ranked: list[Any]) -> None:
    """The server's ranking rows are the command's: items, places and numbers."""
    assert [(r["item"], r["index"]) for r in served] == [(r.label, r.index) for r in ranked]
    for mine, theirs in zip(served, ranked, strict=True):
        assert abs(mine["match_probability"] - theirs.itm_probability) <= 1e-6
        assert abs(mine["itc_cosine"] - theirs.itc_cosine) <= 1e-6


def test_rank_answers_as_the_rank_command_ranks(server: Server, tmp_path: Path) -> None:
    """/v1/rank and `btdeploy rank` are one ranking: ITC's top K to ITM, the same rows and numbers."""
    from btdeploy.apps.rank import rank

    image = tmp_path / "query.png"
    image.write_bytes(_png(4))
    texts = ["a red car", "a bowl of fruit", "a man riding a horse", "two dogs", "the sea", "a tall tree"]
    status, served = server.json("/v1/rank", {"image": base64.b64encode(_png(4)).decode(), "texts": texts, "top_k": 2})
    assert status == 200, served
    ranked = rank(server.export, [image], texts, top_k=2)
    assert served["query"] == "image" and served["stages"] == ranked.stages
    assert ranked.stages == "ITC cosine over 6, top 2 to ITM; ITM on 2 (split graphs, the itc towers' features)"
    _assert_same_rows(served["ranking"], ranked.rows)
    # Images against a caption: the same candidates chosen, named by their place in the request.
    files = []
    for seed in (5, 6, 7):
        files.append(tmp_path / f"photo{seed}.png")
        files[-1].write_bytes(_png(seed))
    photos = [base64.b64encode(path.read_bytes()).decode() for path in files]
    status, served = server.json("/v1/rank", {"images": photos, "text": texts[3], "top_k": 2})
    assert status == 200, served
    ranked = rank(server.export, files, [texts[3]], top_k=2)
    assert [r["index"] for r in served["ranking"]] == [r.index for r in ranked.rows]
    assert [r["item"] for r in served["ranking"]] == [f"image {r.index}" for r in ranked.rows]
    for mine, theirs in zip(served["ranking"], ranked.rows, strict=True):
        assert abs(mine["match_probability"] - theirs.itm_probability) <= 1e-6


def test_search_ranks_the_gallery_as_the_rank_command_does(server: Server) -> None:
    """/v1/search and `btdeploy rank --gallery` are one ranking of the stored embeddings."""
    from btdeploy.apps.gallery import rank_gallery

    caption = "a man riding a horse"
    status, served = server.json("/v1/search", {"text": caption, "top_k": 3})
    assert status == 200, served
    ranked = rank_gallery(server.export, server.export / "gallery.npz", caption, top_k=3)
    assert served["query"] == "text" and served["stages"] == ranked.stages
    assert ranked.stages == "ITC cosine over 6, top 3 to ITM; ITM on 3 (split graphs, the itc towers' features)"
    _assert_same_rows(served["ranking"], ranked.rows)
    # The query form, without top_k: every image to ITM, each with the probability it had above.
    status, reply = server.request("/v1/search?" + urllib.parse.urlencode({"text": caption}), b"")
    every = json.loads(reply)
    assert (
        status == 200
        and every["stages"] == "ITC cosine over 6, top 6 to ITM; ITM on 6 (split graphs, the itc towers' features)"
    ), every
    assert sorted(r["index"] for r in every["ranking"]) == list(range(6))
    probabilities = [r["match_probability"] for r in every["ranking"]]
    assert probabilities == sorted(probabilities, reverse=True)
    found = {r["index"]: r["match_probability"] for r in every["ranking"]}
    assert all(abs(found[r.index] - r.itm_probability) <= 1e-6 for r in ranked.rows)


def test_search_reads_the_gallery_index_replaced_while_serving(server: Server) -> None:
    """Images indexed while the server runs are searched at once; an image changed since is a 503
    naming it (the operator's to mend, not the client's). The gallery is as it was afterwards."""
    from btdeploy.apps.gallery import index_images

    photos, gallery = server.export / "photos", server.export / "gallery.npz"
    added = photos / "photo6.png"
    added.write_bytes(_png(40))
    index_images(server.export, photos, gallery)
    try:
        status, reply = server.json("/v1/search", {"text": "a cat"})
        assert status == 200 and reply["stages"].startswith("ITC cosine over 7, top 7 to ITM"), reply
        assert "photo6.png" in [row["item"] for row in reply["ranking"]]
        added.write_bytes(_png(41))  # changed, not indexed again
        status, reply = server.json("/v1/search", {"text": "a cat"})
        assert status == 503 and f"{added} changed since {gallery} was indexed: run btdeploy index" in reply["error"]
    finally:
        added.unlink()
        index_images(server.export, photos, gallery)
    status, reply = server.json("/v1/search", {"text": "a cat", "top_k": 2})
    assert (
        status == 200
        and reply["stages"] == "ITC cosine over 6, top 2 to ITM; ITM on 2 (split graphs, the itc towers' features)"
    ), reply


def test_200_concurrent_requests_each_get_their_own_answer(server: Server, runtimes: dict[str, Any]) -> None:
    runtime = runtimes["itm"]
    requests = [sample_inputs(runtime.config, 1 + i % 2, 3 + i % 11, seed=1000 + i) for i in range(200)]
    expected = [runtime(**feeds).logits for feeds in requests]
    _, before = server.json("/v2/stats/batches")

    def call(index: int) -> tuple[int, float]:
        status, reply = server.json("/v2/models/itm/infer", _infer_body(requests[index]))
        if status != 200:
            return status, float("inf")
        return status, float(np.abs(_outputs(reply)["logits"] - expected[index]).max())

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, range(200)))
    assert [status for status, _ in results] == [200] * 200
    assert max(error for _, error in results) <= 1e-4
    _, after = server.json("/v2/stats/batches")
    formed = {int(k): v - before.get("itm", {}).get(k, 0) for k, v in after["itm"].items()}
    assert sum(size * count for size, count in formed.items()) == 200
    assert max(size for size, count in formed.items() if count) > 1, f"no batch merged requests: {formed}"


def _bad_requests(server: Server) -> list[tuple[str, bytes | None, str, int, str]]:
    good = _infer_body(sample_inputs(_config(server), 1, 4))
    wrong_type = json.loads(json.dumps(good))
    wrong_type["inputs"][2]["datatype"] = "FP64"
    wrong_shape = json.loads(json.dumps(good))
    wrong_shape["inputs"][2]["shape"] = [1, 3, 8, 8]
    extra = json.loads(json.dumps(good))
    extra["inputs"].append({**good["inputs"][0], "name": "token_type"})
    png = base64.b64encode(_png(4)).decode()
    long_text = " ".join(["word"] * 600)
    return [
        ("/v2/models/itm/infer", b'{"inputs": [', "application/json", 400, "not valid JSON"),
        ("/v2/models/nope/infer", json.dumps(good).encode(), "application/json", 404, "unknown model 'nope'"),
        (
            "/v2/models/itm/infer",
            json.dumps({"inputs": good["inputs"][:2]}).encode(),
            "application/json",
            400,
            "missing input(s) pixel_values",
        ),
        ("/v2/models/itm/infer", json.dumps(extra).encode(), "application/json", 400, "no input 'token_type'"),
        ("/v2/models/itm/infer", json.dumps(wrong_type).encode(), "application/json", 400, "must be datatype FP32"),
        ("/v2/models/itm/infer", json.dumps(wrong_shape).encode(), "application/json", 400, "has shape [1, 3, 8, 8]"),
        (
            "/v1/itm",
            json.dumps({"image": png, "texts": [long_text]}).encode(),
            "application/json",
            400,
            "longer than the model's",
        ),
        ("/v1/itm?text=a", b"these bytes are no image", "image/png", 415, "not an image file"),
        ("/v1/itm?text=a", b"x" * (MAX_BODY_MB * 1024 * 1024 + 1), "image/png", 413, "the limit is"),
        ("/v1/mlm", json.dumps({"image": png, "texts": ["no mask here"]}).encode(), "application/json", 400, "<mask>"),
        (
            "/v1/mlm?top_k=101",
            json.dumps({"image": png, "texts": ["a <mask>"]}).encode(),
            "application/json",
            400,
            "top_k for the masked words must be 1..100, got 101",
        ),
        (
            "/v1/itm?top_k=2",
            json.dumps({"image": png, "texts": ["a"]}).encode(),
            "application/json",
            400,
            "top_k is taken by /v1/rank and /v1/mlm only",
        ),
        ("/v1/nope", b"{}", "application/json", 404, "unknown task"),
        ("/v1/search?text=a", _png(4), "image/png", 400, "/v1/search takes no image"),
        ("/v1/search?text=a&text=b", b"", "application/json", 400, "against one text, got 2"),
        ("/v1/search", json.dumps({"txt": "a"}).encode(), "application/json", 400, "unknown key 'txt'"),
        ("/v1/search", json.dumps({"text": "a", "top_k": 0}).encode(), "application/json", 400, "at least 1"),
        ("/v1/itc", json.dumps({"image": png, "txts": ["a"]}).encode(), "application/json", 400, "unknown key 'txts'"),
        (
            "/v1/rank",
            json.dumps({"image": png, "texts": ["a", "b"], "top_k": 1.5}).encode(),
            "application/json",
            400,
            "top_k must be a whole number",
        ),
        ("/v1/itm", None, "application/json", 405, "GET /v1/itm: this route takes POST"),
        ("/nope", b"{}", "application/json", 404, "no route POST /nope: see POST /v1/itm"),
    ]


def _config(server: Server) -> Any:
    from btdeploy.runtime.runtime import find_head

    return find_head(server.export, "itm").config


def test_bad_requests_get_a_one_line_reason_and_the_server_keeps_serving(
    server: Server, runtimes: dict[str, Any]
) -> None:
    for path, body, content_type, status, message in _bad_requests(server):
        got, reply = server.request(path, body, content_type)
        assert got == status, (path, reply[:300])
        error = json.loads(reply)["error"]
        assert message in error and "\n" not in error and "Traceback" not in error, error
    feeds = sample_inputs(runtimes["itm"].config, 1, 5)
    status, reply = server.json("/v2/models/itm/infer", _infer_body(feeds))
    assert status == 200 and np.abs(_outputs(reply)["logits"] - runtimes["itm"](**feeds).logits).max() <= 1e-4


def test_metrics_count_requests_and_batches(server: Server) -> None:
    status, body = server.request("/metrics")
    text = body.decode()
    assert status == 200
    counts = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("btdeploy_head_requests_total")
    }
    assert counts['btdeploy_head_requests_total{head="itm"}'] >= 200
    assert 'btdeploy_batch_requests_bucket{head="itm",le="+Inf"}' in text
    assert 'btdeploy_responses_total{route="infer",status="400"}' in text
    assert "ray_" in text  # Ray's own metrics ride along


def test_the_load_generator_reports_what_the_server_did(
    server: Server, runtimes: dict[str, Any], tmp_path: Path
) -> None:
    from btdeploy.bench.load import batches_formed, binary_body, drive, get_json, summarize, write_serve_report

    requests = [sample_inputs(runtimes["itm"].config, 1, 6, seed=700 + i, pad=False) for i in range(12)]
    before = get_json(server.url, "/v2/stats/batches")
    run = drive(server.url, "/v2/models/itm/infer", [binary_body(feeds) for feeds in requests], 6)
    level = summarize("itm fp32", "batching", 6, run)
    level.batch_sizes = batches_formed(before, get_json(server.url, "/v2/stats/batches"), "itm")
    assert (level.requests, level.errors) == (12, 0)
    assert sum(size * count for size, count in level.batch_sizes.items()) == 12
    assert level.p50_ms <= level.p90_ms <= level.p99_ms
    for feeds, answer in zip(requests, run["answers"], strict=True):
        logits = json.loads(answer)["outputs"][0]["data"]
        assert np.abs(np.asarray(logits) - runtimes["itm"](**feeds).logits.ravel()).max() <= 1e-4
    write_serve_report([level], tmp_path, 1, 4, 6, 8)
    assert "| itm fp32 | batching | 6 | 12 |" in (tmp_path / "serve.md").read_text()
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_a_killed_replica_recovers_and_no_request_hangs(server: Server, runtimes: dict[str, Any]) -> None:
    """Runs last: kill -9 the itm replica under load. Every request gets its answer or a clear 503
    within the timeout, and the application brings the replica back by itself."""
    runtime = runtimes["itm"]
    requests = [sample_inputs(runtime.config, 1, 4 + i % 5, seed=5000 + i) for i in range(60)]
    expected = [runtime(**feeds).logits for feeds in requests]
    replica = [pid for pid in ray_processes() if b"head-itm" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(replica) == 1, replica

    def call(index: int) -> tuple[int, str, float]:
        if index == 15:
            os.kill(replica[0], signal.SIGKILL)
        started = time.monotonic()
        status, body = server.request("/v2/models/itm/infer", json.dumps(_infer_body(requests[index])).encode())
        elapsed = time.monotonic() - started
        if status == 200:
            ok = np.abs(_outputs(json.loads(body))["logits"] - expected[index]).max() <= 1e-4
            return status, "ok" if ok else "wrong answer", elapsed
        return status, json.loads(body)["error"], elapsed

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(60)))
    for status, detail, elapsed in results:
        assert (status, detail) == (200, "ok") or status == 503, (status, detail)
        assert elapsed <= TIMEOUT_S + 10
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status, _ = server.request("/v2/models/itm/infer", json.dumps(_infer_body(requests[0])).encode())
        if status == 200:
            break
        time.sleep(2)
    assert status == 200, "the itm replica did not come back"


@pytest.mark.parametrize(
    ("stop", "after_line", "delay_s"),
    [
        # Inside ray.init, while it starts Ray's processes: Ray's own SIGTERM handler ran (exit 15); Ctrl-C
        # there (exit 130) left the same processes behind and is held by the same code.
        (signal.SIGTERM, "starting Ray", 2.0),
        (signal.SIGTERM, "Ray at", 1.5),  # in the first calls into Ray (its compiled code) after it
    ],
    ids=["sigterm-in-ray-init", "sigterm-after-ray-init"],
)
def test_a_stop_while_ray_starts_stops_everything_it_started(
    tiny_export: Path, tmp_path: Path, stop: signal.Signals, after_line: str, delay_s: float
) -> None:
    """A SIGTERM inside ray.init had ended the command with exit 15 (Ray's own handler) and left
    Ray's agent processes running; a stop inside Ray's compiled code had ended it in a traceback."""
    import subprocess
    import sys

    from btdeploy.serve.process import free_port

    before = ray_processes()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "btdeploy.cli", "serve", str(tiny_export), "--heads", "itm"]
    with open(log, "w") as stderr:
        process = subprocess.Popen([*command, "--port", str(free_port())], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while after_line not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, log.read_text()
        time.sleep(delay_s)
        process.send_signal(stop)
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    printed = log.read_text()
    assert status == 0 and "stopping" in printed and "stopped" in printed, printed
    assert "Traceback" not in printed and "btdeploy: error" not in printed, printed
    assert not ray_processes_left(before), f"Ray processes left behind: {printed}"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm-to-the-group", "sigint-to-the-group"])
def test_a_stop_sent_to_the_whole_process_group_stops_everything_without_the_controller_wait(
    tiny_export: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    """`timeout`, CI runners and a terminal's Ctrl-C signal the whole process group, the Ray node's
    own processes included. A SIGTERM so sent ends Ray's dashboard and log monitor as it reaches
    the command, and Serve's graceful shutdown had then waited its full 30 s ("Controller failed to
    shut down within 30.0s") before Ray was taken down; a SIGINT, which Ray blocks in them, never
    had that wait."""
    import subprocess
    import sys

    from btdeploy.serve.process import free_port

    before = ray_processes()
    log, out = tmp_path / "serve.log", tmp_path / "serve.out"
    command = [sys.executable, "-m", "btdeploy.cli", "serve", str(tiny_export), "--heads", "itm"]
    with open(log, "w") as stderr, open(out, "w") as stdout:
        process = subprocess.Popen(
            [*command, "--port", str(free_port())], stdout=stdout, stderr=stderr, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while "ready on" not in out.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None and "ready on" in out.read_text(), log.read_text()
        os.killpg(process.pid, stop)
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    printed = log.read_text()
    assert status == 0 and "stopping" in printed and "stopped" in printed, printed
    assert "Controller failed to shut down" not in printed, printed
    assert "Traceback" not in printed and "btdeploy: error" not in printed, printed
    assert not ray_processes_left(before), f"Ray processes left behind: {printed}"


def test_a_replica_that_cannot_start_is_one_line_with_its_own_error(tiny_export: Path, tmp_path: Path) -> None:
    """A processor that parses but that transformers cannot read passes serve's checks and fails in
    the replica: serve.run had ended the command in a traceback naming only the deployment."""
    import shutil
    import subprocess
    import sys

    from btdeploy.serve.process import free_port

    export = tmp_path / "export"
    shutil.copytree(tiny_export / "itm", export / "itm")
    (export / "itm" / "processor" / "tokenizer.json").write_text("{}")
    before = ray_processes()
    command = [sys.executable, "-m", "btdeploy.cli", "serve", str(export), "--heads", "itm"]
    done = subprocess.run([*command, "--port", str(free_port())], capture_output=True, text=True, timeout=300)
    assert not ray_processes_left(before), f"Ray processes left behind: {done.stderr}"
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    processor = export / "itm" / "processor"
    assert last.startswith(f"btdeploy: error: a replica did not start: {processor} cannot be read as the head's"), last
    logs = last.rsplit("(Ray's logs: ", 1)[-1].rstrip(")")
    assert Path(logs).is_dir() and any(Path(logs).glob("controller_*.log")), last
