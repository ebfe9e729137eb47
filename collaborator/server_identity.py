"""Whether the server we dial is this federation's aggregator, checked before any RPC is sent.

Two checks, each for what it can do:

* In the TLS session that carries the RPCs: the channel's `grpc.ssl_target_name_override` is the
  name `foedus.pki.binding` derives from the expected common name (`aggregator.common_name`), which
  our signer writes into the aggregator's certificate and nobody can request. gRPC checks it in the
  handshake, with the CA chain, so a certificate of the federation's CA with another common name
  fails there even when its alternative names cover the host, and no RPC follows. grpcio's Python
  client cannot show us the certificate of that session, nor take a callback.
* On a handshake of its own (`check_aggregator`, before the channel's first call and after
  every connection failure), with Python's `ssl` and the same CA bundle, client certificate and
  server name: reads the certificate, so the collaborator can say in one line which name it
  expected and which it was shown, tell an aggregator certificate made before the binding
  (reissue it with pki) from a stranger, refuse one whose role mark (`foedus.pki.roles`) is not the
  aggregator's, and compare `aggregator.fingerprint`. The fingerprint is therefore checked on
  that handshake, not inside the RPCs' session: a server that showed the pinned certificate
  there and another to gRPC would still need a certificate of our CA with the expected common
  name.

Nothing of ours but the TLS handshake reaches a server that fails either check.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from foedus.collaborator.errors import AggregatorIdentityError
from foedus.pki.binding import binding_name, canonical_common_name, has_binding
from foedus.pki.errors import PkiError
from foedus.pki.requests import Role
from foedus.pki.roles import Unmarked, role_mark
from foedus.pki.tls import common_name
from foedus.protos.channel import host_port


class ProbeFailedError(Exception):
    """The handshake of our own did not complete (network, timeout, TLS alert): try again later."""


@dataclass(frozen=True)
class ExpectedAggregator:
    """Who the aggregator must be: its certificate's common name and, optionally, its SHA-256."""

    common_name: str
    fingerprint: str | None = None  # 64 lower-case hex digits (plans normalise it)

    @property
    def server_name(self) -> str:
        """The name gRPC and the probe ask for (SNI) and gRPC checks: the common name's binding."""
        return binding_name(self.common_name)


@dataclass(frozen=True)
class ClientFiles:
    """The files the probe's handshake uses, the same as the channel's."""

    ca_bundle: Path
    certificate: Path | None
    private_key: Path | None


def check_aggregator(
    host: str,
    port: int,
    expected: ExpectedAggregator,
    files: ClientFiles,
    *,
    timeout: float,
) -> None:
    """Raise `AggregatorIdentityError` unless the server at host:port shows the expected certificate.

    Raises `ProbeFailedError` when no handshake completed, which says nothing about who is there.
    """
    target = host_port(host, port)
    try:
        der = _handshake(host, port, _verifying_context(files), expected.server_name, timeout)
    except ssl.SSLCertVerificationError as error:
        shown = _unverified_certificate(host, port, expected.server_name, timeout)
        raise AggregatorIdentityError(
            f"the server at {target} is not this federation's aggregator: its certificate "
            f"({_describe(shown)}) fails verification as a server certificate of the CA bundle "
            f"{files.ca_bundle} ({error.verify_message}); expected one of that CA for "
            f"{expected.common_name!r} (aggregator.common_name); nothing but the TLS handshake "
            f"was sent"
        ) from None
    except (OSError, ValueError) as error:  # ssl.SSLError and socket errors are OSErrors
        raise ProbeFailedError(f"TLS handshake with {target} failed: {error}") from None
    certificate = x509.load_der_x509_certificate(der)
    presented = _common_name_or_none(certificate)
    if presented is None or canonical_common_name(presented) != canonical_common_name(
        expected.common_name
    ):
        raise AggregatorIdentityError(
            f"the server at {target} is not this federation's aggregator: its certificate names "
            f"{presented!r}, expected {expected.common_name!r} (aggregator.common_name); nothing "
            f"but the TLS handshake was sent"
        )
    if not has_binding(certificate, expected.common_name):
        raise AggregatorIdentityError(
            f"the aggregator's certificate at {target} names {presented!r} but lacks the name "
            f"binding collaborators check (DNS:{expected.server_name}): it was made before foedus "
            f"checked it, or by another signer; reissue it with 'pki setup --plan PLAN' or "
            f"'pki certify --role aggregator' (nothing but the TLS handshake was sent)"
        )
    mark = role_mark(certificate)
    if mark is not Role.AGGREGATOR and mark is not Unmarked.NONE:  # unmarked: made before marks
        kind = f"a {mark.value}" if isinstance(mark, Role) else "an unclear (several or unknown)"
        raise AggregatorIdentityError(
            f"the server at {target} shows a certificate for {presented!r} marked as {kind} "
            f"certificate, not an aggregator's; it must be issued with 'pki certify --role "
            f"aggregator' (nothing but the TLS handshake was sent)"
        )
    if expected.fingerprint is not None:
        actual = hashlib.sha256(der).hexdigest()
        if not hmac.compare_digest(actual, expected.fingerprint):
            raise AggregatorIdentityError(
                f"the server at {target} shows a certificate for {presented!r} whose SHA-256 is "
                f"{actual}; aggregator.fingerprint pins {expected.fingerprint}; nothing but the "
                f"TLS handshake was sent"
            )


def _verifying_context(files: ClientFiles) -> ssl.SSLContext:
    """Verify the chain (dates, serverAuth) against our CA bundle; names are checked above."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the binding and common name are checked on the certificate
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=str(files.ca_bundle))
        if files.certificate is not None and files.private_key is not None:
            context.load_cert_chain(str(files.certificate), str(files.private_key))
    except (OSError, ValueError) as error:
        raise ProbeFailedError(f"cannot load the TLS files: {error}") from None
    return context


def _handshake(
    host: str, port: int, context: ssl.SSLContext, server_name: str, timeout: float
) -> bytes:
    """One TLS handshake; the server's certificate (DER). The connection closes at once."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ProbeFailedError("the server showed no certificate")
    return der


def _unverified_certificate(
    host: str, port: int, server_name: str, timeout: float
) -> x509.Certificate | None:
    """The certificate of a server that failed verification, to name it; without ours (TLS 1.3
    shows the server's before asking for the client's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        return x509.load_der_x509_certificate(_handshake(host, port, context, server_name, timeout))
    except (OSError, ValueError, ProbeFailedError):
        return None


def _common_name_or_none(certificate: x509.Certificate) -> str | None:
    try:
        return common_name(certificate)
    except PkiError:
        return None


def _describe(certificate: x509.Certificate | None) -> str:
    if certificate is None:
        return "not readable"
    issuer = certificate.issuer.rfc4514_string() or "nobody"
    return f"names {_common_name_or_none(certificate)!r}, issued by {issuer!r}"
