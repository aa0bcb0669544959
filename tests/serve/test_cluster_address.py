"""`btdeploy serve --address`: the cluster's address checked before Ray is asked to join it, against
stand-ins on loopback (a closed port, a TCP listener, gRPC servers with or without TLS). The real
head, with both address forms, is in test_cluster.py."""

from __future__ import annotations

import datetime
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from btdeploy.errors import BtDeployError
from btdeploy.serve.settings import ServeSettings, check_settings

# TLS as Ray has it: RAY_USE_TLS with RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY and RAY_TLS_CA_CERT.


def _certificate(
    folder: Path, name: str, issuer: tuple[Any, Any] | None, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> tuple[Any, Any]:
    """A key and certificate named `name` for `hosts` in `folder` (name.crt, name.key), signed by
    `issuer` (its certificate and key), or by itself as a CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_certificate, signer_key = issuer if issuer is not None else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_certificate.subject if signer_certificate is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        import ipaddress

        names = [
            x509.DNSName(host) if host == "localhost" else x509.IPAddress(ipaddress.ip_address(host)) for host in hosts
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(signer_key, hashes.SHA256())
    (folder / f"{name}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificate, key


@pytest.fixture(scope="module")
def tls_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca signs node (the cluster's and this machine's certificate, as Ray uses one set for both ends)
    and addressonly (127.0.0.1 without the name localhost); otherca signs stranger."""
    folder = tmp_path_factory.mktemp("tls")
    ca = _certificate(folder, "ca", None)
    _certificate(folder, "node", ca)
    _certificate(folder, "addressonly", ca, hosts=("127.0.0.1",))
    other = _certificate(folder, "otherca", None)
    _certificate(folder, "stranger", other)
    return folder


def _use_tls(
    monkeypatch: pytest.MonkeyPatch,
    folder: Path,
    cert: str = "node",
    key: str = "node",
    ca: str = "ca",
    tls: bool = True,
) -> None:
    """Ray's TLS variables as a node of the stand-in cluster has them, or RAY_USE_TLS unset."""
    if not tls:
        monkeypatch.delenv("RAY_USE_TLS", raising=False)
        return
    monkeypatch.setenv("RAY_USE_TLS", "1")
    monkeypatch.setenv("RAY_TLS_SERVER_CERT", str(folder / f"{cert}.crt"))
    monkeypatch.setenv("RAY_TLS_SERVER_KEY", str(folder / f"{key}.key"))
    monkeypatch.setenv("RAY_TLS_CA_CERT", str(folder / f"{ca}.crt"))


def _refusal(tiny_export: Path, address: str) -> str:
    with pytest.raises(BtDeployError) as error:
        check_settings(ServeSettings(export_dir=str(tiny_export), heads=("itm",), address=address))
    return str(error.value)


def _accepted_or_refused(tiny_export: Path, address: str, refusal: str | None) -> None:
    """The settings with this --address pass where `refusal` is None, else fail with a message starting so."""
    if refusal is None:
        check_settings(ServeSettings(export_dir=str(tiny_export), heads=("itm",), address=address))
    else:
        message = _refusal(tiny_export, address)
        assert message.startswith(refusal), message


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again: nothing listens there


@pytest.mark.parametrize(("address", "message"), [
    ("127.0.0.1:{closed}", "no Ray cluster answers at 127.0.0.1:{closed} (Connection refused): give the head"),
    ("6379", "--address 6379 is not HOST:PORT or auto"),
    ("head:port", "--address head:port is not HOST:PORT or auto"),
    ("local", "--address local would start a new Ray cluster: leave --address out for that"),
])  # fmt: skip
def test_settings_refuse_a_cluster_address_that_cannot_be_joined(tiny_export: Path, address: str, message: str) -> None:
    """Ray retries an address that does not answer for about 14 minutes, in attempts of about 40 s that
    a stop waits out: the address is checked before Ray is asked to join it."""
    closed = _closed_port()
    settings = ServeSettings(export_dir=str(tiny_export), heads=("itm",), address=address.format(closed=closed))
    with pytest.raises(BtDeployError, match=re.escape(message.format(closed=closed))):
        check_settings(settings)


class _Listener:
    """A TCP server on a free loopback port that answers each connection with `reply` (None: says nothing)."""

    def __init__(self, reply: bytes | None) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.reply = reply
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.held.append(connection)
            if self.reply is not None:
                connection.recv(64)
                connection.sendall(self.reply)

    def close(self) -> None:
        self.server.close()
        for connection in self.held:
            connection.close()


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize(("reply", "said"), [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "it answered 'HTTP/1.1 400 Bad Request'"),
    (None, "it said nothing in 0.3 s"),
])  # fmt: skip
def test_settings_refuse_an_address_where_something_else_than_ray_listens(
    tiny_export: Path, tls_folder: Path, monkeypatch: pytest.MonkeyPatch, reply: bytes | None, said: str, tls: bool
) -> None:
    """Ray's dashboard or Serve's HTTP port given as --address: Ray retried it for 13 min 40 s, then
    blamed token authentication. Named as such with RAY_USE_TLS too."""
    from btdeploy.serve import cluster_address

    monkeypatch.setattr(cluster_address, "JOIN_CHECK_TIMEOUT_S", 0.3)
    _use_tls(monkeypatch, tls_folder, tls=tls)
    listener = _Listener(reply)
    try:
        message = _refusal(tiny_export, f"127.0.0.1:{listener.port}")
    finally:
        listener.close()
    expected = f"something listens at 127.0.0.1:{listener.port} but it is not a Ray cluster ({said}"
    assert message.startswith(expected), message
    assert "give the head node's HOST:PORT" in message


def _grpc_server(
    answers: dict[str, str | None], tls_folder: Path | None = None, certificate: str = "node", host: str = "127.0.0.1"
) -> tuple[Any, int]:
    """A gRPC server on a free port of `host` with only these methods: each answers an empty reply, or
    refuses with the status named (as Ray's services refuse a call without the cluster's token). With
    `tls_folder`, over TLS as Ray's are with RAY_USE_TLS: `certificate` (node.crt), clients' signed by ca.crt."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    class Methods(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            if details.method not in answers:
                return None  # grpc answers UNIMPLEMENTED
            refusal = answers[details.method]

            def answer(request: bytes, context: Any) -> bytes:
                if refusal is not None:
                    context.abort(getattr(grpc.StatusCode, refusal), "refused")
                return b""

            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(ThreadPoolExecutor(max_workers=1), handlers=[Methods()])
    if tls_folder is None:
        port = server.add_insecure_port(f"{host}:0")
    else:
        node = ((tls_folder / f"{certificate}.key").read_bytes(), (tls_folder / f"{certificate}.crt").read_bytes())
        ca = (tls_folder / "ca.crt").read_bytes()
        credentials = grpc.ssl_server_credentials([node], root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port(f"{host}:0", credentials)
    server.start()
    return server, port


GCS = "/ray.rpc.NodeInfoGcsService/GetClusterId"
RAY_CLIENT = "/ray.rpc.RayletDriver/ClusterInfo"


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize(("answers", "given", "refusal"), [
    ({GCS: None}, "127.0.0.1:{port}", None),
    ({GCS: "UNAUTHENTICATED"}, "127.0.0.1:{port}", None),  # token authentication: still Ray's GCS
    ({RAY_CLIENT: None}, "ray://127.0.0.1:{port}", None),
    ({RAY_CLIENT: "UNAUTHENTICATED"}, "ray://127.0.0.1:{port}", None),
    ({RAY_CLIENT: None}, "127.0.0.1:{port}",
     "127.0.0.1:{port} is the Ray Client server's port, not the head's GCS port: give --address ray://127.0.0.1:{port}"),
    ({GCS: None}, "ray://127.0.0.1:{port}",
     "127.0.0.1:{port} is the head's GCS port, which a ray:// address does not take: give --address 127.0.0.1:{port}"
     " without ray://"),
    ({}, "127.0.0.1:{port}", "something listens at 127.0.0.1:{port} but it is not a Ray cluster (a gRPC server"),
    ({}, "ray://127.0.0.1:{port}", "something listens at ray://127.0.0.1:{port} but it is not a Ray cluster"),
])  # fmt: skip
def test_settings_ask_the_grpc_server_at_the_address_for_the_service_its_form_needs(
    tiny_export: Path, tls_folder: Path, monkeypatch: pytest.MonkeyPatch,
    answers: dict[str, str | None], given: str, refusal: str | None, tls: bool,
) -> None:  # fmt: skip
    """Given the Ray Client's port as HOST:PORT, the GCS port as ray://, or a gRPC server that is not
    Ray, ray.init said 'Failed to connect' alone after 20-35 s. Asked over TLS with RAY_USE_TLS (the
    stand-in then requires this machine's certificate), where only a TCP connection had been checked."""
    _use_tls(monkeypatch, tls_folder, tls=tls)
    server, port = _grpc_server(answers, tls_folder if tls else None)
    try:
        _accepted_or_refused(tiny_export, given.format(port=port), refusal and refusal.format(port=port))
    finally:
        server.stop(grace=None)


def test_a_cluster_without_tls_is_named_where_tls_is_asked_for(
    tiny_export: Path, tls_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_tls(monkeypatch, tls_folder)
    server, port = _grpc_server({GCS: None})
    try:
        message = _refusal(tiny_export, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)
    assert message.startswith(f"the Ray cluster at 127.0.0.1:{port} speaks without TLS ("), message
    assert message.endswith("where RAY_USE_TLS asks for TLS: unset RAY_USE_TLS to join it"), message


def test_a_tls_cluster_is_named_where_tls_is_not_asked_for(
    tiny_export: Path, tls_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    server, port = _grpc_server({GCS: None}, tls_folder)
    try:
        message = _refusal(tiny_export, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)
    expected = f"the server at 127.0.0.1:{port} speaks TLS, as a Ray cluster started with RAY_USE_TLS=1 does: set"
    assert message.startswith(expected), message
    assert "RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY and RAY_TLS_CA_CERT" in message


@pytest.mark.parametrize(("files", "refusal"), [
    ({"cert": "stranger", "key": "stranger"},
     "the Ray cluster at 127.0.0.1:{port} refused this machine's certificate"
     " RAY_TLS_SERVER_CERT={folder}/stranger.crt ("),
    ({"ca": "otherca"},
     "the Ray cluster at 127.0.0.1:{port} presented a certificate that RAY_TLS_CA_CERT={folder}/otherca.crt does not"
     " verify ("),
])  # fmt: skip
def test_certificates_the_other_end_refuses_are_named(
    tiny_export: Path, tls_folder: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, Any], refusal: str
) -> None:
    _use_tls(monkeypatch, tls_folder, **files)
    server, port = _grpc_server({GCS: None}, tls_folder)
    try:
        message = _refusal(tiny_export, f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)
    assert message.startswith(refusal.format(port=port, folder=tls_folder)), message


@pytest.mark.parametrize(("certificate", "host", "given", "refusal"), [
    # Ray dials a loopback HOST:PORT as this machine's own address, which a working head's certificate names
    ("addressonly", "127.0.0.1", "localhost:{port}", None),
    ("addressonly", "127.0.0.1", "ray://127.0.0.1:{port}", None),
    ("addressonly", "127.0.0.1", "ray://localhost:{port}",
     "the Ray cluster at ray://localhost:{port} presented a certificate for 127.0.0.1, not for localhost: Ray's client"
     " refuses a certificate that does not name the host it dials, after retrying for 30 s (ray://) to minutes; give"
     " --address ray://127.0.0.1:{port}, or the cluster's nodes certificates whose subjectAltName names localhost"),
    # 127.0.0.2 is loopback to Linux but not one of the hosts Ray turns into this machine's address
    ("node", "127.0.0.2", "127.0.0.2:{port}",
     "the Ray cluster at 127.0.0.2:{port} presented a certificate for 127.0.0.1, localhost, not for 127.0.0.2: "),
    ("node", "127.0.0.2", "ray://127.0.0.2:{port}",
     "the Ray cluster at ray://127.0.0.2:{port} presented a certificate for 127.0.0.1, localhost, not for 127.0.0.2: "),
])  # fmt: skip
def test_a_cluster_certificate_that_does_not_name_the_host_ray_dials_is_named(
    tiny_export: Path, tls_folder: Path, monkeypatch: pytest.MonkeyPatch,
    certificate: str, host: str, given: str, refusal: str | None,
) -> None:  # fmt: skip
    """Against a `ray start` head with TLS whose certificate named its addresses only, HOST:PORT by another
    name was still retrying after 160 s and ray://localhost gave up after 30 s ('ray client connection
    timeout'); the check had passed both."""
    _use_tls(monkeypatch, tls_folder)
    server, port = _grpc_server({GCS: None, RAY_CLIENT: None}, tls_folder, certificate=certificate, host=host)
    try:
        _accepted_or_refused(tiny_export, given.format(port=port), refusal and refusal.format(port=port))
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize(("name", "host", "covers"), [
    ("head.example.com", "HEAD.example.com.", True),
    ("*.example.com", "head.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.head.example.com", False),
    ("0:0:0:0:0:0:0:1", "::1", True),  # as ssl writes an IPv6 subjectAltName
    ("10.0.0.1", "10.0.0.10", False),
])  # fmt: skip
def test_a_certificate_name_covers_a_host_as_grpc_reads_it(name: str, host: str, covers: bool) -> None:
    from btdeploy.serve.cluster_address import _name_matches

    assert _name_matches(name, host) is covers


@pytest.mark.parametrize(("change", "refusal"), [
    ({"RAY_TLS_CA_CERT": None},
     "RAY_USE_TLS is set but RAY_TLS_CA_CERT is not: Ray reads this machine's certificate, its key and the"
     " cluster's CA"),
    ({"RAY_TLS_SERVER_CERT": None, "RAY_TLS_SERVER_KEY": None},
     "RAY_USE_TLS is set but RAY_TLS_SERVER_CERT and RAY_TLS_SERVER_KEY are not"),
    ({"RAY_TLS_SERVER_KEY": "{folder}/missing.key"},
     "RAY_TLS_SERVER_KEY={folder}/missing.key cannot be read (No such file or directory): set RAY_USE_TLS=1 and"),
    ({"RAY_TLS_SERVER_KEY": "{folder}/stranger.key"},
     "RAY_TLS_SERVER_CERT={folder}/node.crt and RAY_TLS_SERVER_KEY={folder}/stranger.key are not a PEM certificate"
     " and its own key (KEY_VALUES_MISMATCH)"),
    ({"RAY_TLS_CA_CERT": "{folder}/node.key"}, "RAY_TLS_CA_CERT={folder}/node.key is not a PEM certificate ("),
])  # fmt: skip
def test_incomplete_or_wrong_tls_files_are_one_line(
    tiny_export: Path, tls_folder: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, str | None], refusal: str
) -> None:
    """Checked before anything is dialed: Ray raised them from inside ray.init."""
    _use_tls(monkeypatch, tls_folder)
    for name, value in change.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value.format(folder=tls_folder))
    message = _refusal(tiny_export, f"127.0.0.1:{_closed_port()}")
    assert message.startswith(refusal.format(folder=tls_folder)), message
