"""The serving layer's pure parts, without a server: protocol decoding, batch merging, tasks, cache, metrics."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.model.inputs import sample_inputs
from btdeploy.serve.batching import merge_requests, split_outputs, text_axes
from btdeploy.serve.feature_cache import FeatureCache
from btdeploy.serve.metrics import ServeStats
from btdeploy.serve.protocol import ModelSignature, RequestError, binary_outputs_requested
from btdeploy.serve.settings import ServeSettings, check_settings, replica_cpus, replicas_spin
from btdeploy.serve.tasks import decode_image, parse_task_request


def _request(feeds: dict[str, np.ndarray], **extra: object) -> bytes:
    datatypes = {np.dtype("int64"): "INT64", np.dtype("float32"): "FP32"}
    inputs = [
        {"name": k, "shape": list(v.shape), "datatype": datatypes[v.dtype], "data": v.ravel().tolist()}
        for k, v in feeds.items()
    ]
    return json.dumps({"inputs": inputs, **extra}).encode()


@pytest.fixture(scope="module")
def itm_signature(tiny_export: Path) -> tuple[ModelSignature, object]:
    from btdeploy.runtime.runtime import find_head

    manifest = find_head(tiny_export, "itm")
    return ModelSignature.from_manifest(manifest), manifest.config


def test_signature_comes_from_the_manifest(itm_signature: tuple[ModelSignature, object]) -> None:
    signature, config = itm_signature
    size = config.vision_config.image_size  # type: ignore[attr-defined]
    assert [(s.name, s.datatype, s.shape) for s in signature.inputs] == [
        ("input_ids", "INT64", (-1, -1)),
        ("attention_mask", "INT64", (-1, -1)),
        ("pixel_values", "FP32", (-1, 3, size, size)),
    ]
    assert [(s.name, s.shape) for s in signature.outputs] == [("logits", (-1, 2))]


def test_decode_round_trips_json_and_binary(itm_signature: tuple[ModelSignature, object]) -> None:
    signature, config = itm_signature
    feeds = sample_inputs(config, 2, 6)
    decoded, outputs, request_id = signature.decode(_request(feeds, id="r1"))
    assert outputs == ["logits"] and request_id == "r1"
    for name, value in feeds.items():
        np.testing.assert_array_equal(decoded[name], value)
    # Triton's binary extension: JSON header, then the raw tensors in input order.
    header = {"inputs": [], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    for name, value in feeds.items():
        datatype = "INT64" if value.dtype == np.int64 else "FP32"
        entry = {"name": name, "shape": list(value.shape), "datatype": datatype}
        header["inputs"].append({**entry, "parameters": {"binary_data_size": value.nbytes}})
    text = json.dumps(header).encode()
    body = text + b"".join(v.tobytes() for v in feeds.values())
    decoded, _, _ = signature.decode(body, str(len(text)))
    for name, value in feeds.items():
        np.testing.assert_array_equal(decoded[name], value)
    assert binary_outputs_requested(body, str(len(text)), ["logits"]) == {"logits"}
    content, headers = signature.response({"logits": np.ones((2, 2), np.float32)}, ["logits"], "", {"logits"})
    length = int(headers["Inference-Header-Content-Length"])
    assert np.frombuffer(content[length:], np.float32).tolist() == [1.0] * 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(inputs=r["inputs"][:2]), "missing input(s) pixel_values"),
        (lambda r: r["inputs"].append({**r["inputs"][0], "name": "extra"}), "has no input 'extra'"),
        (lambda r: r["inputs"][0].update(datatype="FP32"), "must be datatype INT64"),
        (lambda r: r["inputs"][2].update(shape=[2, 3, 5, 5]), "model takes [-1, 3,"),
        (lambda r: r["inputs"][0].update(data=r["inputs"][0]["data"][:-1]), "its shape [2, 6] needs 12"),
        (lambda r: r["inputs"][0].update(data=[0.5] * 12), "must hold INT64 numbers only"),
        (lambda r: r["inputs"].append(r["inputs"][0]), "given twice"),
        (lambda r: r.update(outputs=[{"name": "nope"}]), "has no output(s) nope"),
    ],
)
def test_decode_refuses_bad_tensors(
    itm_signature: tuple[ModelSignature, object], change: Callable[[dict[str, Any]], object], message: str
) -> None:
    signature, config = itm_signature
    request = json.loads(_request(sample_inputs(config, 2, 6)))
    change(request)
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        signature.decode(json.dumps(request).encode())
    assert e.value.status == 400


def test_decode_refuses_malformed_json(itm_signature: tuple[ModelSignature, object]) -> None:
    with pytest.raises(RequestError, match="not valid JSON"):
        itm_signature[0].decode(b'{"inputs": [')


@pytest.mark.parametrize("head_name", ["itm", "mlm", "base"])
def test_merged_batch_gives_each_request_its_own_answer(tiny_export: Path, head_name: str) -> None:
    """Requests of different text lengths, padded into one batch and split back, equal separate runs."""
    from btdeploy.runtime.runtime import load

    runtime = load(tiny_export, head=head_name)
    requests = [
        sample_inputs(runtime.config, rows, length, seed=rows * 10 + length)
        for rows, length in [(1, 4), (2, 9), (1, 2)]
    ]
    merged, slices = merge_requests(requests, int(runtime.config.text_config.pad_token_id))
    assert merged["input_ids"].shape == (4, 9)
    together = runtime(**merged)
    parts = split_outputs(
        {k: np.asarray(together[k]) for k in together}, slices, text_axes(get_head(head_name), runtime.config)
    )
    for request, part in zip(requests, parts, strict=True):
        alone = runtime(**request)
        for name in get_head(head_name).output_names:
            assert part[name].shape == np.asarray(alone[name]).shape
            assert np.abs(part[name] - np.asarray(alone[name])).max() <= 1e-4, name


def _png(seed: int = 0, size: tuple[int, int] = (40, 50)) -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_task_requests_json_and_raw() -> None:
    png = _png()
    body = json.dumps({"image": base64.b64encode(png).decode(), "texts": ["a", "b"]}).encode()
    parsed = parse_task_request(body, "application/json", [], 8)
    assert parsed.images == [png] and parsed.texts == ["a", "b"]
    parsed = parse_task_request(png, "image/png", ["x"], 8, "3", route="/v1/rank")
    assert parsed.images == [png] and parsed.texts == ["x"] and parsed.top_k == 3
    ranked = json.dumps({"image": base64.b64encode(png).decode(), "texts": ["a"], "top_k": 2}).encode()
    assert parse_task_request(ranked, "application/json", [], 8, route="/v1/rank").top_k == 2
    assert decode_image(png, 0, _image_processor()).size == (50, 40)


@pytest.mark.parametrize(
    ("body", "content_type", "texts", "status", "message"),
    [
        (b"{", "application/json", [], 400, "not valid JSON"),
        (b'{"texts": ["a"]}', "application/json", [], 400, "no image"),
        (b'{"image": "***", "texts": ["a"]}', "application/json", [], 400, "not valid base64"),
        (b"rawbytes", "image/png", [], 400, "no text"),
        (b'{"image": "", "texts": ["a", "b", "c"]}', "application/json", [], 413, "at most 2"),
        (b'{"image": "", "texts": [""]}', "application/json", [], 400, "non-empty string"),
        # A misspelled key is named, not read as "no texts".
        (b'{"image": "", "txts": ["a"]}', "application/json", [], 400, "unknown key 'txts': /v1/itm takes"),
        (b'{"image": "", "text": ["a", "b"]}', "application/json", [], 400, 'give a list as "texts"'),
        (b'{"image": "", "texts": ["a"], "top_k": 1}', "application/json", [], 400, "unknown key 'top_k'"),
    ],
)
def test_task_requests_refused(body: bytes, content_type: str, texts: list[str], status: int, message: str) -> None:
    with pytest.raises(RequestError, match=message) as error:
        parse_task_request(body, content_type, texts, 2)
    assert error.value.status == status


@pytest.mark.parametrize("top_k", [1.5, True, "2.0", "two", [2]])
def test_rank_top_k_must_be_a_whole_number(top_k: object) -> None:
    body = json.dumps({"image": "", "texts": ["a"], "top_k": top_k}).encode()
    with pytest.raises(RequestError, match="top_k must be a whole number") as error:
        parse_task_request(body, "application/json", [], 2, route="/v1/rank")
    assert error.value.status == 400


def test_a_json_request_does_not_also_take_query_texts_or_top_k() -> None:
    body = json.dumps({"image": "", "texts": ["a"], "top_k": 1}).encode()
    with pytest.raises(RequestError, match="in the JSON body or as \\?text=, not both"):
        parse_task_request(body, "application/json", ["b"], 2, route="/v1/rank")
    with pytest.raises(RequestError, match="in the JSON body or as \\?top_k=, not both"):
        parse_task_request(body, "application/json", [], 2, "2", route="/v1/rank")


def test_top_k_is_taken_by_rank_and_mlm_only() -> None:
    """/v1/mlm ranks the tokens for each <mask>; /v1/itm and /v1/itc have one answer per text."""
    with pytest.raises(RequestError, match="top_k is taken by /v1/rank and /v1/mlm only"):
        parse_task_request(_png(), "image/png", ["x"], 2, "3")
    with pytest.raises(RequestError, match="unknown key 'top_k': /v1/itc takes image, images, text, texts$"):
        parse_task_request(b'{"image": "", "texts": ["a"], "top_k": 1}', "application/json", [], 2, route="/v1/itc")
    assert parse_task_request(_png(), "image/png", ["a <mask>"], 2, "4", route="/v1/mlm").top_k == 4
    body = json.dumps({"image": base64.b64encode(_png()).decode(), "texts": ["a <mask>"], "top_k": 5}).encode()
    assert parse_task_request(body, "application/json", [], 2, route="/v1/mlm").top_k == 5


def _image_processor() -> object:
    from transformers import BridgeTowerImageProcessor

    edge = {"shortest_edge": 64}  # the tiny preset's: it resizes images up to 3.4 times as long as wide
    return BridgeTowerImageProcessor(size=edge, crop_size=edge, do_center_crop=True, size_divisor=32)


def test_bytes_that_are_not_an_image() -> None:
    with pytest.raises(RequestError, match="not an image file") as error:
        decode_image(b"GIF89a but not really", 0, _image_processor())
    assert error.value.status == 415


def test_an_image_past_the_decompression_limit_is_a_413() -> None:
    from PIL import Image

    encoded = io.BytesIO()
    Image.new("1", (15000, 15000)).save(encoded, format="PNG")  # 225 megapixels in 27 kB
    with pytest.raises(RequestError, match="image 1 is past PIL's decompression limit") as error:
        decode_image(encoded.getvalue(), 1, _image_processor())
    assert error.value.status == 413


def test_an_image_the_processor_cannot_resize_is_a_400() -> None:
    with pytest.raises(RequestError, match=r"image 2 is 200x40 pixels, more than 3.4 times as long") as error:
        decode_image(_png(size=(40, 200)), 2, _image_processor())
    assert error.value.status == 400


def test_feature_cache_is_bounded_least_recently_used_first() -> None:
    cache = FeatureCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 1)


def test_feature_cache_shared_by_the_rank_endpoints_threads() -> None:
    """The rank endpoint runs each request in a worker thread, all on one cache: a key one thread
    found could be evicted by another before it was moved to the end (KeyError, an HTTP 500)."""
    cache = FeatureCache(2)
    errors: list[str] = []

    def requests(offset: int) -> None:
        for i in range(50_000):
            key = str((i + offset) % 3)  # three images on a cache of two: every get races an eviction
            try:
                if cache.get(key) is None:
                    cache.put(key, i)
            except Exception as error:  # what the request would have failed with
                errors.append(repr(error))
                return

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often enough to meet inside get() within a second
    try:
        threads = [threading.Thread(target=requests, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switching)
    assert errors == [] and len(cache) == 2
    assert cache.hits + cache.misses == 4 * 50_000


def test_metrics_text_counts_batches() -> None:
    stats = ServeStats()
    stats.record_batch("itm", 3, 5, 0.02)
    stats.record_batch("itm", 1, 1, 0.01)
    stats.record_request("infer", 200, 0.03)
    text = stats.prometheus()
    assert 'btdeploy_head_requests_total{head="itm"} 4' in text
    assert 'btdeploy_batch_requests_bucket{head="itm",le="2"} 1' in text
    assert 'btdeploy_batch_requests_bucket{head="itm",le="4"} 2' in text
    assert 'btdeploy_responses_total{route="infer",status="200"} 1' in text
    assert stats.batch_sizes() == {"itm": {1: 1, 3: 1}}


def test_replica_cpus_share_the_machine() -> None:
    settings = ServeSettings(export_dir=".")
    assert replica_cpus(settings, 5, 2.0) == pytest.approx(0.38)  # 4 heads + rank on 2 cores
    with pytest.raises(BtDeployError, match="need 2.6 CPUs, the Ray cluster has 2"):
        replica_cpus(ServeSettings(export_dir=".", replica_cpus=0.5), 5, 2.0)


def test_replicas_spin_only_where_one_may_run() -> None:
    from btdeploy.backends.targets import get_target

    one = ServeSettings(export_dir=".")
    assert replicas_spin(one, 1) is True
    assert replicas_spin(one, 2) is False  # two heads, one replica each
    assert replicas_spin(ServeSettings(export_dir=".", replicas=2), 1) is False
    assert replicas_spin(ServeSettings(export_dir=".", max_replicas=3), 1) is False  # autoscaling may add some
    assert replicas_spin(ServeSettings(export_dir=".", spin=True), 5) is True  # as asked
    assert replicas_spin(ServeSettings(export_dir=".", spin=False), 1) is False
    for asked in (False, True):
        options = ServeSettings(export_dir=".", spin=asked).run_options(split=False)
        assert get_target("onnxruntime").resolve(options).spin is asked
    # exact sums by default; --no-exact-sums reaches the replicas' options the same way
    for asked in (False, True):
        options = ServeSettings(export_dir=".", precision="int8-dynamic", exact_sums=asked).run_options(split=False)
        assert get_target("onnxruntime").resolve(options).exact_sums is asked


def test_settings_refuse_a_port_in_use(tiny_export: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BtDeployError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_settings(ServeSettings(export_dir=str(tiny_export), heads=("itm",), port=port))


@pytest.mark.parametrize(("address", "auth_mode", "names_token_auth"), [
    ("10.0.0.7:6379", None, True),
    ("10.0.0.7:6379", "token", False),  # set already: the token itself was refused, or something else
    ("auto", None, False),  # Ray sends a token it finds to auto unasked
    ("ray://10.0.0.7:6379", "token", False),
])  # fmt: skip
def test_a_failed_join_names_the_address_and_token_authentication(
    monkeypatch: pytest.MonkeyPatch, address: str, auth_mode: str | None, names_token_auth: bool
) -> None:
    """Ray 2.60's `ray start` turns token authentication on where a token exists, and ray.init sends
    it to an explicit address only with RAY_AUTH_MODE=token: joining failed with Ray's
    'Failed to connect', read by the CLI as an OSError ('check the path')."""
    from btdeploy.serve.server import _join_failure

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    if auth_mode is not None:
        monkeypatch.setenv("RAY_AUTH_MODE", auth_mode)
    message = str(_join_failure(address, ConnectionError("Failed to connect to Ray cluster at 10.0.0.7:6379")))
    assert message.startswith(f"could not join the Ray cluster at {address} (Failed to connect"), message
    assert "leave --address out to start Ray here" in message
    assert ("set RAY_AUTH_MODE=token" in message) is names_token_auth, message
    # The GCS port given with ray://, or the Ray Client's without it: which port each form takes.
    assert ("a ray:// address takes the Ray Client server's port" in message) is address.startswith("ray://")
    assert ("HOST:PORT is the head's GCS port" in message) is (address == "10.0.0.7:6379"), message


@pytest.mark.parametrize(("running", "asked", "refused"), [
    (("127.0.0.1", 8000), ("127.0.0.1", 8000), False),
    (("0.0.0.0", 8000), ("127.0.0.1", 8000), False),  # listens on every address, loopback too
    (("127.0.0.1", 8000), ("127.0.0.1", 8124), True),
    (("10.0.0.7", 8000), ("127.0.0.1", 8000), True),
])  # fmt: skip
def test_joining_refuses_an_http_place_serve_does_not_listen_on(
    running: tuple[str, int], asked: tuple[str, int], refused: bool
) -> None:
    """A cluster's running Serve keeps its HTTP options: `--port 8124` had waited 300 s at a port
    nothing listened on, then said the head 'did not become ready'."""
    from btdeploy.serve.server import _require_serve_http

    settings = ServeSettings(export_dir=".", host=asked[0], port=asked[1])
    if not refused:
        _require_serve_http(running, settings)
        return
    expected = f"Serve already runs on this Ray cluster and listens on {running[0]}:{running[1]}"
    with pytest.raises(BtDeployError, match=re.escape(expected)) as error:
        _require_serve_http(running, settings)
    assert f"pass --host {running[0]} --port {running[1]}" in str(error.value)


class _AuthenticationError(Exception):  # stands for ray.exceptions.AuthenticationError
    pass


def _serve_with_fake_ray(monkeypatch: pytest.MonkeyPatch, settings: ServeSettings, init: Any) -> int:
    """serve_export with a stand-in for Ray whose ray.init is `init`, and the address check off."""
    from types import SimpleNamespace

    from btdeploy.serve import settings as settings_module
    from btdeploy.serve.server import serve_export

    exceptions = SimpleNamespace(AuthenticationError=_AuthenticationError)
    ray = SimpleNamespace(init=init, is_initialized=lambda: False, serve=SimpleNamespace(), exceptions=exceptions)
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", ray.serve)
    app = SimpleNamespace(APP_NAME="btdeploy", NAMESPACE="btdeploy", build_application=None, collector=None)
    monkeypatch.setitem(sys.modules, "btdeploy.serve.app", app)  # it imports Ray Serve
    monkeypatch.setattr(settings_module, "check_cluster_address", lambda address: None)
    return serve_export(settings)


@pytest.mark.parametrize(("address", "asked"), [(None, "local"), ("10.0.0.7:6379", "10.0.0.7:6379")])
def test_serve_starts_a_ray_of_its_own_unless_asked_to_join(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, address: str | None, asked: str
) -> None:
    """Left without an address, ray.init joins a cluster that `ray start` began on this machine:
    the command, believing it had started Ray, then stopped that cluster's Serve and every
    application on it. ("local" starts a new Ray even beside a running one.)"""
    from btdeploy.serve.process import free_port

    addresses = []

    def init(address: str | None = None, **options: object) -> None:
        addresses.append(address)
        raise KeyboardInterrupt  # a stop: nothing past ray.init is needed here

    settings = ServeSettings(export_dir=str(tiny_export), heads=("itm",), address=address, port=free_port())
    assert _serve_with_fake_ray(monkeypatch, settings, init) == 0
    assert addresses == [asked]


def test_joining_with_token_authentication_and_no_token_says_where_the_token_goes(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAY_AUTH_MODE=token where no token file exists: ray.init raised Ray's AuthenticationError,
    which the CLI printed as a traceback."""
    from btdeploy.serve.process import free_port

    def init(address: str | None = None, **options: object) -> None:
        raise _AuthenticationError(
            "Token authentication is enabled but no authentication token was found. Ensure that ..."
        )

    settings = ServeSettings(export_dir=str(tiny_export), heads=("itm",), address="10.0.0.7:6379", port=free_port())
    with pytest.raises(BtDeployError) as error:
        _serve_with_fake_ray(monkeypatch, settings, init)
    message = str(error.value)
    assert message.startswith(
        "could not join the Ray cluster at 10.0.0.7:6379 (Token authentication is enabled but no"
        " authentication token was found): put the cluster's token in RAY_AUTH_TOKEN"
    ), message
    assert "unset RAY_AUTH_MODE" in message


@pytest.mark.parametrize("missing", ["ray", "ray.serve"])
def test_serve_without_ray_serve_says_what_to_install(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """Without the serve extra, `btdeploy serve` ended in a ModuleNotFoundError traceback from its
    `import ray`. (ray.serve missing: Ray installed without Serve's own dependencies.)"""
    from btdeploy.cli import main
    from btdeploy.serve.process import free_port

    monkeypatch.setitem(sys.modules, missing, None)  # `import` of it now fails as if it were not installed
    package, _, module = missing.partition(".")
    if module and package in sys.modules:  # imported by an earlier test in this process:
        # `from ray import serve` would find the attribute on the package first
        monkeypatch.delattr(sys.modules[package], module, raising=False)
    assert main(["serve", str(tiny_export), "--heads", "itm", "--port", str(free_port())]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("btdeploy: error: btdeploy serve needs Ray Serve, which is not installed here"), error
    assert error.endswith("pip install 'btdeploy[serve]'") and "Traceback" not in error


def test_a_stop_while_joining_gets_through_rays_retries() -> None:
    """Ray's connection retries catch Exception: a SIGTERM raised as one was swallowed there, and
    `btdeploy serve --address` kept retrying for minutes after it."""
    import os
    import signal
    import time
    from types import SimpleNamespace

    from btdeploy.serve.server import _stops_held_through
    from btdeploy.signals import Terminated

    attempts = 0

    def join_with_retries() -> None:  # the shape of ray._private.node.Node._init_gcs_client
        nonlocal attempts
        for _ in range(20):
            attempts += 1
            try:
                if attempts == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            except Exception:
                continue

    ray = SimpleNamespace(_private=SimpleNamespace(utils=SimpleNamespace(set_sigterm_handler=print)))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), _stops_held_through(ray, hold=False):
        join_with_retries()
    assert attempts == 1
    assert signal.getsignal(signal.SIGTERM) is before  # restored on the way out


def test_a_stop_signal_the_process_ignores_does_not_stop_rays_start(capsys: pytest.CaptureFixture[str]) -> None:
    """`nohup btdeploy serve ... &` from a script ignores SIGINT: a SIGINT while Ray starts had been
    taken as a stop (held, then raised), though the server heeds none once started."""
    import os
    import signal
    from types import SimpleNamespace

    from btdeploy.serve.server import _stops_held_through
    from btdeploy.signals import restore_handler

    ray = SimpleNamespace(_private=SimpleNamespace(utils=SimpleNamespace(set_sigterm_handler=print)))
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _stops_held_through(ray, hold=True):
            os.kill(os.getpid(), signal.SIGINT)
            inside = signal.getsignal(signal.SIGINT)
        after = signal.getsignal(signal.SIGINT)
    finally:
        restore_handler(signal.SIGINT, before)
    assert inside is signal.SIG_IGN and after is signal.SIG_IGN
    assert "stopping once Ray has started" not in capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    ({"port": 70000}, "--port 70000 is not a TCP port: give one in 1..65535"),
    ({"port": 0}, "--port 0 is not a TCP port"),
    ({"replica_cpus": 100.0}, "--replica-cpus 100.0 must be above 0 and at most 64"),
    ({"threads": -2}, "--threads -2 must not be negative (0 or left out: every core)"),
    ({"timeout_s": 0.0}, "--timeout 0 must be above 0 seconds"),
    ({"max_body_mb": -1.0}, "--max-body-mb -1 must be above 0"),
    ({"max_texts": 0}, "max_texts 0 must be at least 1"),
    ({"feature_cache": -5}, "--feature-cache -5 must not be negative (0 keeps none)"),
])  # fmt: skip
def test_settings_refuse_values_out_of_range(tiny_export: Path, change: dict[str, object], message: str) -> None:
    settings = ServeSettings(export_dir=str(tiny_export), heads=("itm",), **change)  # type: ignore[arg-type]
    with pytest.raises(BtDeployError, match=re.escape(message)):
        check_settings(settings)


def test_settings_refuse_heads_from_two_checkpoints(tiny_export: Path, tmp_path: Path) -> None:
    """One processor serves every head: heads exported from different checkpoints are refused
    (before Ray starts), as rank refuses to combine them."""
    import shutil

    from btdeploy.export.exporter import export_head
    from btdeploy.model.checkpoints import resolve_model

    out = tmp_path / "out"
    shutil.copytree(tiny_export / "itm", out / "itm")
    export_head(resolve_model("tiny", seed=1), "itc", out)
    with pytest.raises(BtDeployError, match=r"one processor, but they were exported from different checkpoints: "):
        check_settings(ServeSettings(export_dir=str(out), port=8999))
    assert check_settings(ServeSettings(export_dir=str(out), heads=("itm",), port=8999)).keys() == {"itm"}


def test_settings_name_the_missing_graph(tiny_export: Path) -> None:
    with pytest.raises(BtDeployError, match="btdeploy quantize"):
        check_settings(ServeSettings(export_dir=str(tiny_export), heads=("itm",), precision="int8", flavour="ort"))
    with pytest.raises(BtDeployError, match="export with --split"):
        check_settings(ServeSettings(export_dir=str(tiny_export), heads=("itm",), split=True))


def test_the_replica_error_is_the_last_one_logged_since_the_deploy_began(tmp_path: Path) -> None:
    """A cluster joined may have logged other applications' errors before this deploy: only what
    Serve's controller wrote after serve.run began names the replica's error."""
    from btdeploy.serve.server import _log_sizes, replica_error

    log = tmp_path / "controller_123.log"
    log.write_text("Traceback (most recent call last):\nValueError: another application's replica\n")
    before = _log_sizes(tmp_path)
    assert replica_error(tmp_path, before) is None
    with open(log, "a") as stream:
        stream.write("INFO deploying\n  raise BtDeployError(\nbtdeploy.errors.BtDeployError: first problem\n")
        stream.write("Traceback (most recent call last):\nray.exceptions.RayActorError: the actor died\n")
    assert replica_error(tmp_path, before) == "RayActorError: the actor died"
    (tmp_path / "controller_456.log").write_text("btdeploy.errors.BtDeployError: the graph is damaged\n")
    assert replica_error(tmp_path, before) == "the graph is damaged"  # a restarted controller's log, read whole


def test_a_search_request_is_one_text_and_an_optional_top_k() -> None:
    from btdeploy.serve.tasks import parse_search_request

    parsed = parse_search_request(json.dumps({"text": "a cat", "top_k": 3}).encode(), "application/json", [], None)
    assert (parsed.texts, parsed.top_k, parsed.images) == (["a cat"], 3, [])
    parsed = parse_search_request(b"", "", ["a dog"], "2")
    assert (parsed.texts, parsed.top_k) == (["a dog"], 2)
    assert parse_search_request(b"", "application/json", ["a dog"], None).top_k is None
    refusals = [
        ((b"\x89PNG...", "image/png", ["a"], None), "/v1/search takes no image"),
        ((json.dumps({"text": "a"}).encode(), "application/json", ["b"], None), "in the JSON body or in the query"),
        ((json.dumps({"texts": ["a"]}).encode(), "application/json", [], None), "unknown key 'texts'"),
        ((json.dumps(["a"]).encode(), "application/json", [], None), "a search request is a JSON object"),
        ((b"", "", [], None), "against one text, got 0"),
        ((b"", "", ["a", "b"], None), "against one text, got 2"),
        ((b"", "", [" "], None), "a non-empty string"),
        ((json.dumps({"text": 7}).encode(), "application/json", [], None), "a non-empty string"),
        ((b"", "", ["a"], "1.5"), "top_k must be a whole number"),
    ]
    for arguments, message in refusals:
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_search_request(*arguments)


def test_a_search_of_captions_takes_one_image() -> None:
    from btdeploy.serve.tasks import parse_search_request

    png = b"\x89PNG\r\n\x1a\n..."
    body = json.dumps({"image": base64.b64encode(png).decode(), "top_k": 2}).encode()
    parsed = parse_search_request(body, "application/json", [], None, takes="image")
    assert (parsed.images, parsed.texts, parsed.top_k) == ([png], [], 2)
    parsed = parse_search_request(png, "image/png", [], "4", takes="image")
    assert (parsed.images, parsed.top_k) == ([png], 4)
    refusals = [
        ((b"", "", ["a cat"], None), "this server's gallery holds captions: /v1/search ranks them against an image"),
        ((b"", "", [], None), "no image: send"),
        ((json.dumps({"text": "a"}).encode(), "application/json", [], None), "takes image, top_k"),
        ((json.dumps({"image": "%%"}).encode(), "application/json", [], None), "image 0 is not valid base64"),
    ]
    for arguments, message in refusals:
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_search_request(*arguments, takes="image")
