"""The role the signer marks in every leaf certificate, and the role mark of a TLS peer.

Why a mark: user and collaborator certificates are both TLS clients, so without it they differ by
name alone, and a certificate issued to a person named like a site would be that site. The signer
(`foedus.pki.signing.certify`) therefore adds to every leaf certificate one extended key usage of
our own naming its role, beside the serverAuth/clientAuth that TLS needs (TLS ignores usages it does
not know). It decides the mark from the role it certifies; a request asking for one is refused.

The services read the mark of each caller's certificate (`peer_certificate`, parsed once per
distinct certificate) and compare it with the role their configuration gives the caller's name
(`role_refusal`). A certificate without a mark was made before marks existed (or by another
signer, such as OpenFL's): it is accepted, with one warning per certificate naming the command
that reissues it, since the configuration gives its name one role.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from foedus.pki.requests import Role

logger = logging.getLogger(__name__)

# An OID arc of our own without registering one: ITU-T X.667 (ISO/IEC 9834-8) gives everyone the
# arc 2.25.<a UUID as one decimal integer>; this UUID (c1c355f5-da57-4d26-9bbc-7dd711e87fb3) was
# drawn at random once for foedus. The roles are numbered under it. Never change or reuse these:
# certificates in use carry them.
FOEDUS_ARC = "2.25.257555244557192454266524091570950012851"
_ROLE_ARC = f"{FOEDUS_ARC}.1"
ROLE_OIDS: Mapping[Role, ObjectIdentifier] = {
    Role.AGGREGATOR: ObjectIdentifier(f"{_ROLE_ARC}.1"),  # the aggregator's (director's) host
    Role.COLLABORATOR: ObjectIdentifier(f"{_ROLE_ARC}.2"),  # a site: collaborator and envoy
    Role.USER: ObjectIdentifier(f"{_ROLE_ARC}.3"),  # a person using a director
}
_ROLE_OF_OID = {oid: role for role, oid in ROLE_OIDS.items()}
_TLS_USAGE = {
    Role.AGGREGATOR: ExtendedKeyUsageOID.SERVER_AUTH,
    Role.COLLABORATOR: ExtendedKeyUsageOID.CLIENT_AUTH,
    Role.USER: ExtendedKeyUsageOID.CLIENT_AUTH,
}
_PEER_CACHE_SIZE = 1024  # distinct caller certificates remembered (parsed, warned about)


class Unmarked(enum.Enum):
    """A certificate's role mark when it is not exactly one role."""

    NONE = "none"  # no role mark: made before marks existed, or by another signer
    UNCLEAR = "several or unknown"  # refused: more than one mark, one we never issue, or unreadable


RoleMark = Role | Unmarked


def tls_usage(role: Role) -> ObjectIdentifier:
    """The extended key usage TLS needs of `role`'s certificate: serverAuth or clientAuth."""
    return _TLS_USAGE[role]


def extended_key_usages(role: Role) -> list[ObjectIdentifier]:
    """The extended key usages the signer writes for `role`: TLS's, then the role mark."""
    return [_TLS_USAGE[role], ROLE_OIDS[role]]


def is_role_mark(oid: ObjectIdentifier) -> bool:
    """Whether an extended key usage is a role mark of ours (or claims to be, under our arc)."""
    return oid.dotted_string.startswith(f"{_ROLE_ARC}.")


def describe_usage(oid: ObjectIdentifier) -> str:
    """An extended key usage as a person reads it: a role mark by its role, others dotted."""
    role = _ROLE_OF_OID.get(oid)
    return f"foedus role {role.value}" if role is not None else oid.dotted_string


def role_mark(certificate: x509.Certificate) -> RoleMark:
    """The role the signer marked in `certificate`: a role, no mark, or unclear."""
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return Unmarked.NONE
    except ValueError:  # a malformed extension
        return Unmarked.UNCLEAR
    marks = [oid for oid in usages if is_role_mark(oid)]
    if not marks:
        return Unmarked.NONE
    if len(marks) > 1 or marks[0] not in _ROLE_OF_OID:
        return Unmarked.UNCLEAR
    return _ROLE_OF_OID[marks[0]]


@dataclass(frozen=True)
class PeerCertificate:
    """What the role check needs of a caller's certificate: its mark and what tells it apart."""

    mark: RoleMark
    sha256: str


@functools.lru_cache(maxsize=_PEER_CACHE_SIZE)
def _parse_peer(pem: bytes) -> PeerCertificate:
    """Parsed once per distinct certificate: callers call often, and present the same bytes."""
    sha256 = hashlib.sha256(pem).hexdigest()
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return PeerCertificate(Unmarked.UNCLEAR, sha256)
    return PeerCertificate(role_mark(certificate), sha256)


def peer_certificate(
    auth_context: Mapping[str, Iterable[bytes] | bytes],
) -> PeerCertificate | None:
    """The caller's certificate from gRPC's auth context; None when it presented none."""
    values = auth_context.get("x509_pem_cert") or []
    pems = [values] if isinstance(values, bytes) else list(values)
    if not pems:
        return None
    if len(pems) != 1:
        return PeerCertificate(Unmarked.UNCLEAR, "")
    return _parse_peer(bytes(pems[0]))


class _Once:
    """The certificates already warned about, bounded (an old one seen again much later warns again)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: dict[tuple[str, Role], None] = {}
        self._lock = threading.Lock()

    def first(self, key: tuple[str, Role]) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) >= self._size:
                del self._seen[next(iter(self._seen))]
            self._seen[key] = None
            return True


_warned = _Once(_PEER_CACHE_SIZE)


def role_refusal(
    peer: PeerCertificate | None, *, name: str, expected: Role, listed_as: str, reissue: str
) -> str | None:
    """Why certificate `name` may not act in the `expected` role, or None when it may.

    `listed_as` says where the configuration gives the name its role ("director.yaml envoys"),
    `reissue` the command that issues a certificate for that role. A certificate without a mark
    is accepted, with one warning per certificate naming `reissue`.
    """
    if peer is None or peer.mark is expected:
        return None
    if peer.mark is Unmarked.NONE:
        if _warned.first((peer.sha256, expected)):
            logger.warning(
                "certificate %r has no role mark (made before foedus marked roles, or by another "
                "signer); accepted as a %s certificate because %s names it so; reissue it: %s",
                name,
                expected.value,
                listed_as,
                reissue,
            )
        return None
    shown = (
        f"is a {peer.mark.value} certificate"
        if isinstance(peer.mark, Role)
        else "carries several or unknown role marks"
    )
    return (
        f"certificate {name!r} {shown}, but {listed_as} names {name!r}, which needs a "
        f"{expected.value} certificate: it must be issued for that role ({reissue})"
    )
