"""The name that binds an aggregator certificate to its common name, for gRPC's own check.

Why a name of our own: grpcio's Python client shows a caller neither the server's certificate nor
a verification callback, and gRPC's host-name check (also against `grpc.ssl_target_name_override`)
matches the certificate's DNS/IP alternative names, looking at the common name only when there are
none. A target name equal to the aggregator's host therefore lets through any certificate of the
same CA whose alternative names cover the host, whatever its common name (another federation's
aggregator certified by a shared CA). So the signer (`foedus.pki.signing.certify`) writes into every
aggregator certificate one DNS name derived from its common name, in a namespace that only the
signer writes (`foedus.invalid`: `.invalid` never resolves, and requests naming it are refused),
and the collaborator dials with `grpc.ssl_target_name_override` set to the name derived from the
common name it expects. gRPC's check in the very TLS session that carries the RPCs then fails for
any other common name, before a byte of an RPC is sent.

The derived name is a hash, so that every common name (DNS names, IPv4 and IPv6 addresses) maps to
one valid DNS label, and no common name can be chosen to collide with another's.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress

from cryptography import x509

# Only pki's signer writes names under this domain; requests naming it are refused.
RESERVED_DOMAIN = "foedus.invalid"
BINDING_DOMAIN = f"cn.{RESERVED_DOMAIN}"


def canonical_common_name(common_name: str) -> str:
    """The form compared and hashed: IP addresses compressed, DNS names lower-case, no final dot."""
    try:
        return ipaddress.ip_address(common_name).compressed
    except ValueError:
        return common_name.rstrip(".").lower()


def binding_name(common_name: str) -> str:
    """The DNS name bound to an aggregator certificate's common name: base32 of its SHA-256."""
    digest = hashlib.sha256(canonical_common_name(common_name).encode("utf-8")).digest()
    label = base64.b32encode(digest).decode("ascii").rstrip("=").lower()  # 52 characters
    return f"{label}.{BINDING_DOMAIN}"


def is_reserved(dns_name: str) -> bool:
    """Whether a DNS name lies in the namespace only the signer writes."""
    name = dns_name.rstrip(".").lower()
    return name == RESERVED_DOMAIN or name.endswith(f".{RESERVED_DOMAIN}")


def has_binding(certificate: x509.Certificate, common_name: str) -> bool:
    """Whether the certificate carries the name bound to `common_name`."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    wanted = binding_name(common_name)
    return any(name.lower() == wanted for name in names.get_values_for_type(x509.DNSName))


def binding_problem(certificate: x509.Certificate, common_name: str) -> str | None:
    """Why foedus collaborators expecting `common_name` would refuse this certificate, or None."""
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    presented = [str(attribute.value) for attribute in names]
    if [canonical_common_name(name) for name in presented] != [canonical_common_name(common_name)]:
        return f"the certificate names {', '.join(map(repr, presented)) or 'nobody'}, collaborators expect {common_name!r}"
    if not has_binding(certificate, common_name):
        return f"the certificate lacks the name binding collaborators check (DNS:{binding_name(common_name)})"
    return None
