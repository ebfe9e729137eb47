"""Who is calling a gRPC service: the verified client certificate's common name and role mark.

Both services name a caller by its certificate and nothing else; each then decides what that name
may do (`foedus.aggregator.identity.Gatekeeper`, `foedus.director.identity.Roster`). Reading the
name from gRPC's auth context, and refusing a caller without exactly one, is written once here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from foedus.pki.roles import PeerCertificate, peer_certificate
from foedus.refusals.errors import AuthenticationError


@dataclass(frozen=True)
class Peer:
    """A call's TLS peer: the common names of its verified certificate (none without one) and
    the certificate's role mark (None without a certificate)."""

    common_names: tuple[str, ...]
    certificate: PeerCertificate | None


def peer_of(context: grpc.ServicerContext) -> Peer:
    """The TLS peer of a call, from gRPC's auth context."""
    auth = context.auth_context()
    values: Iterable[bytes] | bytes = auth.get("x509_common_name") or []
    if isinstance(values, bytes):
        values = [values]
    names = tuple(value.decode("utf-8", errors="replace") for value in values)
    return Peer(names, peer_certificate(auth))


def caller_name(common_names: Sequence[str], *, service: str, issuer: str) -> str:
    """The one common name a caller's certificate has; `AuthenticationError` without one.

    The message says what `service` ("the aggregator") requires: a certificate issued by
    `issuer` ("this federation's CA").
    """
    if len(common_names) != 1 or not common_names[0]:
        raise AuthenticationError(
            f"no usable client certificate: {service} requires a certificate with one "
            f"common name, issued by {issuer}"
        )
    return common_names[0]
