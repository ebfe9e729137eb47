"""The collaborator authenticates its aggregator: real servers, real certificates from our pki.

Each hostile server records every RPC that reaches it; the collaborator must send none (only the
TLS handshake) and say in one line which name it expected and which it was shown.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from foedus.aggregator.cli import main as aggregator_main
from foedus.collaborator.cli import main
from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.errors import (
    AggregatorIdentityError,
    ClientConfigurationError,
    RequestRejectedError,
)
from foedus.pki.binding import binding_name, binding_problem
from foedus.pki.ca import authority_key_identifier, create_root_ca, create_signing_ca, utc_now
from foedus.pki.files import read_certificate, write_certificate, write_private_key
from foedus.pki.keys import generate_private_key, signature_hash
from foedus.pki.layout import CertsLayout
from foedus.pki.local import load_signing_ca, setup_local_federation
from foedus.pki.requests import Role, fingerprint
from foedus.pki.roles import ROLE_OIDS
from foedus.pki.tls import load_ca_bundle, load_identity, server_credentials
from foedus.plans import Plan
from foedus.protos import aggregator_pb2
from foedus.protos.aggregator_pb2_grpc import AggregatorStub

from conftest import Identity, issue_identity, with_role_marks
from servers import make_plan, plan_document, running_aggregator

PREFIX = "collaborator: error: "
PING = "/openfl.aggregator.Aggregator/Ping"
HOST_SANS = {"dns_names": ("localhost",), "ip_addresses": ("127.0.0.1",)}


class RecordingHandler(grpc.GenericRpcHandler):
    """Records the method of every RPC that reaches the server, and serves none (UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        with self._lock:
            self.calls.append(handler_call_details.method)  # type: ignore[attr-defined]


@contextmanager
def recording_server(credentials: grpc.ServerCredentials) -> Iterator[tuple[int, RecordingHandler]]:
    """A real gRPC server on 127.0.0.1 with these credentials; yields its port and its record."""
    handler = RecordingHandler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port, handler
    finally:
        server.stop(0)


def serving(identity: Identity, ca_bundle: Path) -> grpc.ServerCredentials:
    """Server credentials presenting `identity`, asking clients for a certificate of `ca_bundle`."""
    return server_credentials(identity.cert, identity.key, ca_bundle)


def plan_file(folder: Path, certs: CertsLayout, port: int, **aggregator: object) -> Path:
    """A collaborator's plan dialling 127.0.0.1:port, expecting the common name 'localhost'."""
    document = plan_document(
        certs,
        aggregator={"host": "127.0.0.1", "port": port, "common_name": "localhost", **aggregator},
        connection={"max_retries": 2, "backoff_initial_seconds": 0, "backoff_max_seconds": 0},
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def client_for(plan: Plan, port: int) -> AggregatorGRPCClient:
    """A client of `plan` (common name 'localhost') dialling 127.0.0.1:port, without waits."""
    return AggregatorGRPCClient.from_plan(
        plan,
        "alice",
        aggregator_address="127.0.0.1",
        aggregator_port=port,
        max_retries=2,
        sleep=lambda _: None,
    )


@pytest.fixture(scope="module")
def rogue_aggregator(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """An aggregator certificate from the federation's own CA for 'rogue.example', whose
    alternative names cover localhost and 127.0.0.1 (another federation's aggregator)."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("rogue"),
        Role.AGGREGATOR,
        "rogue.example",
        signing_key=signing_key,
        signing_cert=signing_cert,
        **HOST_SANS,
    )


@pytest.fixture(scope="module")
def foreign_aggregator(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """An aggregator certificate for 'localhost', made by pki with another CA."""
    root_key, root_cert = create_root_ca("foreign root CA", 30)
    signing_key, signing_cert = create_signing_ca(root_key, root_cert, "foreign signing CA", 30)
    return issue_identity(
        tmp_path_factory.mktemp("foreign_aggregator"),
        Role.AGGREGATOR,
        "localhost",
        signing_key=signing_key,
        signing_cert=signing_cert,
        **HOST_SANS,
    )


@pytest.fixture(scope="module")
def unbound_aggregator(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """An aggregator certificate for 'localhost' from our CA as pki made them before the name
    binding: the same extensions, without the binding's alternative name."""
    signing_key, signing_cert = load_signing_ca(certs)
    key = generate_private_key()
    now = utc_now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(authority_key_identifier(signing_cert), critical=False)
        .sign(signing_key, signature_hash(signing_key))
    )
    folder = tmp_path_factory.mktemp("unbound")
    identity = Identity(cert=folder / "localhost.crt", key=folder / "localhost.key")
    write_private_key(identity.key, key)
    write_certificate(identity.cert, cert)
    return identity


@pytest.fixture(scope="module")
def user_marked_aggregator(
    certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory
) -> Identity:
    """The aggregator's certificate for 'localhost', binding and all, but marked as a person's."""
    signing_key, signing_cert = load_signing_ca(certs)
    folder = tmp_path_factory.mktemp("user_marked")
    identity = issue_identity(
        folder,
        Role.AGGREGATOR,
        "localhost",
        signing_key=signing_key,
        signing_cert=signing_cert,
        **HOST_SANS,
    )
    cert = with_role_marks(read_certificate(identity.cert), signing_key, ROLE_OIDS[Role.USER])
    write_certificate(identity.cert, cert)
    return identity


def collaborator_as_server(certs: CertsLayout) -> Identity:
    """Alice's own certificate (clientAuth, our CA) presented by a server."""
    return Identity(cert=certs.collaborator_cert("alice"), key=certs.collaborator_key("alice"))


@pytest.mark.parametrize(
    "case",
    [
        ("rogue_aggregator", "'rogue.example'", "expected 'localhost'"),
        ("foreign_aggregator", "issued by 'CN=foreign signing CA'", "fails verification"),
        ("collaborator", "names 'alice'", "unsuitable certificate purpose"),
        ("unbound_aggregator", "names 'localhost'", "reissue it with 'pki setup --plan PLAN'"),
        (
            "user_marked_aggregator",
            "for 'localhost' marked as a user certificate",
            "issued with 'pki certify --role aggregator'",
        ),
    ],
    ids=[
        "other-name-same-ca",
        "other-ca",
        "collaborator-certificate",
        "made-before-binding",
        "marked-for-another-role",
    ],
)
def test_collaborator_refuses_a_server_that_is_not_its_aggregator(
    certs: CertsLayout,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, str, str],
) -> None:
    """Another CN under our CA (SANs covering the host), another CA, a collaborator's certificate,
    or one made before the name binding: `collaborator start` sends no RPC and exits 1 saying why."""
    server, presented, reason = case
    identity = (
        collaborator_as_server(certs)
        if server == "collaborator"
        else cast(Identity, request.getfixturevalue(server))
    )
    with recording_server(serving(identity, certs.ca_bundle)) as (port, handler):
        code = main(["start", "-n", "alice", "--plan", str(plan_file(tmp_path, certs, port))])
        assert handler.calls == []
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(PREFIX)]
    assert code == 1, captured.err
    assert len(lines) == 1, captured.err
    assert f"127.0.0.1:{port}" in lines[0]
    assert "'localhost'" in lines[0]  # the name expected
    assert presented in lines[0] and reason in lines[0]
    assert "Traceback" not in captured.err


def test_grpc_itself_refuses_another_common_name_in_the_session(
    certs: CertsLayout, rogue_aggregator: Identity
) -> None:
    """The channel alone (no look of our own first) fails the handshake with a rogue of our CA
    whose SANs cover the host: the binding is checked in the session that would carry the RPC."""
    plan = make_plan(certs)
    with recording_server(serving(rogue_aggregator, certs.ca_bundle)) as (port, handler):
        client = client_for(plan, port)
        channel = client._open_channel()
        try:
            with pytest.raises(grpc.RpcError) as raised:
                AggregatorStub(channel).Ping(aggregator_pb2.PingRequest(), timeout=30)  # type: ignore[attr-defined]
        finally:
            channel.close()
        assert handler.calls == []
    error = cast(grpc.Call, raised.value)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "Hostname Verification" in (error.details() or "")


class SwapAfterFirstHandshake:
    """A server certificate fetcher: the first handshake sees `first`, every later one `then`."""

    def __init__(self, first: Identity, then: Identity, ca_bundle: Path) -> None:
        self.initial = self._config(first, ca_bundle)
        self._then = self._config(then, ca_bundle)
        self.handshakes = 0

    @staticmethod
    def _config(identity: Identity, ca_bundle: Path) -> grpc.ServerCertificateConfiguration:
        cert_pem, key_pem = load_identity(identity.cert, identity.key)
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)], root_certificates=load_ca_bundle(ca_bundle)
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        self.handshakes += 1  # gRPC asks once per handshake; None keeps the current one
        return self._then if self.handshakes == 2 else None


def test_a_server_that_shows_the_right_certificate_only_to_the_first_look_gets_nothing(
    certs: CertsLayout, rogue_aggregator: Identity
) -> None:
    """The collaborator's own look sees the aggregator's certificate, the RPC's handshake a
    rogue's: gRPC refuses that session, the next look names the rogue, and no RPC arrives."""
    plan = make_plan(certs)
    real = Identity(cert=certs.aggregator_cert, key=certs.aggregator_key)
    fetcher = SwapAfterFirstHandshake(real, rogue_aggregator, certs.ca_bundle)
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], fetcher)
    credentials = grpc.dynamic_ssl_server_credentials(fetcher.initial, fetch, True)
    with recording_server(credentials) as (port, handler):
        with pytest.raises(AggregatorIdentityError, match=r"names 'rogue\.example'"):
            client_for(plan, port).ping()
        assert handler.calls == []
    assert fetcher.handshakes >= 3  # our look, gRPC's refused session, our second look


def test_the_real_aggregator_is_accepted_and_a_pinned_fingerprint_too(certs: CertsLayout) -> None:
    """With the aggregator's certificate, pinned or not, the RPC goes through."""
    pin = fingerprint(read_certificate(certs.aggregator_cert)).upper()
    for aggregator in ({}, {"fingerprint": ":".join(pin[i : i + 2] for i in range(0, 64, 2))}):
        plan = make_plan(certs, aggregator=aggregator)
        with running_aggregator(plan) as server, client_for(plan, server.port) as client:
            client.ping()


def test_a_wrong_fingerprint_sends_nothing(certs: CertsLayout) -> None:
    """The aggregator's own certificate, pinned to another fingerprint: refused, naming both."""
    plan = make_plan(certs, aggregator={"fingerprint": "ab" * 32})
    real = Identity(cert=certs.aggregator_cert, key=certs.aggregator_key)
    actual = fingerprint(read_certificate(certs.aggregator_cert))
    with recording_server(serving(real, certs.ca_bundle)) as (port, handler):
        with pytest.raises(AggregatorIdentityError) as raised:
            client_for(plan, port).ping()
        assert handler.calls == []
    assert f"SHA-256 is {actual}" in str(raised.value)
    assert f"aggregator.fingerprint pins {'ab' * 32}" in str(raised.value)


def test_the_look_lets_the_rpc_through_to_the_real_certificate(certs: CertsLayout) -> None:
    """Against a recording server with the aggregator's certificate the RPC arrives, so the
    refusals above are the checks', not the test server's."""
    plan = make_plan(certs)
    real = Identity(cert=certs.aggregator_cert, key=certs.aggregator_key)
    with recording_server(serving(real, certs.ca_bundle)) as (port, handler):
        with pytest.raises(RequestRejectedError) as raised:
            client_for(plan, port).ping()
        assert handler.calls == [PING]
    assert raised.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_setup_reissues_a_certificate_without_the_binding(
    certs: CertsLayout, unbound_aggregator: Identity, tmp_path: Path
) -> None:
    """`pki setup` renews an aggregator certificate made before the binding, keeping its key."""
    layout = CertsLayout(tmp_path / "certs")
    shutil.copytree(certs.root, layout.root)
    shutil.copy2(unbound_aggregator.cert, layout.aggregator_cert)
    shutil.copy2(unbound_aggregator.key, layout.aggregator_key)
    result = setup_local_federation(
        layout,
        aggregator_host="localhost",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1", "::1"],
        collaborators=["alice", "bob", "carol"],
    )
    assert result.renewed == ("aggregator localhost",)
    names = (
        read_certificate(layout.aggregator_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.DNSName)
    )
    assert binding_name("localhost") in names


def test_binding_problem_names_what_collaborators_would_refuse(
    certs: CertsLayout, rogue_aggregator: Identity, unbound_aggregator: Identity
) -> None:
    """The aggregator's certificate passes; another name or a missing binding is said."""
    assert binding_problem(read_certificate(certs.aggregator_cert), "localhost") is None
    assert binding_problem(read_certificate(certs.aggregator_cert), "LOCALHOST") is None
    rogue = binding_problem(read_certificate(rogue_aggregator.cert), "localhost")
    assert rogue == "the certificate names 'rogue.example', collaborators expect 'localhost'"
    unbound = binding_problem(read_certificate(unbound_aggregator.cert), "localhost")
    assert unbound is not None and "lacks the name binding" in unbound


def test_aggregator_start_warns_of_a_certificate_collaborators_refuse(
    certs: CertsLayout,
    unbound_aggregator: Identity,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`aggregator start` with a certificate made before the binding says at start to reissue it
    (it still serves: OpenFL collaborators do not check the binding); here its port is taken."""
    layout = CertsLayout(tmp_path / "certs")
    shutil.copytree(certs.root, layout.root)
    shutil.copy2(unbound_aggregator.cert, layout.aggregator_cert)
    shutil.copy2(unbound_aggregator.key, layout.aggregator_key)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        document = plan_document(
            layout,
            aggregator={"port": taken.getsockname()[1], "output_dir": str(tmp_path / "out")},
        )
        plan = tmp_path / "plan.yaml"
        plan.write_text(yaml.safe_dump(document), encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="foedus.aggregator.cli"):
            assert aggregator_main(["start", "--plan", str(plan)]) == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "foedus.aggregator.cli"]
    assert str(layout.aggregator_cert) in warning
    assert "lacks the name binding" in warning
    assert f"reissue it with 'pki setup --plan {plan}'" in warning


def test_a_client_normalises_its_pin_and_refuses_a_malformed_one(certs: CertsLayout) -> None:
    """A pin given to the client directly is read as the plan reads it, or refused by name."""
    plan = make_plan(certs, aggregator={"port": 50051})
    pin = fingerprint(read_certificate(certs.aggregator_cert))
    client = AggregatorGRPCClient.from_plan(plan, "alice", aggregator_fingerprint=pin.upper())
    assert client.expected.fingerprint == pin
    with pytest.raises(ClientConfigurationError, match="aggregator_fingerprint: fingerprint 'xyz'"):
        AggregatorGRPCClient.from_plan(plan, "alice", aggregator_fingerprint="xyz")
