"""Tests of gRPC credential loading from pki files, rotation of server certificates, and a real mTLS handshake."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from foedus.pki.errors import (
    CertificateValidityError,
    KeyFileError,
    MissingTLSFileError,
    PemFileError,
    PkiError,
)
from foedus.pki.files import read_certificate
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import (
    ServerCertificateFetcher,
    channel_credentials,
    check_tls_files,
    common_name,
    server_credentials,
)

from conftest import Identity

CALL_TIMEOUT = 5.0


def _copy(source: Identity, folder: Path) -> Identity:
    """Copy an identity into folder (keeping mode 0600 on the key), so a test may change it freely."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = Identity(cert=folder / "server.crt", key=folder / "server.key")
    shutil.copy2(source.cert, copy.cert)
    shutil.copy2(source.key, copy.key)
    return copy


def _replace(target: Identity, source: Identity) -> None:
    """Replace target's files with source's as an operator would: write new files, rename them over."""
    for src, dst in ((source.key, target.key), (source.cert, target.cert)):
        temp = dst.with_suffix(".new")
        shutil.copy2(src, temp)
        temp.replace(dst)


def _aggregator(certs: CertsLayout) -> Identity:
    return Identity(cert=certs.aggregator_cert, key=certs.aggregator_key)


def test_common_name_reads_the_subject(certs: CertsLayout) -> None:
    """common_name gives the CN foedus authenticates peers by."""
    assert common_name(read_certificate(certs.collaborator_cert("carol"))) == "carol"
    assert common_name(read_certificate(certs.aggregator_cert)) == "localhost"


def test_credentials_for_valid_files(certs: CertsLayout) -> None:
    """Valid files give server credentials, and client credentials with or without a client certificate."""
    agg = _aggregator(certs)
    for require in (True, False):
        credentials = server_credentials(
            agg.cert, agg.key, certs.ca_bundle, require_client_auth=require
        )
        assert isinstance(credentials, grpc.ServerCredentials)
    alice = channel_credentials(
        certs.ca_bundle, certs.collaborator_cert("alice"), certs.collaborator_key("alice")
    )
    assert isinstance(alice, grpc.ChannelCredentials)
    assert isinstance(channel_credentials(certs.ca_bundle, None, None), grpc.ChannelCredentials)


def _bad_files(certs: CertsLayout, tmp_path: Path, case: str) -> tuple[Path, Path, Path, Path]:
    """(cert, key, bundle, the file the error must name) for one broken configuration."""
    cert, key = certs.collaborator_cert("alice"), certs.collaborator_key("alice")
    bundle = certs.ca_bundle
    if case == "missing cert":
        cert = tmp_path / "absent.crt"
        return cert, key, bundle, cert
    if case == "missing key":
        key = tmp_path / "absent.key"
        return cert, key, bundle, key
    if case == "key of someone else":
        key = certs.collaborator_key("bob")
        return cert, key, bundle, key
    if case == "exposed key":
        key = tmp_path / "exposed.key"
        shutil.copy(certs.collaborator_key("alice"), key)
        key.chmod(0o644)
        return cert, key, bundle, key
    if case == "garbage bundle":
        bundle = tmp_path / "bundle.crt"
        bundle.write_text("not a certificate\n")
        return cert, key, bundle, bundle
    cert = certs.collaborator_key("alice")  # "key as cert"
    return cert, key, bundle, cert


CASES = [
    "missing cert",
    "missing key",
    "key of someone else",
    "exposed key",
    "garbage bundle",
    "key as cert",
]


@pytest.mark.parametrize("case", CASES)
def test_server_credentials_name_the_bad_file(
    certs: CertsLayout, tmp_path: Path, case: str
) -> None:
    """server_credentials raises PkiError naming the file at fault."""
    cert, key, bundle, culprit = _bad_files(certs, tmp_path, case)
    with pytest.raises(PkiError) as caught:
        server_credentials(cert, key, bundle)
    assert str(culprit) in str(caught.value)


@pytest.mark.parametrize("case", CASES)
def test_channel_credentials_name_the_bad_file(
    certs: CertsLayout, tmp_path: Path, case: str
) -> None:
    """channel_credentials raises PkiError naming the file at fault."""
    cert, key, bundle, culprit = _bad_files(certs, tmp_path, case)
    with pytest.raises(PkiError) as caught:
        channel_credentials(bundle, cert, key)
    assert str(culprit) in str(caught.value)


def test_channel_credentials_need_cert_and_key_together(certs: CertsLayout) -> None:
    """A client certificate without its key (or the reverse) is refused."""
    with pytest.raises(PkiError, match="together"):
        channel_credentials(certs.ca_bundle, certs.collaborator_cert("alice"), None)
    with pytest.raises(PkiError, match="together"):
        channel_credentials(certs.ca_bundle, None, certs.collaborator_key("alice"))


def test_fetcher_returns_a_new_config_only_when_files_change(
    certs: CertsLayout,
    misnamed_aggregator: Identity,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unchanged files give None; replaced files give a new config once; broken ones warn once and keep the old."""
    served = _copy(_aggregator(certs), tmp_path)
    fetcher = ServerCertificateFetcher(served.cert, served.key, certs.ca_bundle)
    assert fetcher.initial is not None
    assert fetcher() is None
    assert fetcher() is None

    _replace(served, misnamed_aggregator)
    assert fetcher() is not None
    assert fetcher() is None

    served.cert.write_text("half-written\n")
    with caplog.at_level(logging.WARNING, logger="foedus.pki.tls"):
        assert fetcher() is None
        assert fetcher() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(served.cert) in warnings[0].getMessage()

    _replace(served, _aggregator(certs))
    assert fetcher() is not None
    assert fetcher() is None


def test_fetcher_refuses_bad_initial_files(certs: CertsLayout, tmp_path: Path) -> None:
    """A fetcher cannot be made from files that do not load, so a server fails at start-up."""
    with pytest.raises(KeyFileError):
        ServerCertificateFetcher(
            certs.aggregator_cert, certs.collaborator_key("bob"), certs.ca_bundle
        )
    with pytest.raises(PemFileError):
        ServerCertificateFetcher(tmp_path / "none.crt", certs.aggregator_key, certs.ca_bundle)


# --- a real server ------------------------------------------------------------------------------------


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    names: list[bytes] = context.auth_context().get("x509_common_name", [])
    return b",".join(names)


@contextmanager
def _serve(credentials: grpc.ServerCredentials) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(_whoami)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait()


def _call(port: int, credentials: grpc.ChannelCredentials) -> bytes:
    # A local subchannel pool: every call makes a fresh connection and so sees the current certificate.
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        method: Callable[..., bytes] = channel.unary_unary("/test.Who/Am")
        return method(b"", timeout=CALL_TIMEOUT)


def test_mutual_tls_handshake_and_rotation_without_restart(
    certs: CertsLayout, misnamed_aggregator: Identity, foreign_alice: Identity, tmp_path: Path
) -> None:
    """The server sees the client's CN; a foreign client is refused; a replaced server certificate is served at once."""
    served = _copy(_aggregator(certs), tmp_path)
    alice = channel_credentials(
        certs.ca_bundle, certs.collaborator_cert("alice"), certs.collaborator_key("alice")
    )
    foreign = channel_credentials(certs.ca_bundle, foreign_alice.cert, foreign_alice.key)
    with _serve(server_credentials(served.cert, served.key, certs.ca_bundle)) as port:
        assert _call(port, alice) == b"alice"

        with pytest.raises(grpc.RpcError) as refused:
            _call(port, foreign)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        _replace(served, misnamed_aggregator)  # the server no longer names 127.0.0.1
        with pytest.raises(grpc.RpcError) as misnamed:
            _call(port, alice)
        assert misnamed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Hostname" in (
            misnamed.value.details() or ""
        )  # refused for the new certificate's name

        _replace(served, _aggregator(certs))
        assert _call(port, alice) == b"alice"


@pytest.mark.parametrize(
    ("who", "words"), [("expired_alice", "expired on"), ("future_alice", "not valid before")]
)
def test_own_certificate_outside_its_dates_is_refused(
    request: pytest.FixtureRequest, certs: CertsLayout, who: str, words: str
) -> None:
    """Loading an expired or not-yet-valid certificate of our own fails, naming the file."""
    identity: Identity = request.getfixturevalue(who)
    with pytest.raises(CertificateValidityError, match=words) as raised:
        channel_credentials(certs.ca_bundle, identity.cert, identity.key)
    assert str(raised.value).startswith(f"{identity.cert}:")


def test_check_tls_files_names_the_missing_file_and_the_exposed_key(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """A missing file is reported by its role and path; a key readable by others by the fix."""
    files = (("CA bundle", certs.ca_bundle), ("certificate", tmp_path / "absent.crt"))
    with pytest.raises(
        MissingTLSFileError, match=r"certificate not found: .*absent\.crt"
    ) as raised:
        check_tls_files(files, certs.collaborator_key("alice"))
    assert raised.value.absent
    exposed = tmp_path / "exposed.key"
    shutil.copy2(certs.collaborator_key("alice"), exposed)
    exposed.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        check_tls_files((("CA bundle", certs.ca_bundle),), exposed)
    check_tls_files((("CA bundle", certs.ca_bundle),), certs.collaborator_key("alice"))
