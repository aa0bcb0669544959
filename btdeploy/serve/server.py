"""`btdeploy serve`: start (or join) Ray, deploy the application, say when every head answers,
and on Ctrl-C or SIGTERM take down what this command started."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from btdeploy.apps.rank import SCORING_HEAD
from btdeploy.errors import BtDeployError
from btdeploy.imports import INSTALL_SERVE
from btdeploy.progress import say
from btdeploy.serve.cluster_address import GCS_PORT_DEFAULT, JOIN_HINT, RAY_CLIENT_PORT_DEFAULT
from btdeploy.serve.settings import ServeSettings, check_settings, replica_cpus, replicas_spin, serves_rank
from btdeploy.signals import heeded_stops, raise_terminated, restore_handler, stop_for

READY_TIMEOUT_S = 300


def serve_export(settings: ServeSettings) -> int:
    manifests = check_settings(settings)
    folders = {name: str(manifest.folder) for name, manifest in manifests.items()}
    ray, serve = _import_ray_serve()
    from btdeploy.serve.app import APP_NAME, NAMESPACE, build_application
    from btdeploy.serve.app import collector as app_collector

    rank_folder = folders[SCORING_HEAD] if serves_rank(settings, manifests) else None

    started_ray = settings.address is None
    collector = None
    stopping = False
    try:
        say("starting Ray" if started_ray else f"joining the Ray cluster at {settings.address}")
        with _stops_held_through(ray, hold=started_ray):
            try:
                ray.init(
                    # "local": a new Ray of our own. Left out, ray.init joins the cluster `ray start` began
                    # on this machine, whose Serve, and every application on it, our shutdown then stopped.
                    address=settings.address or "local",
                    namespace=NAMESPACE,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except ConnectionError as error:  # an OSError, which would be read as a bad path
                if settings.address is None:
                    raise
                raise _join_failure(settings.address, error) from None
            except ray.exceptions.AuthenticationError as error:
                if settings.address is None:
                    raise
                raise _token_missing(settings.address, error) from None
        # Ours from here (a stop held through ray.init was raised as it returned).
        if signal.SIGTERM in heeded_stops():
            signal.signal(signal.SIGTERM, raise_terminated)
        say(f"Ray at {ray.get_runtime_context().gcs_address}")
        collector = app_collector()
        deployments = len(folders) + (1 if rank_folder else 0)
        cpus = replica_cpus(settings, deployments, float(ray.cluster_resources().get("CPU", 0)))
        settings = replace(settings, replica_cpus=cpus, spin=replicas_spin(settings, deployments))
        serve.start(http_options={"host": settings.host, "port": settings.port})
        _require_serve_http(_running_http(), settings)
        heads = ", ".join(folders)
        say(
            f"deploying {heads}"
            + (" and rank" if rank_folder else "")
            + f" ({settings.replicas} replica(s) each, {cpus:g} CPU reserved per replica,"
            + (
                f" ONNX Runtime workers {'spinning' if settings.spin else 'not spinning'} between operators)"
                if settings.spin is not None
                else f" on {settings.backend})"
            )
        )
        logs = _serve_logs(ray)
        logged_before = _log_sizes(logs)  # a cluster joined may have logged other applications' errors
        with _serve_reconnect_line_dropped():
            try:
                serve.run(build_application(settings, folders, rank_folder), name=APP_NAME, route_prefix="/")
            except RuntimeError as error:  # Ray's "Deploying application ... failed", without the replica's error
                if not str(error).startswith("Deploying application"):
                    raise
                raise _deploy_failure(error, logs, logged_before) from None
        url = f"http://{settings.host}:{settings.port}"
        _wait_ready(url, list(folders))
        print(f"ready on {url}", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C, and SIGTERM as Terminated
        stopping = True
        say("stopping")
    except Exception as error:
        if not _caused_by_a_stop(error):
            raise
        stopping = True
        say("stopping")  # the stop was raised inside Ray's compiled code, which wrapped it
    finally:
        _shut_down(serve, ray, started_ray, collector, stopping)
    return 0


# What serve.run logs as it finds the Serve that serve.start (above it) made or found; the options
# it says "will not be applied" were applied by serve.start, or refused by _require_serve_http.
_SERVE_RECONNECT_LINE = "Connecting to existing Serve app"


@contextmanager
def _serve_reconnect_line_dropped() -> Iterator[None]:
    """serve.run without its "... New http_options/controller_options will not be applied" line,
    which read on every start as if --host and --port had been ignored."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_SERVE_RECONNECT_LINE)

    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addFilter(keep)
    try:
        yield
    finally:
        serve_logger.removeFilter(keep)


def _running_http() -> tuple[str, int]:
    """Where the cluster's Serve proxies listen: on a cluster where Serve already ran,
    serve.start keeps its HTTP options and ignores ours."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # serve.start made or found it
    return str(client.http_config.host), int(client.http_config.port)


def _require_serve_http(running: tuple[str, int], settings: ServeSettings) -> None:
    """The application answers where Serve already listens; --host and --port asking for another
    place would have waited READY_TIMEOUT_S at the wrong address, then blamed the head."""
    host, port = running
    if port == settings.port and host in (settings.host, "0.0.0.0"):
        return
    raise BtDeployError(
        f"Serve already runs on this Ray cluster and listens on {host}:{port} (a running Serve keeps its HTTP"
        f" options): pass --host {host} --port {port}, or stop Serve on the cluster first (`serve shutdown`)"
    )


def _join_failure(address: str, error: ConnectionError) -> BtDeployError:
    """Ray's ConnectionError on joining, with what to try. A cluster that `ray start` began with
    token authentication (its default where a token exists, ~/.ray/auth_token) answers an explicit
    address only with RAY_AUTH_MODE=token set: Ray sends its token unasked to `auto` alone."""
    hint = JOIN_HINT
    # The wrong port for the form is refused before ray.init (cluster_address), except where gRPC does
    # not accept the host name in a TLS cluster's certificate: then it surfaces here after 20-35 s.
    if address.startswith("ray://"):
        hint += f"; a ray:// address takes the Ray Client server's port ({RAY_CLIENT_PORT_DEFAULT})"
    elif address != "auto":
        hint += f"; HOST:PORT is the head's GCS port ({GCS_PORT_DEFAULT}), ray://HOST:PORT the Ray Client's"
    if address != "auto" and "RAY_AUTH_MODE" not in os.environ:
        hint += (
            "; if the cluster uses token authentication, set RAY_AUTH_MODE=token (the token is read from"
            " RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        )
    return BtDeployError(f"could not join the Ray cluster at {address} ({error}): {hint}")


def _deploy_failure(error: RuntimeError, logs: Path | None, logged_before: dict[Path, int]) -> BtDeployError:
    """serve.run's deploy failure in one line, with the error a replica raised as it started (Serve's
    controller logs it; serve.run names only the deployment) and where Ray's logs are."""
    cause = replica_error(logs, logged_before) if logs is not None else None
    where = f"Ray's logs: {logs}" if logs is not None else "Ray's logs are on the cluster's head node"
    if cause is None:
        return BtDeployError(f"a replica did not start ({' '.join(str(error).split())}); {where}")
    return BtDeployError(f"a replica did not start: {cause} ({where})")


def _serve_logs(ray: Any) -> Path | None:
    """The Serve log folder of the Ray node this process started or joined on this machine, or None."""
    try:
        node = ray._private.worker._global_node  # no public API names the session's folder
        logs = Path(node.get_logs_dir_path()) / "serve"
    except Exception:  # a Ray without that attribute, or a client connection (ray://) with no local node
        return None
    return logs if logs.is_dir() else None


def _log_sizes(logs: Path | None) -> dict[Path, int]:
    return {} if logs is None else {log: log.stat().st_size for log in logs.glob("controller_*.log")}


ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")


def replica_error(logs: Path, logged_before: dict[Path, int]) -> str | None:
    """The last exception Serve's controller logged since `logged_before` (the size of each of its
    logs then): a replica's constructor raising, as `Type: message`, btdeploy's own errors as their
    message alone. None where there is none."""
    found = None
    for log in sorted(logs.glob("controller_*.log"), key=lambda log: log.stat().st_mtime):  # the newest last
        with open(log, "rb") as stream:
            stream.seek(logged_before.get(log, 0))
            text = stream.read().decode(errors="replace")
        for line in text.splitlines():
            match = ERROR_LINE.match(line.strip())
            if match:
                kind, message = match.groups()
                found = message if kind == "BtDeployError" else f"{kind}: {message}"
    return found


def _import_ray_serve() -> tuple[Any, Any]:
    """Ray and Ray Serve, which only the `serve` extra installs."""
    try:
        import ray
        from ray import serve
    except ImportError as error:  # ray missing, or installed without Serve's own dependencies
        raise BtDeployError(
            f"btdeploy serve needs Ray Serve, which is not installed here ({error}): {INSTALL_SERVE}"
        ) from None
    return ray, serve


def _token_missing(address: str, error: Exception) -> BtDeployError:
    """RAY_AUTH_MODE=token with no token to send: Ray raises before it tries the address."""
    first_sentence = str(error).split(". ")[0]
    return BtDeployError(
        f"could not join the Ray cluster at {address} ({first_sentence}): put the cluster's token in"
        " RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token (`ray get-auth-token`"
        " prints it on the head node), or unset RAY_AUTH_MODE where the cluster runs without token authentication"
    )


def _caused_by_a_stop(error: BaseException) -> bool:
    """Whether a stop raised while Ray's compiled code was calling back into Python caused this
    error (that code turns it into `SystemError: ... returned a result with an exception set`)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


@contextmanager
def _stops_held_through(ray: Any, hold: bool) -> Iterator[None]:
    """Ray's start, with Ctrl-C and SIGTERM ours rather than Ray's. ray.init installs a SIGTERM
    handler of its own (sys.exit: exit 15) and, where it starts a local Ray (`hold`), starts processes
    in stages: a stop part-way through left Ray's agent processes running, orphaned. So there the first
    stop is held until ray.init returns (the shutdown then stops them all) and a second one stops at
    once. Joining a cluster starts nothing here: a stop acts as soon as Ray's compiled code returns
    (its connection attempts to an address that accepts but is not Ray's take up to 40 s each)."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    installs = getattr(utils, "set_sigterm_handler", None)
    held: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        # A KeyboardInterrupt, never an Exception: Ray's connection retries catch Exception, and
        # a stop raised as one was swallowed there while ray.init kept retrying for minutes.
        if held or not hold:
            raise stop_for(signum)
        held.append(signum)
        say("stopping once Ray has started (its processes are being started); a second stop ends at once")

    previous = {signum: signal.signal(signum, stop) for signum in heeded_stops()}
    if installs is not None:
        utils.set_sigterm_handler = lambda handler: None  # type: ignore[union-attr]
    try:
        yield
    finally:
        if installs is not None:
            utils.set_sigterm_handler = installs  # type: ignore[union-attr]
        for signum, handler in previous.items():
            restore_handler(signum, handler)
    if held:
        raise stop_for(held[0])


def _wait_ready(url: str, heads: list[str]) -> None:
    """Every head answers /v2/models/<head>/ready (its replica loaded its graph and runs)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for head in heads:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/models/{head}/ready", timeout=10) as reply:
                    if json.loads(reply.read()).get("ready"):
                        break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise BtDeployError(f"the {head} head did not become ready within {READY_TIMEOUT_S} s: see Ray's logs")
            time.sleep(0.5)


@contextmanager
def _actor_logs_muted(ray: Any) -> Iterator[None]:
    """Ray's relayed actor and raylet lines off while this command takes down what it started:
    Serve's controller ends its own graceful shutdown by killing itself, and Ray then relayed
    "(raylet) Task ServeController.graceful_shutdown failed ... killed by `ray.kill`" on every
    clean stop. Errors raised by the shutdown calls still surface. (The switch is the one Ray's
    own debugger flips; where a Ray release lacks it, nothing changes.)"""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if worker is None or not hasattr(worker, "_worker_logs_enabled"):
        yield
        return
    before = worker._worker_logs_enabled
    worker._worker_logs_enabled = False
    try:
        yield
    finally:
        worker._worker_logs_enabled = before


# How long a stop waits to see one of Ray's processes exit: a stop sent to the whole process group
# reaches them as it reaches this command, and its dashboard and log monitor exit within 50 ms.
_RAY_EXIT_WAIT_S = 0.3


def _ray_stopped_with_us(ray: Any) -> bool:
    """Whether a process of the Ray node this command started (its dashboard, log monitor, GCS,
    raylet) has exited: a SIGTERM sent to the whole process group (`timeout`, a CI runner,
    `kill -- -PGID`) reaches them too, and Serve's graceful shutdown then waited its full 30 s
    ("Controller failed to shut down within 30.0s") before `ray.shutdown` took everything down
    anyway. Ray blocks SIGINT in them, so a terminal's Ctrl-C leaves them running."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    if node is None or not hasattr(node, "dead_processes"):
        return False  # another Ray release: Serve's own shutdown, as before
    deadline = time.monotonic() + _RAY_EXIT_WAIT_S
    while True:
        if node.dead_processes():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _shut_down(serve: Any, ray: Any, started_ray: bool, collector: Any, stopping: bool) -> None:
    from btdeploy.serve.app import APP_NAME

    # "stopped" answers the "stopping" of a stop; after a failure the error is the last line
    if ray.is_initialized():  # else ray.init failed or was stopped: nothing started, and Serve would start Ray to look
        with _actor_logs_muted(ray):
            try:
                if started_ray:
                    if not _ray_stopped_with_us(ray):  # else ray.shutdown below ends Serve with Ray
                        serve.shutdown()  # Serve is ours: its controller and proxies go with it
                else:
                    serve.delete(APP_NAME)  # a shared cluster keeps Serve running for its other applications
                    if collector is not None:
                        ray.kill(collector)
            finally:
                ray.shutdown()  # stops the processes this command started
    if stopping:
        say("stopped")
