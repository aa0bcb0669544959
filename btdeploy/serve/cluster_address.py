"""The Ray cluster `btdeploy serve --address` joins, checked before Ray is asked to join it.

Ray retries an address where nothing listens, or where something that is not Ray does (its dashboard,
Serve's HTTP port), for about 14 minutes (20 attempts of about 40 s, in compiled code that a stop
waits out); given the other address form's port, or a gRPC server that is not Ray, it says 'Failed
to connect' alone after 20-35 s; with a certificate one end of a TLS cluster refuses, it was still
retrying after 4 minutes; with a certificate that does not name the host given, it retried for minutes
(ray:// gave up after 30 s). Each of those is one line here, within about a second.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btdeploy.errors import BtDeployError

JOIN_HINT = "give the head node's HOST:PORT as `ray start --head` printed it, or leave --address out to start Ray here"
JOIN_CHECK_TIMEOUT_S = 5.0
# Where each address form's server listens unless told otherwise, for the messages that name the port.
GCS_PORT_DEFAULT = "6379 unless `ray start` was told otherwise"
RAY_CLIENT_PORT_DEFAULT = "10001 unless `ray start` was told otherwise"

# The first call each kind of client makes: ray.init asks a HOST:PORT (the head's GCS) for the
# cluster's id, a ray:// client pings the Ray Client server.
GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
RAY_CLIENT_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"

# What Ray reads when RAY_USE_TLS is set: this machine's certificate and key, and the CA that signed
# the cluster's (Ray uses one set for both ends of every connection).
TLS_FILES = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")
TLS_HINT = f"set RAY_USE_TLS=1 and {', '.join(TLS_FILES[:2])} and {TLS_FILES[2]} to the files the cluster's nodes use"

# What an HTTP/2 client sends first: the connection preface and an empty SETTINGS frame (RFC 9113, 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4  # frame type

# The hosts ray.init turns into this machine's own address before it dials a HOST:PORT (Ray's
# is_localhost); a ray:// address is dialed as given.
RAY_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class RayTls:
    """The files RAY_USE_TLS makes Ray use, read as Ray reads them, and a TLS client made of them."""

    cert: bytes
    key: bytes
    ca: bytes
    paths: tuple[str, str, str]
    # Presents this machine's certificate and trusts the cluster's CA. The host name in the cluster's
    # certificate is checked apart (_require_host_named), where Ray checks it, and as leniently.
    context: ssl.SSLContext

    def grpc_credentials(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def ray_tls() -> RayTls | None:
    """Ray's TLS files where RAY_USE_TLS asks for TLS; None where it does not. Incomplete or unreadable
    files are one line here, where Ray raised from inside ray.init."""
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    missing = [name for name in TLS_FILES if not os.environ.get(name)]
    if missing:
        raise BtDeployError(
            f"RAY_USE_TLS is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: Ray reads "
            f"this machine's certificate, its key and the cluster's CA from {', '.join(TLS_FILES)}; "
            "set all three, or unset RAY_USE_TLS to join a cluster without TLS"
        )
    paths = tuple(os.environ[name] for name in TLS_FILES)
    contents = []
    for name, path in zip(TLS_FILES, paths, strict=True):
        try:
            contents.append(Path(path).read_bytes())
        except OSError as error:
            raise BtDeployError(f"{name}={path} cannot be read ({error.strerror or error}): {TLS_HINT}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])  # gRPC's
    try:
        context.load_verify_locations(cadata=contents[2].decode("ascii", "replace"))
    except ssl.SSLError as error:
        reason = _reason(error)
        raise BtDeployError(f"RAY_TLS_CA_CERT={paths[2]} is not a PEM certificate ({reason}): {TLS_HINT}") from None
    try:
        context.load_cert_chain(paths[0], paths[1])
    except ssl.SSLError as error:
        raise BtDeployError(
            f"RAY_TLS_SERVER_CERT={paths[0]} and RAY_TLS_SERVER_KEY={paths[1]} are not a PEM certificate and its own"
            f" key ({_reason(error)}): {TLS_HINT}"
        ) from None
    return RayTls(contents[0], contents[1], contents[2], (paths[0], paths[1], paths[2]), context)


def _reason(error: Exception) -> str:
    """An ssl error's reason without the C source line Python appends to its message."""
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) else str(error).split(" (_ssl.c")[0]


def check_cluster_address(address: str) -> None:
    """A Ray cluster answers at `address`, in the form the address takes, and with TLS where this
    machine asks for it (RAY_USE_TLS) and only there."""
    if address == "auto":  # Ray finds the cluster started on this machine, or says there is none
        return
    if address == "local":
        raise BtDeployError("--address local would start a new Ray cluster: leave --address out for that")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 host, [::1]:6379
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BtDeployError(f"--address {address} is not HOST:PORT or auto: {JOIN_HINT}")
    target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    _check_answers(address, (host, int(port)), target, ray_tls())


def _check_answers(address: str, place: tuple[str, int], target: str, tls: RayTls | None) -> None:
    try:
        answer, closed = _greeting(address, place, tls)
    except _NoTls as error:
        _check_answers(address, place, target, None)  # what listens there: a server that is not Ray is said as such
        raise BtDeployError(
            f"the Ray cluster at {address} speaks without TLS (to TLS it answered: {error}), where RAY_USE_TLS "
            "asks for TLS: unset RAY_USE_TLS to join it"
        ) from None
    if not _is_http2_settings(answer):
        if closed and not answer:  # hung up at once
            if tls is not None:  # after the handshake: the certificate is what it refused
                raise _refused_certificate(address, tls, "it closed the connection after the handshake")
            if _speaks_tls(place):  # on plain HTTP/2
                raise BtDeployError(
                    f"the server at {address} speaks TLS, as a Ray cluster started with RAY_USE_TLS=1 does: {TLS_HINT}"
                )
        _refuse_not_ray(address, answer, closed)
    _check_ray_services(address, target, tls)


class _NoTls(Exception):
    """The server at the address answered a TLS greeting with something that is not TLS."""


def _greeting(address: str, place: tuple[str, int], tls: RayTls | None) -> tuple[bytes, bool]:
    """What the server says to an HTTP/2 client (over TLS with `tls`, once its certificate is known to
    name the host Ray dials), and whether it closed the connection: Ray's GCS and its client server are
    gRPC servers, which answer with a SETTINGS frame."""
    try:
        with socket.create_connection(place, timeout=JOIN_CHECK_TIMEOUT_S) as connection:
            if tls is None:
                return _http2_greeting(connection)
            try:
                secured = tls.context.wrap_socket(connection)
            except ssl.SSLCertVerificationError as error:
                raise BtDeployError(
                    f"the Ray cluster at {address} presented a certificate that RAY_TLS_CA_CERT={tls.paths[2]} "
                    f"does not verify ({error.verify_message}): give the CA that signed the cluster's certificates"
                ) from None
            except TimeoutError:
                return b"", False
            except (ssl.SSLError, ConnectionError) as error:
                raise _NoTls(_reason(error)) from None
            _require_host_named(address, place, secured.getpeercert() or {})
            try:
                return _http2_greeting(secured)
            except (ssl.SSLError, ConnectionError) as error:  # TLS 1.3: a refused certificate arrives as an alert
                raise _refused_certificate(address, tls, _reason(error)) from None
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise BtDeployError(f"no Ray cluster answers at {address} ({reason}): {JOIN_HINT}") from None


def _require_host_named(address: str, place: tuple[str, int], certificate: dict[str, Any]) -> None:
    """The cluster's certificate names the host Ray's gRPC client holds it to: the host as given, except a
    loopback HOST:PORT, which ray.init dials as this machine's own address (a head whose certificate
    lacks that address does not start). Measured against a `ray start` head with TLS and a certificate
    naming its addresses only: HOST:PORT by another name was still retrying after 160 s, ray://localhost
    gave up after 30 s with 'ray client connection timeout'."""
    host, port = place
    form = "ray://" if address.startswith("ray://") else ""
    if not form and host in RAY_LOOPBACK_HOSTS:
        return
    names = _certificate_names(certificate)
    if any(_name_matches(name, host) for name in names):
        return
    instead = ""
    plain = [name for name in names if "*" not in name]
    if plain:  # a name on the same side of this machine as the host given: no loopback for a remote cluster
        near = [name for name in plain if _is_loopback(name) == _is_loopback(host)] or plain
        instead = f"--address {form}{f'[{near[0]}]' if ':' in near[0] else near[0]}:{port}, or "
    raise BtDeployError(
        f"the Ray cluster at {address} presented a certificate for {', '.join(names) or 'no host name'}, not for "
        f"{host}: Ray's client refuses a certificate that does not name the host it dials, after retrying for 30 s "
        f"(ray://) to minutes; give {instead}the cluster's nodes certificates whose subjectAltName names {host}"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _certificate_names(certificate: dict[str, Any]) -> list[str]:
    """The host names and addresses a peer certificate (ssl's getpeercert()) is for: its subjectAltName,
    or its common name where it has none (as gRPC reads it)."""
    alternatives = certificate.get("subjectAltName", ())
    names = [str(value).strip() for kind, value in alternatives if kind in ("DNS", "IP Address")]
    if names:
        return names
    return [str(value) for part in certificate.get("subject", ()) for key, value in part if key == "commonName"]


def _name_matches(name: str, host: str) -> bool:
    """Whether a certificate's name covers `host`: the same address, the same name in any case, or a
    wildcard for the host's leftmost label ('*.example.com' covers 'head.example.com' only)."""
    try:
        return ipaddress.ip_address(name) == ipaddress.ip_address(host)
    except ValueError:
        pass
    name, host = name.lower().rstrip("."), host.lower().rstrip(".")
    if name.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == name[2:]
    return name == host


def _refused_certificate(address: str, tls: RayTls, reason: str) -> BtDeployError:
    return BtDeployError(
        f"the Ray cluster at {address} refused this machine's certificate RAY_TLS_SERVER_CERT={tls.paths[0]} "
        f"({reason}): give a certificate signed by the CA the cluster's nodes trust"
    )


def _http2_greeting(connection: socket.socket) -> tuple[bytes, bool]:
    """The first bytes the server sends back to an HTTP/2 preface (empty when it says nothing within the
    timeout), and whether it closed the connection."""
    connection.sendall(HTTP2_PREFACE)
    answer = b""
    try:
        while len(answer) < 9:
            chunk = connection.recv(64)
            if not chunk:
                return answer, True
            answer += chunk
    except TimeoutError:
        pass
    return answer, False


def _is_http2_settings(answer: bytes) -> bool:
    # A frame header: 24-bit length, type, flags, stream id 0 (SETTINGS belong to the connection).
    return len(answer) >= 9 and answer[3] == HTTP2_SETTINGS and answer[5:9] == bytes(4)


def _speaks_tls(place: tuple[str, int]) -> bool:
    """Whether the server answers a TLS greeting with TLS (its certificate not checked: this only tells a
    TLS server that hung up on plain HTTP/2 from anything else)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(place, timeout=JOIN_CHECK_TIMEOUT_S) as connection:
            context.wrap_socket(connection).close()
    except ssl.SSLError as error:  # a TLS alert (a certificate it wants) still comes from a TLS server
        return "ALERT" in _reason(error).upper()
    except OSError:
        return False
    return True


def _refuse_not_ray(address: str, answer: bytes, closed: bool) -> None:
    first_line = answer.decode("ascii", "replace").strip().splitlines()[0][:60] if answer.strip() else ""
    if first_line:
        said = f"it answered {first_line!r}"
    elif closed:
        said = "it closed the connection without a word"
    else:
        said = f"it said nothing in {JOIN_CHECK_TIMEOUT_S:g} s"
    raise BtDeployError(
        f"something listens at {address} but it is not a Ray cluster ({said}, where Ray speaks gRPC; "
        f"Ray's dashboard and Serve's HTTP port are not the address to join): {JOIN_HINT}"
    )


def _check_ray_services(address: str, target: str, tls: RayTls | None) -> None:
    """The gRPC server at --address has the service its form needs. Given the other one's port, or a
    gRPC server that is not Ray, ray.init answered after 20-35 s with 'Failed to connect' alone."""
    try:
        import grpc  # noqa: F401  (Ray's own dependency)
    except ImportError:  # no Ray either: serve_export says what to install
        return
    through_client = address.startswith("ray://")
    needed, other = (RAY_CLIENT_METHOD, GCS_METHOD) if through_client else (GCS_METHOD, RAY_CLIENT_METHOD)
    if _serves(target, needed, tls):
        return
    if not _serves(target, other, tls):
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


def _serves(target: str, method: str, tls: RayTls | None) -> bool:
    """Whether the gRPC server at `target` has `method`. Only 'unimplemented' says no: any other answer
    (a refused token, a ping answered 'not found' for want of a session, a certificate whose host name
    gRPC does not accept) comes from a server that may have it.
    The request is a ping for the Ray Client and empty for the GCS (all fields left at their defaults)."""
    import grpc

    request = b"\x08\x06" if method == RAY_CLIENT_METHOD else b""  # ClusterInfoRequest: field 1 (type) = 6, PING
    channel = grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, tls.grpc_credentials())
    with channel:
        try:
            channel.unary_unary(method)(request, timeout=JOIN_CHECK_TIMEOUT_S)
        except grpc.RpcError as error:
            return error.code() != grpc.StatusCode.UNIMPLEMENTED
    return True
