"""`btdeploy serve --backend`: what each backend's replicas are made with, and what is refused before Ray starts."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from btdeploy.errors import BtDeployError
from btdeploy.model.heads import get_head
from btdeploy.model.inputs import sample_inputs
from btdeploy.serve.batching import merge_requests, split_outputs, text_axes
from btdeploy.serve.process import free_port
from btdeploy.serve.settings import ServeSettings, check_settings, rank_unserved, replicas_spin, serves_rank


def test_openvino_settings_are_checked_and_leave_out_onnxruntimes_options(tiny_export: Path) -> None:
    from btdeploy.backends.targets import get_target

    settings = ServeSettings(export_dir=str(tiny_export), heads=("itm", "mlm"), backend="openvino", port=free_port())
    assert check_settings(settings).keys() == {"itm", "mlm"}
    assert replicas_spin(settings, 1) is None  # OpenVINO has no spinning workers to set
    assert replicas_spin(ServeSettings(export_dir="."), 1) is True  # ONNX Runtime's, as before
    resolved = get_target("openvino").resolve(settings.run_options(split=False))
    assert (resolved.flavour, str(resolved.precision)) == (None, "fp32")


@pytest.mark.parametrize(("change", "message"), [
    ({"backend": "tensorrt"}, "--backend tensorrt: serve runs onnxruntime or openvino (TensorRT engines are served"),
    ({"spin": False}, "--spin/--no-spin sets ONNX Runtime's workers; the openvino backend has none: leave it out"),
    ({"exact_sums": False, "precision": "int8", "flavour": "trt"}, "does not take 'exact_sums'"),
    ({"split": True}, "has no split graphs: export with --split, or serve without --split"),
    ({"precision": "int8-dynamic"}, "int8-dynamic is run as int8-dynamic ort on onnxruntime"),
])  # fmt: skip
def test_what_openvino_cannot_serve_is_one_line(tiny_export: Path, change: dict[str, Any], message: str) -> None:
    asked: dict[str, Any] = {"backend": "openvino", **change}
    settings = ServeSettings(export_dir=str(tiny_export), heads=("itm",), port=free_port(), **asked)
    with pytest.raises(BtDeployError, match=re.escape(message)):
        check_settings(settings)


def test_rank_is_served_where_the_backend_runs_the_split_towers() -> None:
    # Stand-ins for manifests: only their stems and folder are read.
    split: dict[str, Any] = {"itm": SimpleNamespace(stems=("text", "vision", "fusion"))}
    whole: dict[str, Any] = {"itm": SimpleNamespace(stems=("model",), folder=Path("out/itm"))}
    assert serves_rank(ServeSettings(export_dir="."), split) is True
    assert serves_rank(ServeSettings(export_dir="."), whole) is False
    assert serves_rank(ServeSettings(export_dir=".", backend="openvino"), split) is True
    assert rank_unserved("torch", split["itm"]) == (
        "the torch backend does not run the split towers that /v1/rank scores with"
    )
    assert serves_rank(ServeSettings(export_dir="."), {"itc": split["itm"]}) is False


@pytest.mark.parametrize("head_name", ["itm", "mlm"])
def test_a_head_replica_runs_on_the_backend_asked_for(
    tiny_export: Path, head_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica made with the arguments the application binds runs OpenVINO, and a merged batch
    of requests of different lengths gives each request the answer ONNX Runtime gives it alone."""
    from btdeploy.backends.openvino import OpenVinoBackend
    from btdeploy.runtime.runtime import load
    from btdeploy.serve import app

    monkeypatch.setattr(app, "collector", lambda: SimpleNamespace(record_batch=None))  # no Ray here
    settings = ServeSettings(export_dir=str(tiny_export), backend="openvino", max_batch=4)
    folder = str(tiny_export / head_name)
    replica = app.HeadModel.func_or_class(*app.head_model_arguments(settings, folder))  # type: ignore[attr-defined]
    assert isinstance(replica.runtime.backend, OpenVinoBackend)

    reference = load(tiny_export, head=head_name)
    requests = [sample_inputs(reference.config, rows, length, seed=rows + length) for rows, length in [(1, 4), (2, 9)]]
    merged, slices = merge_requests(requests, int(reference.config.text_config.pad_token_id))
    parts = split_outputs(replica._run(merged), slices, text_axes(get_head(head_name), reference.config))
    for request, part in zip(requests, parts, strict=True):
        alone = reference(**request)
        for name in get_head(head_name).output_names:
            assert part[name].shape == np.asarray(alone[name]).shape
            assert np.abs(part[name] - np.asarray(alone[name])).max() <= 1e-4, name


def _counting_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every graph run of the runtimes `load` makes from now on: (graph, rows, text length or 0)."""
    from btdeploy.runtime import runtime as runtime_module

    runs: list[tuple[str, int, int]] = []
    real_load = runtime_module.load

    def counted(graph: str, run: Any) -> Any:
        def run_and_count(*feeds: dict[str, np.ndarray]) -> Any:
            mask = next((f["attention_mask"] for f in feeds if "attention_mask" in f), None)
            rows = len(next(iter(feeds[0].values())))
            runs.append((graph, rows, 0 if mask is None else int(mask.shape[1])))
            return run(*feeds)

        return run_and_count

    def counting_load(*arguments: Any, **options: Any) -> Any:
        runtime = real_load(*arguments, **options)
        graphs = ("vision", "text", "fusion") if options.get("split") else ("run",)
        for graph in graphs:
            setattr(runtime.backend, graph, counted(graph, getattr(runtime.backend, graph)))
        return runtime

    monkeypatch.setattr(runtime_module, "load", counting_load)
    return runs


@pytest.mark.parametrize(("backend", "max_batch", "rows"), [
    ("onnxruntime", 16, [1]),  # ONNX Runtime's first batch of 16 costs what the next one does
    ("openvino", 16, [1, 16]),  # OpenVINO compiles for each new shape: the largest batch runs too
    ("openvino", 1, [1]),  # no batching, no batch to run
])  # fmt: skip
def test_a_replica_runs_the_shapes_it_serves_before_it_takes_requests(
    tiny_export: Path, backend: str, max_batch: int, rows: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenVINO compiles on its first inference and for each new batch size (seconds at base size):
    the replica pays it while it starts, not the first requests."""
    from btdeploy.serve import app

    runs = _counting_runs(monkeypatch)
    monkeypatch.setattr(app, "collector", lambda: SimpleNamespace(record_batch=None))  # no Ray here
    settings = ServeSettings(export_dir=str(tiny_export), backend=backend, max_batch=max_batch)
    app.HeadModel.func_or_class(*app.head_model_arguments(settings, str(tiny_export / "itm")))  # type: ignore[attr-defined]
    assert runs == [("run", count, app.WARM_UP_TEXT_LENGTH) for count in rows]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_rank_replica_runs_a_rank_requests_shapes_before_it_takes_requests(
    served_export: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first rank request ran the text and fusion graphs on many rows for the first time
    (base itm on OpenVINO in bf16: 1.2 s more than the next one): the replica runs one image
    against a fusion batch of captions while it starts, and caches nothing."""
    from btdeploy.runtime.split_runtime import SCORE_BATCH
    from btdeploy.serve import app

    runs = _counting_runs(monkeypatch)
    monkeypatch.setattr(app, "collector", lambda: SimpleNamespace(record_batch=None))  # no Ray here
    settings = ServeSettings(export_dir=str(served_export), backend=backend, flavour="trt")
    replica = app.RankModel.func_or_class(*app.rank_model_arguments(settings, str(served_export / "itm")))  # type: ignore[attr-defined]
    length = app.WARM_UP_TEXT_LENGTH
    assert runs == [("vision", 1, 0), ("text", SCORE_BATCH, length), ("fusion", SCORE_BATCH, length)]
    assert len(replica.cache) == 0


class _Replica:
    """A deployment handle's stand-in: `ready.remote()` answers once `up` is set."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        # A task, as Ray's response is: awaited, and cancelled where the gateway stops waiting.
        self.ready = SimpleNamespace(remote=lambda: asyncio.ensure_future(self._ready()))

    async def _ready(self) -> bool:
        await self.up.wait()
        return True


def test_the_server_is_ready_only_once_the_rank_replica_is(tiny_export: Path) -> None:
    """The rank replica loads its towers after the heads' replicas are up: /v2/health/ready had
    said ready before it, and a prober's first requests shared the CPU with that load."""
    import json

    from btdeploy.serve import app

    head, rank = _Replica(), _Replica()
    # The gateway's own state for this route, without Ray: the class under Serve's ingress wrapper,
    # whose __init__ and __del__ are coroutines that need Serve's event loop.
    gateway_class = app.Gateway.func_or_class.__mro__[1]  # type: ignore[attr-defined]
    assert gateway_class.__qualname__ == "Gateway", gateway_class
    gateway = gateway_class.__new__(gateway_class)
    gateway.settings = ServeSettings(export_dir=str(tiny_export), timeout_s=0.3)
    gateway.heads, gateway.rank_model = {"itm": head}, rank
    gateway.collector = SimpleNamespace(record_request=SimpleNamespace(remote=lambda *args: None))

    async def answers() -> list[tuple[int, dict[str, Any]]]:
        replies = []
        for replica in (head, rank, None):
            reply = await gateway.ready()
            replies.append((reply.status_code, json.loads(reply.body)))
            if replica is not None:
                replica.up.set()
        return replies

    replies = asyncio.run(answers())
    assert [status for status, _ in replies] == [503, 503, 200], replies
    assert "itm did not answer within 0.3 s" in replies[0][1]["error"], replies
    assert "rank did not answer within 0.3 s" in replies[1][1]["error"], replies
    assert replies[2][1] == {"ready": True}
