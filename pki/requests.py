"""Participant keys and certificate signing requests, name checks, and fingerprints."""

from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from foedus.pki.binding import RESERVED_DOMAIN, is_reserved
from foedus.pki.errors import CertificateRequestError, FingerprintError
from foedus.pki.keys import PrivateKey, generate_private_key, signature_hash

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_COLLABORATOR_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62}[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Role(enum.Enum):
    """What a certificate is for: the aggregator serves, collaborators and people are clients."""

    AGGREGATOR = "aggregator"
    COLLABORATOR = "collaborator"
    USER = "user"  # a person using a director (`experiment` command); named as collaborators are


def validate_collaborator_name(name: str) -> str:
    """Return name if it is a usable collaborator name (it becomes a CN, a SAN and a file name)."""
    if not isinstance(name, str) or not _COLLABORATOR_NAME.fullmatch(name):
        raise CertificateRequestError(
            f"collaborator name {name!r}: use 1-64 letters, digits, '.', '-' or '_', "
            "starting and ending with a letter or digit"
        )
    _refuse_reserved(name)
    return name


def _refuse_reserved(name: str) -> None:
    """Names under foedus.invalid are written by the signer alone (see `foedus.pki.binding`)."""
    if is_reserved(name):
        raise CertificateRequestError(
            f"name {name!r}: {RESERVED_DOMAIN} is reserved for the names the signer derives"
        )


def parse_ip(text: str) -> IPAddress:
    """Parse an IPv4 or IPv6 address given for a certificate, naming it when it is malformed."""
    try:
        return ipaddress.ip_address(text.strip() if isinstance(text, str) else text)
    except ValueError:
        raise CertificateRequestError(
            f"IP address {text!r} is not a valid IPv4 or IPv6 address"
        ) from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def validate_dns_name(name: str) -> str:
    """Return name if it is a plain DNS host name (letters, digits, '-', dot-separated labels)."""
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= 253
        or not all(_DNS_LABEL.fullmatch(label) for label in name.split("."))
    ):
        raise CertificateRequestError(
            f"DNS name {name!r}: expected a host name like 'agg.example.org' "
            "(letters, digits and '-' in dot-separated labels)"
        )
    _refuse_reserved(name)
    return name


def validate_host(host: str) -> str:
    """Return host if it is a DNS host name or an IP address, as the aggregator's name must be."""
    if isinstance(host, str) and _is_ip(host):
        return host
    if isinstance(host, str) and is_reserved(host):
        _refuse_reserved(host)
    try:
        return validate_dns_name(host)
    except CertificateRequestError:
        raise CertificateRequestError(
            f"aggregator host {host!r}: expected a DNS host name or an IP address"
        ) from None


def validate_name(role: Role, name: str) -> str:
    """Check a certificate's name by the rules of its role."""
    return validate_host(name) if role is Role.AGGREGATOR else validate_collaborator_name(name)


def subject_alt_names(
    role: Role, common_name: str, dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = ()
) -> list[x509.GeneralName]:
    """The SAN entries a certificate of this role and name must carry (aggregator: CN plus extras)."""
    validate_name(role, common_name)
    if isinstance(dns_names, str) or isinstance(ip_addresses, str):
        raise CertificateRequestError(
            "dns_names and ip_addresses must be sequences of strings, not a string"
        )
    if role is not Role.AGGREGATOR:
        if dns_names or ip_addresses:
            raise CertificateRequestError(
                f"{role.value} {common_name!r}: extra DNS names or IP addresses apply only to the aggregator"
            )
        return [x509.DNSName(common_name)]
    dns: list[str] = []
    ips: list[IPAddress] = []
    if _is_ip(common_name):
        ips.append(ipaddress.ip_address(common_name))
    else:
        dns.append(common_name)
    for name in dns_names:
        validate_dns_name(name)
        if name.lower() not in {d.lower() for d in dns}:
            dns.append(name)
    for text in ip_addresses:
        ip = parse_ip(text)
        if ip not in ips:
            ips.append(ip)
    return [*(x509.DNSName(d) for d in dns), *(x509.IPAddress(ip) for ip in ips)]


def build_csr(
    key: PrivateKey,
    role: Role,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> x509.CertificateSigningRequest:
    """Make a CSR for an existing key, so a certificate can be renewed without replacing the key."""
    sans = subject_alt_names(role, common_name, dns_names, ip_addresses)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, signature_hash(key))
    )


def create_key_and_csr(
    role: Role,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    """Make a participant's new P-384 key and the CSR to send to the federation's signer."""
    subject_alt_names(
        role, common_name, dns_names, ip_addresses
    )  # validate before generating a key
    key = generate_private_key()
    return key, build_csr(key, role, common_name, dns_names=dns_names, ip_addresses=ip_addresses)


def common_name_of(name: x509.Name, what: str) -> str:
    """The single common name in name; what (e.g. 'CSR') is used in the error message."""
    attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1:
        raise CertificateRequestError(
            f"{what} has {len(attributes)} common names, expected exactly one"
        )
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def fingerprint(obj: x509.Certificate | x509.CertificateSigningRequest) -> str:
    """SHA-256 of the DER encoding in lowercase hex, for people to compare out of band."""
    return hashlib.sha256(obj.public_bytes(serialization.Encoding.DER)).hexdigest()


def spki_pin(cert: x509.Certificate) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): a key pin, how a browser is told to trust one key only."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def normalise_fingerprint(text: str) -> str:
    """Lowercase hex without separators, so 'AB:CD:...' as printed by other tools compares equal."""
    cleaned = re.sub(r"[\s:]", "", text).lower() if isinstance(text, str) else ""
    if not _HEX64.fullmatch(cleaned):
        shown = text if len(str(text)) <= 80 else f"{str(text)[:77]}..."
        raise FingerprintError(
            f"fingerprint {shown!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
        )
    return cleaned
