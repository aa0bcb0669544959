"""What `btdeploy serve` was asked for, checked before Ray starts (so a mistake is one line)."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from btdeploy.artifacts.manifest import Manifest, head_folders, read_manifest, require_one_checkpoint
from btdeploy.backends.targets import get_target
from btdeploy.errors import BtDeployError
from btdeploy.model.media import require_processor

BACKEND = "onnxruntime"  # what a replica runs; TensorRT users serve with Triton (btdeploy triton-repo)


@dataclass(frozen=True)
class ServeSettings:
    export_dir: str
    heads: tuple[str, ...] = ()  # empty: every exported head
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
    threads: int | None = None  # ONNX Runtime threads per replica (default: every core)
    # Whether a replica's ONNX Runtime workers spin between operators; None: `replicas_spin` decides.
    spin: bool | None = None
    timeout_s: float = 30.0
    max_body_mb: float = 16.0
    max_texts: int = 64  # per task request
    feature_cache: int = 256  # image features kept by the rank endpoint, per replica

    def run_options(self, split: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"precision": self.precision, "split": split}
        if self.flavour:
            options["flavour"] = self.flavour
        if self.threads:
            options["threads"] = self.threads
        if self.spin is not None:
            options["spin"] = self.spin
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
    target = get_target(BACKEND)
    for manifest in manifests.values():
        split = settings.split and len(manifest.stems) > 1
        if settings.split and not split:
            raise BtDeployError(f"{manifest.folder} has no split graphs: export with --split, or serve without --split")
        options = target.resolve(settings.run_options(split))
        target.artifact(manifest, options)  # names the command that makes a missing graph
        require_processor(manifest)
    if settings.address is None:
        _check_port(settings.host, settings.port)
    else:
        _check_cluster_answers(settings.address)
    return manifests


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


def replicas_spin(settings: ServeSettings, deployments: int) -> bool:
    """Whether the replicas' ONNX Runtime workers spin between operators: as asked, or only where
    one model replica may run. A spinning worker holds its core while it waits; replicas that run
    at once on the same cores take it from each other (base itm int8-dynamic, two replicas on 2
    cores: 3.26-4.02 requests/s without spinning, 2.69-3.00 with). One replica alone served about
    as many either way, and answers a lone request faster spinning (benchmarks/results/serve-base)."""
    if settings.spin is not None:
        return settings.spin
    return model_replicas(settings, deployments) == 1


JOIN_HINT = "give the head node's HOST:PORT as `ray start --head` printed it, or leave --address out to start Ray here"
JOIN_CHECK_TIMEOUT_S = 5.0
# Where each address form's server listens unless told otherwise, for the messages that name the port.
GCS_PORT_DEFAULT = "6379 unless `ray start` was told otherwise"
RAY_CLIENT_PORT_DEFAULT = "10001 unless `ray start` was told otherwise"


def _check_cluster_answers(address: str) -> None:
    """A Ray cluster answers at --address before ray.init is asked to join it: Ray retries an address
    where nothing listens, or where something that is not Ray does (its dashboard, Serve's HTTP port),
    for about 14 minutes (20 attempts of about 40 s, in compiled code that a stop waits out)."""
    if address == "auto":  # Ray finds the cluster started on this machine, or says there is none
        return
    if address == "local":
        raise BtDeployError("--address local would start a new Ray cluster: leave --address out for that")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 host, [::1]:6379
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BtDeployError(f"--address {address} is not HOST:PORT or auto: {JOIN_HINT}")
    try:
        with socket.create_connection((host, int(port)), timeout=JOIN_CHECK_TIMEOUT_S) as connection:
            if _ray_uses_tls():  # the GCS speaks TLS: a plain HTTP/2 greeting would be refused
                return
            answer = _http2_greeting(connection)
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise BtDeployError(f"no Ray cluster answers at {address} ({reason}): {JOIN_HINT}") from None
    if not _is_http2_settings(answer):
        first_line = answer.decode("ascii", "replace").strip().splitlines()[0][:60] if answer.strip() else ""
        said = f"it answered {first_line!r}" if first_line else f"it said nothing in {JOIN_CHECK_TIMEOUT_S:g} s"
        raise BtDeployError(
            f"something listens at {address} but it is not a Ray cluster ({said}, where Ray speaks gRPC; "
            f"Ray's dashboard and Serve's HTTP port are not the address to join): {JOIN_HINT}"
        )
    _check_ray_services(address, f"{host}:{port}" if ":" not in host else f"[{host}]:{port}")


# The first call each kind of client makes: ray.init asks a HOST:PORT (the head's GCS) for the
# cluster's id, a ray:// client pings the Ray Client server.
GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
RAY_CLIENT_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"


def _check_ray_services(address: str, target: str) -> None:
    """The gRPC server at --address has the service its form needs. Given the other one's port, or a
    gRPC server that is not Ray, ray.init answered after 20-35 s with 'Failed to connect' alone."""
    try:
        import grpc  # noqa: F401  (Ray's own dependency)
    except ImportError:  # no Ray either: serve_export says what to install
        return
    through_client = address.startswith("ray://")
    needed, other = (RAY_CLIENT_METHOD, GCS_METHOD) if through_client else (GCS_METHOD, RAY_CLIENT_METHOD)
    if _serves(target, needed):
        return
    if not _serves(target, other):
        raise BtDeployError(
            f"something listens at {address} but it is not a Ray cluster (a gRPC server without Ray's services): "
            f"{JOIN_HINT}"
        )
    if through_client:
        raise BtDeployError(
            f"{target} is the head's GCS port, which a ray:// address does not take: give --address {target}"
            f" without ray://, or give ray:// the Ray Client server's port ({RAY_CLIENT_PORT_DEFAULT})"
        )
    raise BtDeployError(
        f"{address} is the Ray Client server's port, not the head's GCS port: give --address ray://{address},"
        f" or the GCS port ({GCS_PORT_DEFAULT})"
    )


def _serves(target: str, method: str) -> bool:
    """Whether the gRPC server at `target` has `method`. Only 'unimplemented' says no: any other answer
    (a refused token, a ping answered 'not found' for want of a session) comes from a server that has it.
    The request is a ping for the Ray Client and empty for the GCS (all fields left at their defaults)."""
    import grpc

    request = b"\x08\x06" if method == RAY_CLIENT_METHOD else b""  # ClusterInfoRequest: field 1 (type) = 6, PING
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(method)(request, timeout=JOIN_CHECK_TIMEOUT_S)
        except grpc.RpcError as error:
            return error.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


# What an HTTP/2 client sends first: the connection preface and an empty SETTINGS frame (RFC 9113, 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4  # frame type


def _http2_greeting(connection: socket.socket) -> bytes:
    """What the server at the other end says to an HTTP/2 client: Ray's GCS and its client server are
    gRPC servers, which answer with a SETTINGS frame. Empty when it says nothing within the timeout."""
    connection.sendall(HTTP2_PREFACE)
    answer = b""
    try:
        while len(answer) < 9:
            chunk = connection.recv(64)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        pass
    return answer


def _is_http2_settings(answer: bytes) -> bool:
    # A frame header: 24-bit length, type, flags, stream id 0 (SETTINGS belong to the connection).
    return len(answer) >= 9 and answer[3] == HTTP2_SETTINGS and answer[5:9] == bytes(4)


def _ray_uses_tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise BtDeployError(f"cannot listen on {host}:{port} ({error.strerror}): pick another --port") from None
