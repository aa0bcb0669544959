"""What `btdeploy serve` was asked for, checked before Ray starts (so a mistake is one line)."""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from btdeploy.apps.rank import CANDIDATE_HEAD, SCORING_HEAD
from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest, require_one_checkpoint
from btdeploy.backends.targets import get_target
from btdeploy.errors import BtDeployError
from btdeploy.model.media import require_processor
from btdeploy.serve.cluster_address import check_cluster_address

# What a replica may run. TensorRT users serve with Triton (btdeploy triton-repo). OpenVINO runs the
# standard-ONNX graphs, and on a CPU that multiplies bfloat16 the FP32 graphs in bf16: on a Xeon with
# AMX, btdeploy's trt graph ran there 3.3-4.1x faster than ONNX Runtime's FP32, as fast as its INT8
# (benchmarks/results/base-peers-cpu, twenty-fifth look).
BACKENDS = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class ServeSettings:
    export_dir: str
    heads: tuple[str, ...] = ()  # empty: every exported head
    backend: str = "onnxruntime"  # one of BACKENDS
    precision: str = "fp32"
    flavour: str | None = None
    split: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_replicas: int | None = None  # autoscale between replicas and this
    max_batch: int = 16  # requests merged into one batch; 1 turns batching off
    batch_wait_ms: float = 5.0
    address: str | None = None  # a Ray cluster to join instead of starting one
    replica_cpus: float | None = None  # None: the cluster's CPUs shared out (fractional on a 2-core machine)
    threads: int | None = None  # threads per replica (default: every core)
    # Whether a replica's ONNX Runtime workers spin between operators; None: `replicas_spin` decides
    # (and stays None on a backend that has no such workers).
    spin: bool | None = None
    exact_sums: bool = True  # the INT8 graphs' integer sums as a VNNI CPU makes them (backends/exact_sums.py)
    timeout_s: float = 30.0
    max_body_mb: float = 16.0
    max_texts: int = 64  # per task request
    feature_cache: int = 256  # image features kept by the rank endpoint, per replica
    gallery: str | None = None  # a gallery `btdeploy index` made, searched by /v1/search

    def run_options(self, split: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"precision": self.precision, "split": split}
        if self.flavour:
            options["flavour"] = self.flavour
        if self.threads:
            options["threads"] = self.threads
        if self.spin is not None:
            options["spin"] = self.spin
        if not self.exact_sums:
            options["exact_sums"] = False
        return options

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_settings(settings: ServeSettings) -> dict[str, Manifest]:
    """The manifest of every head to serve, once the options, graphs and port are known to be usable."""
    if settings.max_batch < 1:
        raise BtDeployError(f"--max-batch {settings.max_batch} must be at least 1 (1 turns batching off)")
    if settings.batch_wait_ms < 0:
        raise BtDeployError(f"--batch-wait-ms {settings.batch_wait_ms} must not be negative")
    if settings.replicas < 1 or (settings.max_replicas is not None and settings.max_replicas < settings.replicas):
        raise BtDeployError("--replicas must be at least 1 and --max-replicas at least --replicas")
    if settings.replica_cpus is not None and not 0 < settings.replica_cpus <= 64:
        raise BtDeployError(f"--replica-cpus {settings.replica_cpus} must be above 0 and at most 64")
    if settings.threads is not None and settings.threads < 0:
        raise BtDeployError(f"--threads {settings.threads} must not be negative (0 or left out: every core)")
    if settings.timeout_s <= 0:
        raise BtDeployError(f"--timeout {settings.timeout_s:g} must be above 0 seconds")
    if settings.max_body_mb <= 0:
        raise BtDeployError(f"--max-body-mb {settings.max_body_mb:g} must be above 0")
    if settings.max_texts < 1:
        raise BtDeployError(f"max_texts {settings.max_texts} must be at least 1")
    if settings.feature_cache < 0:
        raise BtDeployError(f"--feature-cache {settings.feature_cache} must not be negative (0 keeps none)")
    if not 1 <= settings.port <= 65535:
        raise BtDeployError(f"--port {settings.port} is not a TCP port: give one in 1..65535")
    folders = head_folders(Path(settings.export_dir), list(settings.heads) or None)
    manifests = {manifest.head: manifest for manifest in map(read_manifest, folders)}
    require_one_checkpoint(list(manifests.values()), "the server preprocesses for every head with one processor")
    if settings.backend not in BACKENDS:
        raise BtDeployError(
            f"--backend {settings.backend}: serve runs {' or '.join(BACKENDS)}"
            " (TensorRT engines are served by Triton: btdeploy triton-repo --backend tensorrt)"
        )
    target = get_target(settings.backend)
    if settings.spin is not None and "spin" not in target.options:
        raise BtDeployError(
            f"--spin/--no-spin sets ONNX Runtime's workers; the {settings.backend} backend has none: leave it out"
        )
    for manifest in manifests.values():
        split = settings.split and len(manifest.stems) > 1
        if settings.split and not split:
            raise BtDeployError(f"{manifest.folder} has no split graphs: export with --split, or serve without --split")
        options = target.resolve(settings.run_options(split))
        target.artifact(manifest, options)  # names the command that makes a missing graph
        require_processor(manifest)
    if settings.gallery is not None:
        check_gallery(settings, manifests)
    if settings.address is None:
        _check_port(settings.host, settings.port)
    else:
        check_cluster_address(settings.address)
    return manifests


def check_gallery(settings: ServeSettings, manifests: dict[str, Manifest]) -> None:
    """A gallery /v1/search can rank: the rank endpoint served, the itc head's split graphs served
    with it, and the gallery made by the tower graph those settings run (hashed here, before Ray)."""
    from btdeploy.apps.gallery import TOWERS, Gallery
    from btdeploy.backends.split import split_paths, tower_origin

    assert settings.gallery is not None
    unserved = rank_unserved(settings.backend, manifests.get(SCORING_HEAD))
    if unserved:
        raise BtDeployError(f"--gallery is searched by the rank endpoint, which is not served: {unserved}")
    itc = manifests.get(CANDIDATE_HEAD)
    if itc is None or len(itc.stems) < 2:
        raise BtDeployError(
            f"--gallery needs the {CANDIDATE_HEAD} head's split graphs served (its towers make and match the stored "
            "embeddings): export --heads itc,itm --split, and serve both"
        )
    gallery = Gallery.load(Path(settings.gallery))
    if gallery.folder is not None and not gallery.folder.is_dir():
        raise BtDeployError(
            f"--gallery {settings.gallery} indexes {gallery.folder}, which is not a folder here: index the images "
            "where the server reads them"
        )
    options = get_target(settings.backend).resolve(settings.run_options(True))
    tower = split_paths(itc, options)[TOWERS[gallery.kind][0]]
    gallery.require_origin(tower_origin(itc, tower), Path(settings.gallery), "this server runs")


GATEWAY_CPUS = 0.1


def replica_cpus(settings: ServeSettings, deployments: int, cluster_cpus: float) -> float:
    """CPUs Ray reserves per model replica: as asked, or the cluster's CPUs shared among every replica
    the application may run (so it schedules on a 2-core machine; ONNX Runtime still uses every
    core it is given threads for, the reservation only decides placement)."""
    replicas = model_replicas(settings, deployments)
    needed = GATEWAY_CPUS + replicas * (settings.replica_cpus or 0)
    if settings.replica_cpus is not None:
        if needed > cluster_cpus + 1e-9:
            raise BtDeployError(
                f"{replicas} replica(s) of {settings.replica_cpus:g} CPU need {needed:g} CPUs, the Ray cluster has "
                f"{cluster_cpus:g}: lower --replica-cpus or --replicas (or add machines to the cluster)"
            )
        return settings.replica_cpus
    return round(min(1.0, (cluster_cpus - GATEWAY_CPUS) / replicas), 3)


def model_replicas(settings: ServeSettings, deployments: int) -> int:
    """The most model replicas the application may run at once (every head's, and rank's)."""
    return deployments * (settings.max_replicas or settings.replicas)


def rank_unserved(backend: str, head: Manifest | None) -> str | None:
    """Why the rank endpoint is not served, or None: it runs the itm head's split towers, where
    they were exported and the backend runs split graphs."""
    if head is None:
        return f"the {SCORING_HEAD} head is not served"
    if not get_target(backend).runs_split:
        return f"the {backend} backend does not run the split towers that /v1/rank scores with"
    if len(head.stems) < 2:
        return f"{head.folder} has no split graphs (btdeploy export --split makes them)"
    return None


def serves_rank(settings: ServeSettings, manifests: dict[str, Manifest]) -> bool:
    return rank_unserved(settings.backend, manifests.get(SCORING_HEAD)) is None


def replicas_spin(settings: ServeSettings, deployments: int) -> bool | None:
    """Whether the replicas' ONNX Runtime workers spin between operators: as asked, or only where
    one model replica may run; None on a backend without such workers. A spinning worker holds its
    core while it waits; replicas that run at once on the same cores take it from each other (base
    itm int8-dynamic, two replicas on 2 cores: 3.26-4.02 requests/s without spinning, 2.69-3.00
    with). One replica alone served about as many either way, and answers a lone request faster
    spinning (benchmarks/results/serve-base)."""
    if "spin" not in get_target(settings.backend).options:
        return None
    if settings.spin is not None:
        return settings.spin
    return model_replicas(settings, deployments) == 1


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise BtDeployError(f"cannot listen on {host}:{port} ({error.strerror}): pick another --port") from None
