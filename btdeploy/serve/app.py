"""The Ray Serve application: one deployment per head, a rank deployment, and an HTTP gateway.

    Gateway (FastAPI ingress: Open Inference Protocol, task endpoints, /metrics)
      -> HeadModel per head (@serve.batch merges concurrent requests into one run)
      -> RankModel (the ranking `btdeploy rank` makes: ITC, then the itm split towers; image features cached)

Replicas ask for a fraction of a CPU, so every head schedules on a 2-core machine; more replicas
(or autoscaling) and more machines come from Ray. The same application runs on a Ray cluster.
"""

import asyncio
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from btdeploy.apps.gallery import GalleryFault, gallery_kind
from btdeploy.apps.rank import CANDIDATE_HEAD, SCORING_HEAD
from btdeploy.artifacts.manifest import read_manifest
from btdeploy.errors import BtDeployError
from btdeploy.model.media import export_processor, pair_inputs
from btdeploy.serve.batching import merge_requests, split_outputs, text_axes
from btdeploy.serve.feature_cache import FeatureCache
from btdeploy.serve.metrics import ServeStats
from btdeploy.serve.protocol import BINARY_HEADER, ModelSignature, RequestError, binary_outputs_requested
from btdeploy.serve.settings import GATEWAY_CPUS, ServeSettings
from btdeploy.serve.tasks import (
    TASKS,
    check_text_lengths,
    decode_image,
    parse_search_request,
    parse_task_request,
)

LOG = logging.getLogger("ray.serve")
APP_NAME = "btdeploy"
COLLECTOR = "btdeploy-metrics"
NAMESPACE = "btdeploy"
# What a 404 points to: the routes a client calls (the README's Serving section lists them all).
ROUTES = (
    "POST /v1/itm, /v1/itc, /v1/mlm, /v1/rank, /v1/search; POST /v2/models/<head>/infer; "
    "GET /v2/models/<head>, /v2/health/ready, /metrics"
)
# No `from __future__ import annotations` here: FastAPI reads the route annotations (Request) at run time.
# Ray Serve serializes each deployment class when it is decorated, so every module-level helper
# a deployment calls is defined above the deployments.


@ray.remote(num_cpus=0)
class MetricsCollector:
    """One per application: every replica reports its batches here, the gateway its requests."""

    def __init__(self) -> None:
        self.stats = ServeStats()

    def record_batch(self, head: str, requests: int, rows: int, seconds: float, failed: bool) -> None:
        self.stats.record_batch(head, requests, rows, seconds, failed)

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.stats.record_request(route, status, seconds)

    def prometheus(self) -> str:
        return self.stats.prometheus()

    def batch_sizes(self) -> dict[str, dict[int, int]]:
        return self.stats.batch_sizes()


def collector() -> Any:
    """The application's collector (the serve command makes it; a replica makes it if it is missing)."""
    return MetricsCollector.options(name=COLLECTOR, namespace=NAMESPACE, get_if_exists=True).remote()  # type: ignore[attr-defined]


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def _head(name: str) -> Any:
    from btdeploy.model.heads import get_head

    return get_head(name)


async def _awaited(response: Any) -> Any:
    return await response


async def _async(value: Any) -> Any:
    return value


def _ray_metrics() -> str:
    """Ray's own Prometheus metrics, from each node's metrics agent."""
    texts = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                texts.append(reply.read().decode())
        except OSError as error:
            texts.append(f"# ray metrics of {url} unavailable: {error}\n")
    return "".join(texts)


def _photo_pairs(data: bytes, texts: list[str], processor: Any) -> dict[str, np.ndarray]:
    """A task request's one image against each of its texts, as the head's inputs. Run off the
    gateway's event loop: a 12-megapixel JPEG takes about 0.2 s to decode, and every other request,
    health checks included, waited for it."""
    image = decode_image(data, 0, processor.image_processor)
    return pair_inputs(processor, [image] * len(texts), texts)


async def _answered(work: Any, *args: Any) -> dict[str, Any]:
    """A replica's answer from a worker thread, or the refusal the gateway turns into an error
    status: 503 where the server's gallery is at fault (its operator indexes again), else 400."""
    try:
        return dict(await asyncio.to_thread(work, *args))
    except RequestError as error:
        return {"__status__": error.status, "__error__": error.reason}
    except GalleryFault as fault:
        return {"__status__": 503, "__error__": str(fault)}
    except BtDeployError as error:
        return {"__status__": 400, "__error__": str(error)}


WARM_UP_TEXT_LENGTH = 8


def _load_runtime(folder: str, backend: str, options: dict[str, Any]) -> Any:
    from btdeploy.runtime.runtime import load

    return load(folder, backend=backend, **options)


def _warm_up_length(runtime: Any) -> int:
    from btdeploy.model.configs import max_text_length

    return min(WARM_UP_TEXT_LENGTH, max_text_length(runtime.config))


def _warm_up_head(runtime: Any, backend: str, max_batch: int) -> None:
    """Run the graph before the replica reports ready: OpenVINO compiles its kernels on the first
    inference (base itm in bf16 on the AMX Xeon: 1.28 s, then 0.11 s a request), and again for the
    first batch of a new size (16 rows: 2.05 s, then 1.29 s), so on a target that compiles per
    shape the largest merged batch runs too. ONNX Runtime sizes its arenas on the first run."""
    from btdeploy.backends.targets import get_target
    from btdeploy.model.inputs import sample_inputs

    rows = [1, max_batch] if get_target(backend).compiles_per_shape else [1]
    for count in dict.fromkeys(rows):
        runtime(**sample_inputs(runtime.config, count, _warm_up_length(runtime), pad=False))


def _warm_up_rank(ranker: Any) -> None:
    """Run a rank request's shapes once: one image, a fusion batch of captions, and their scores
    (on the itc head its towers alone, whose embeddings give the cosines; a whole head one row).
    The first multi-row run of the text and fusion graphs paid 0.4 s and up to 0.9 s more on OpenVINO
    (base itm, bf16) and 0.2 s more for the text graph on ONNX Runtime. Where the itm stage scores
    the itc towers' features (`Ranker.shares_towers`) its own towers are never run, nor opened
    (850 MB on base)."""
    from btdeploy.model.inputs import sample_inputs
    from btdeploy.runtime.runtime import SplitRuntime
    from btdeploy.runtime.split_runtime import SCORE_BATCH

    itm, itc = ranker.itm, ranker.itc
    feeds = sample_inputs(itm.config, SCORE_BATCH, _warm_up_length(itm), pad=False)
    pixels = feeds["pixel_values"][:1]
    text = {"input_ids": feeds["input_ids"], "attention_mask": feeds["attention_mask"]}
    if isinstance(itc, SplitRuntime):
        images, texts = itc.encode_images(pixels), itc.encode_texts(text)
        if ranker.shares_towers:
            itm.score(ranker.as_itm_features(images), ranker.as_itm_features(texts))
    elif itc is not None:
        itc(**{name: values[:1] for name, values in feeds.items()})
    if not ranker.shares_towers:
        itm.score(itm.encode_images(pixels), itm.encode_texts(text))


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class HeadModel:
    """One exported head; concurrent requests are merged into batches of up to max_batch requests."""

    def __init__(self, folder: str, backend: str, options: dict[str, Any], max_batch: int, batch_wait_s: float) -> None:
        self.runtime = _load_runtime(folder, backend, options)
        _warm_up_head(self.runtime, backend, max_batch)
        self.head = self.runtime.head
        self.axes = text_axes(self.head, self.runtime.config)
        self.pad_id = int(self.runtime.config.text_config.pad_token_id)
        self.run_batch.set_max_batch_size(max_batch)  # type: ignore[attr-defined]
        self.run_batch.set_batch_wait_timeout_s(batch_wait_s)  # type: ignore[attr-defined]
        self.collector = collector()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The gateway validated every request (prepare_inputs); the merged batch goes to the backend as is.
        values = self.runtime.backend.run(feeds)
        return {name: values[name] for name in self.head.output_names}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def run_batch(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        merged, slices = merge_requests(requests, self.pad_id)
        started = time.perf_counter()
        try:
            # Off the event loop: while this batch runs, the next one fills.
            values = await asyncio.to_thread(self._run, merged)
            results: list[dict[str, Any]] = list(split_outputs(values, slices, self.axes))
            failed = False
        except BtDeployError as error:
            results, failed = [{"__error__": str(error)}] * len(requests), True
        rows = int(merged["input_ids"].shape[0])
        self.collector.record_batch.remote(self.head.name, len(requests), rows, time.perf_counter() - started, failed)
        return results

    async def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        return await self.run_batch(feeds)

    def ready(self) -> bool:
        return True


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class RankModel:
    """The ranking `btdeploy rank` makes (apps/rank.py): ITC cosine first where the itc head is
    served, then ITM match probability on the itm split towers. Each image's tower features are
    computed once and cached by the hash of its bytes (bounded, least recently used first), each
    text's per request."""

    def __init__(
        self,
        folder: str,
        itc_folder: str | None,
        backend: str,
        options: dict[str, Any],
        itc_options: dict[str, Any],
        cache_size: int,
        gallery: str | None = None,
    ) -> None:
        from btdeploy.apps.rank import Ranker, describe_graphs
        from btdeploy.serve.served_gallery import ServedGallery

        itm = _load_runtime(folder, backend, options)
        itc = _load_runtime(itc_folder, backend, itc_options) if itc_folder else None
        self.ranker = Ranker(itm, itc, describe_graphs(backend, options))
        _warm_up_rank(self.ranker)
        self.cache = FeatureCache(cache_size)
        self.gallery = ServedGallery(Path(gallery)) if gallery else None
        self.collector = collector()

    def _rank(self, images: list[bytes], texts: list[str], top_k: int | None) -> dict[str, Any]:
        from btdeploy.serve.rank_images import RequestImages

        started = time.perf_counter()
        source = RequestImages(self.ranker.processor, self.cache)
        ranking = self.ranker.rank(images, texts, top_k, source)
        candidates = max(len(images), len(texts))
        self.collector.record_batch.remote("rank", 1, candidates, time.perf_counter() - started, False)
        return {**ranking.as_json(), "cached_images": source.found_in_cache(images)}

    def _search(self, images: list[bytes], texts: list[str], top_k: int | None) -> dict[str, Any]:
        """The gallery ranked against the request's one text (a gallery of images) or image (of captions)."""
        from btdeploy.apps.gallery import GalleryItems, ranked_against
        from btdeploy.serve.rank_images import RequestImages

        assert self.gallery is not None  # the gateway asks only then
        started = time.perf_counter()
        gallery = self.gallery.current()
        query = RequestImages(self.ranker.processor, self.cache)
        reader = GalleryItems(self.ranker.processor, gallery, self.gallery.path, query)
        ranking = self.ranker.rank(*ranked_against(gallery, (images or texts)[0]), top_k, reader)
        self.collector.record_batch.remote("search", 1, len(gallery.names), time.perf_counter() - started, False)
        return ranking.as_json()

    async def rank(self, images: list[bytes], texts: list[str], top_k: int | None) -> dict[str, Any]:
        return await _answered(self._rank, images, texts, top_k)

    async def search(self, images: list[bytes], texts: list[str], top_k: int | None) -> dict[str, Any]:
        return await _answered(self._search, images, texts, top_k)

    def ready(self) -> bool:
        return True


api = FastAPI(title="btdeploy", docs_url=None, redoc_url=None)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals ("Not Found", "Method Not Allowed") say what the route would take."""
    route = f"{request.method} {request.url.path}"
    allowed = (error.headers or {}).get("Allow")
    if error.status_code == 405 and allowed:
        return _error(405, f"{route}: this route takes {allowed}")
    if error.status_code == 404:
        return _error(404, f"no route {route}: see {ROUTES}")
    return _error(error.status_code, str(error.detail))


@serve.deployment(ray_actor_options={"num_cpus": GATEWAY_CPUS}, max_ongoing_requests=1024)
@serve.ingress(api)
class Gateway:
    """HTTP in front of the heads: parses and checks every request, so a bad one never reaches a model."""

    def __init__(
        self, heads: dict[str, Any], rank: Any | None, folders: dict[str, str], settings: dict[str, Any]
    ) -> None:
        self.settings = ServeSettings(**settings)
        self.heads = heads
        self.rank_model = rank
        self.manifests = {name: read_manifest(Path(folder)) for name, folder in folders.items()}
        self.signatures = {name: ModelSignature.from_manifest(m) for name, m in self.manifests.items()}
        self.configs = {name: m.config for name, m in self.manifests.items()}
        first = next(iter(self.manifests.values()))
        self.processor = export_processor(first)
        self.limit = int(first.data["limits"]["max_text_length"])
        self.max_body = int(self.settings.max_body_mb * 1024 * 1024)
        self.gallery_kind = gallery_kind(Path(self.settings.gallery)) if self.settings.gallery else None
        self.collector = collector()

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise RequestError(
                413, f"the body is {declared} bytes, the limit is {self.max_body}: send less per request"
            )
        body = await request.body()
        if len(body) > self.max_body:
            raise RequestError(
                413, f"the body is {len(body)} bytes, the limit is {self.max_body}: send less per request"
            )
        return body

    async def _call(self, head: str, response: Any) -> Any:
        """A replica's answer, or a 503 when it failed or did not answer within the timeout."""
        try:
            return await asyncio.wait_for(_awaited(response), self.settings.timeout_s)
        except TimeoutError:
            response.cancel()
            raise RequestError(
                503, f"{head} did not answer within {self.settings.timeout_s:g} s: retry later"
            ) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayTaskError) as e:
            raise RequestError(
                503, f"a {head} replica failed ({type(e).__name__}); it restarts by itself: retry"
            ) from None

    async def _ranked(self, response: Any) -> Response:
        """The rank replica's answer as JSON, or its refusal (`_answered`) with the status it gave."""
        answer = await self._call("rank", response)
        if "__error__" in answer:
            raise RequestError(answer["__status__"], answer["__error__"])
        return JSONResponse(answer)

    async def _answer(self, route: str, handler: Any) -> Response:
        started = time.perf_counter()
        try:
            response = await handler()
        except RequestError as error:
            response = _error(error.status, error.reason)
        except BtDeployError as error:
            response = _error(400, str(error))
        except Exception as error:  # never a traceback to the client; the log keeps it
            LOG.exception("request to %s failed", route)
            response = _error(500, f"internal error ({type(error).__name__}); the server keeps serving")
        self.collector.record_request.remote(route, response.status_code, time.perf_counter() - started)
        return response

    def _signature(self, name: str) -> ModelSignature:
        if name not in self.signatures:
            raise RequestError(404, f"unknown model {name!r}: this server has {', '.join(self.signatures)}")
        return self.signatures[name]

    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> Response:
        """Ready once every replica the server runs is: the heads', and the rank endpoint's where it
        is served (its replica loads two heads' towers after the heads are up; reported ready
        before, a prober's first requests had shared the CPU with that load)."""

        async def check() -> Response:
            for name, handle in self.heads.items():
                await self._call(name, handle.ready.remote())
            if self.rank_model is not None:
                await self._call("rank", self.rank_model.ready.remote())
            return JSONResponse({"ready": True})

        return await self._answer("health", check)

    @api.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        from btdeploy.artifacts.manifest import package_version

        return {"name": "btdeploy", "version": package_version("btdeploy"), "extensions": ["binary_tensor_data"]}

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/1")
    async def model_metadata(self, name: str) -> Response:
        return await self._answer("metadata", lambda: _async(JSONResponse(self._signature(name).metadata())))

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/1/ready")
    async def model_ready(self, name: str) -> Response:
        async def check() -> Response:
            self._signature(name)
            await self._call(name, self.heads[name].ready.remote())
            return JSONResponse({"name": name, "ready": True})

        return await self._answer("health", check)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/1/infer")
    async def infer(self, name: str, request: Request) -> Response:
        async def run() -> Response:
            from btdeploy.runtime.validation import prepare_inputs

            signature = self._signature(name)
            body = await self._body(request)
            header = request.headers.get(BINARY_HEADER)
            feeds, outputs, request_id = await asyncio.to_thread(signature.decode, body, header)
            prepared = await asyncio.to_thread(prepare_inputs, _head(name), self.configs[name], feeds)
            self._check_rows(name, prepared.feeds)
            values = await self._call(name, self.heads[name].infer.remote(prepared.feeds))
            if "__error__" in values:
                raise RequestError(400, values["__error__"])
            binary = binary_outputs_requested(body, header, outputs)
            content, headers = signature.response(values, outputs, request_id, binary)
            return Response(content, headers=headers, media_type=headers.pop("content-type"))

        return await self._answer("infer", run)

    async def _task_request(self, request: Request, route: str) -> Any:
        """Images and texts of a task request: JSON, or the raw image as the body with ?text= captions."""
        body = await self._body(request)
        content_type = request.headers.get("content-type", "")
        query = request.query_params
        return await asyncio.to_thread(
            parse_task_request,
            body,
            content_type,
            query.getlist("text"),
            self.settings.max_texts,
            query.get("top_k"),
            route,
        )

    def _check_rows(self, name: str, feeds: dict[str, np.ndarray]) -> None:
        limit = _head(name).engine_batch[2]
        rows = int(feeds["input_ids"].shape[0])
        if rows > limit:
            raise RequestError(413, f"{rows} rows in one request, the {name} head takes at most {limit}: split it")

    @api.post("/v1/rank")
    async def rank(self, request: Request) -> Response:
        async def run() -> Response:
            if self.rank_model is None:
                needs = f"ranking needs the {SCORING_HEAD} head with split graphs: export with --split"
                raise RequestError(404, needs)
            task = await self._task_request(request, "/v1/rank")
            return await self._ranked(self.rank_model.rank.remote(task.images, task.texts, task.top_k))

        return await self._answer("rank", run)

    @api.post("/v1/search")
    async def search(self, request: Request) -> Response:
        async def run() -> Response:
            if self.rank_model is None or self.settings.gallery is None:
                raise RequestError(
                    404, "this server has no gallery to search: start it with --gallery FILE (btdeploy index makes one)"
                )
            body = await self._body(request)
            query = request.query_params
            takes = "image" if self.gallery_kind == "text" else "text"
            content_type = request.headers.get("content-type", "")
            parsed = await asyncio.to_thread(
                parse_search_request, body, content_type, query.getlist("text"), query.get("top_k"), takes
            )
            return await self._ranked(self.rank_model.search.remote(parsed.images, parsed.texts, parsed.top_k))

        return await self._answer("search", run)

    @api.post("/v1/{task_name}")
    async def task(self, task_name: str, request: Request) -> Response:
        async def run() -> Response:
            if task_name not in TASKS:
                routes = ", ".join([*TASKS, "rank", "search"])
                raise RequestError(404, f"unknown task {task_name!r}: this server has {routes}")
            task = TASKS[task_name]
            if task.head not in self.heads:
                raise RequestError(404, f"the {task.head} head is not served here: start with --heads including it")
            parsed = await self._task_request(request, f"/v1/{task_name}")
            if len(parsed.images) != 1:
                raise RequestError(400, f"/v1/{task_name} takes one image; rank many with /v1/rank")
            check_text_lengths(self.processor, parsed.texts, self.limit)
            top_k = parsed.top_k or 1
            task.check(self.processor, parsed.texts, top_k)
            feeds = await asyncio.to_thread(_photo_pairs, parsed.images[0], parsed.texts, self.processor)
            values = await self._call(task.head, self.heads[task.head].infer.remote(feeds))
            if "__error__" in values:
                raise RequestError(400, values["__error__"])
            return JSONResponse(
                {"task": task_name, "answers": task.answer(values, parsed.texts, feeds, self.processor, top_k)}
            )

        return await self._answer("task", run)

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        own = await _awaited(self.collector.prometheus.remote())
        return PlainTextResponse(own + await asyncio.to_thread(_ray_metrics))

    @api.get("/v2/stats/batches")
    async def batch_sizes(self) -> dict[str, Any]:
        """Per head, how many batches of each request count were formed (for the load bench)."""
        return await _awaited(self.collector.batch_sizes.remote())


def head_model_arguments(settings: ServeSettings, folder: str) -> tuple[Any, ...]:
    """What a HeadModel replica is made with (Ray passes them to __init__; a test makes one with them too)."""
    options = settings.run_options(settings.split)
    return folder, settings.backend, options, settings.max_batch, settings.batch_wait_ms / 1000


def rank_model_arguments(settings: ServeSettings, folder: str, itc_folder: str | None = None) -> tuple[Any, ...]:
    """What the RankModel replica is made with: the itm head's split graphs, and the itc head's
    (split where exported) when it is served."""
    itc_options = settings.run_options(itc_folder is not None and len(read_manifest(Path(itc_folder)).stems) > 1)
    options = settings.run_options(True)
    return folder, itc_folder, settings.backend, options, itc_options, settings.feature_cache, settings.gallery


def build_application(settings: ServeSettings, folders: dict[str, str], rank_folder: str | None) -> Any:
    """The bound application: a HeadModel per head, the RankModel when the itm head has split graphs."""
    scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    if settings.max_replicas and settings.max_replicas > settings.replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": settings.replicas,
                "max_replicas": settings.max_replicas,
                "target_ongoing_requests": max(2, settings.max_batch),
            }
        }
    ongoing = max(4, 2 * settings.max_batch)  # one batch running while the next one fills
    actor = {"num_cpus": settings.replica_cpus}
    heads = {
        name: HeadModel.options(  # type: ignore[attr-defined]
            name=f"head-{name}", ray_actor_options=actor, max_ongoing_requests=ongoing, **scaling
        ).bind(*head_model_arguments(settings, folder))
        for name, folder in folders.items()
    }
    rank = None
    if rank_folder is not None:
        rank = RankModel.options(ray_actor_options=actor, **scaling).bind(  # type: ignore[attr-defined]
            *rank_model_arguments(settings, rank_folder, folders.get(CANDIDATE_HEAD))
        )
    return Gateway.bind(heads, rank, folders, settings.as_dict())  # type: ignore[attr-defined]
