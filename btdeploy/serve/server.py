"""`btdeploy serve`: start (or join) Ray, deploy the application, say when every head answers,
and on Ctrl-C or SIGTERM take down what this command started."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

from btdeploy.errors import BtDeployError
from btdeploy.progress import say
from btdeploy.serve.settings import ServeSettings, check_settings, replica_cpus, replicas_spin

READY_TIMEOUT_S = 300


class _Stop(Exception):
    """Raised by the SIGTERM handler so shutdown runs the same way as on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stop()


def serve_export(settings: ServeSettings) -> int:
    manifests = check_settings(settings)
    folders = {name: str(manifest.folder) for name, manifest in manifests.items()}
    import ray
    from ray import serve

    from btdeploy.serve.app import APP_NAME, NAMESPACE, RANK_HEAD, build_application
    from btdeploy.serve.app import collector as app_collector

    rank_folder = None
    if RANK_HEAD in manifests and len(manifests[RANK_HEAD].stems) > 1:  # ranking runs its split towers
        rank_folder = folders[RANK_HEAD]

    started_ray = settings.address is None
    say("starting Ray" if started_ray else f"joining the Ray cluster at {settings.address}")
    ray.init(
        address=settings.address,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    # After ray.init, which installs a SIGTERM handler of its own that would skip the shutdown below.
    signal.signal(signal.SIGTERM, _on_sigterm)
    say(f"Ray at {ray.get_runtime_context().gcs_address}")
    collector = None
    try:
        collector = app_collector()
        deployments = len(folders) + (1 if rank_folder else 0)
        cpus = replica_cpus(settings, deployments, float(ray.cluster_resources().get("CPU", 0)))
        settings = replace(settings, replica_cpus=cpus, spin=replicas_spin(settings, deployments))
        serve.start(http_options={"host": settings.host, "port": settings.port})
        heads = ", ".join(folders)
        say(
            f"deploying {heads}"
            + (" and rank" if rank_folder else "")
            + f" ({settings.replicas} replica(s) each, {cpus:g} CPU reserved per replica,"
            + f" ONNX Runtime workers {'spinning' if settings.spin else 'not spinning'} between operators)"
        )
        serve.run(build_application(settings, folders, rank_folder), name=APP_NAME, route_prefix="/")
        url = f"http://{settings.host}:{settings.port}"
        _wait_ready(url, list(folders))
        print(f"ready on {url}", flush=True)
        while True:
            time.sleep(1)
    except (KeyboardInterrupt, _Stop):
        say("stopping")
    finally:
        _shut_down(serve, ray, started_ray, collector)
    return 0


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


def _shut_down(serve: Any, ray: Any, started_ray: bool, collector: Any) -> None:
    from btdeploy.serve.app import APP_NAME

    try:
        if started_ray:
            serve.shutdown()  # Serve is ours: its controller and proxies go with it
        else:
            serve.delete(APP_NAME)  # a shared cluster keeps Serve running for its other applications
            if collector is not None:
                ray.kill(collector)
    finally:
        ray.shutdown()  # stops the processes this command started
    say("stopped")
