"""Sign participants' certificate requests: the signer checks the request and decides every extension."""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from foedus.pki.binding import binding_name
from foedus.pki.ca import CLOCK_SKEW, authority_key_identifier, check_days, utc_now
from foedus.pki.errors import FingerprintError, PkiError, SigningError
from foedus.pki.keys import PrivateKey, key_matches_certificate, public_key_problem, signature_hash
from foedus.pki.requests import (
    Role,
    common_name_of,
    fingerprint,
    normalise_fingerprint,
    subject_alt_names,
    validate_name,
)
from foedus.pki.roles import describe_usage, extended_key_usages, is_role_mark, tls_usage

logger = logging.getLogger(__name__)

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}
_KEY_USAGE_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def _leaf_key_usage(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> x509.KeyUsage:
    """digitalSignature for TLS 1.3; keyAgreement (EC) or keyEncipherment (RSA) for older key exchanges."""
    is_ec = isinstance(public_key, ec.EllipticCurvePublicKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not is_ec,
        data_encipherment=False,
        key_agreement=is_ec,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _usages(usage: x509.KeyUsage) -> set[str]:
    names = {field for field in _KEY_USAGE_FIELDS if getattr(usage, field)}
    if usage.key_agreement:
        names |= {field for field in ("encipher_only", "decipher_only") if getattr(usage, field)}
    return names


def certified_alt_names(
    role: Role, name: str, dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = ()
) -> list[x509.GeneralName]:
    """The alternative names the signer writes: the checked request's, plus (aggregator) the name
    bound to the common name (`foedus.pki.binding`), which no request can ask for."""
    sans = subject_alt_names(role, name, dns_names, ip_addresses)
    if role is Role.AGGREGATOR:
        sans.append(x509.DNSName(binding_name(name)))
    return sans


def _checked_sans(
    csr: x509.CertificateSigningRequest, role: Role, name: str
) -> list[x509.GeneralName]:
    """The SAN entries to certify: the CSR's, each checked, and never more than the role allows."""
    try:
        requested = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        requested = []
    if role is not Role.AGGREGATOR:
        allowed = subject_alt_names(role, name)
        if requested and requested != allowed:
            shown = ", ".join(str(entry.value) for entry in requested)
            raise SigningError(
                f"CSR for {role.value} {name!r} asks for alternative names [{shown}]; "
                f"a {role.value} certificate names only DNS:{name}"
            )
        return allowed
    dns: list[str] = []
    ips: list[str] = []
    for entry in requested:
        if isinstance(entry, x509.DNSName):
            dns.append(entry.value)
        elif isinstance(entry, x509.IPAddress) and isinstance(
            entry.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)
        ):
            ips.append(str(entry.value))
        else:
            raise SigningError(
                f"CSR for aggregator {name!r} asks for alternative name {entry!r}; only DNS names and IP addresses"
            )
    return certified_alt_names(role, name, dns, ips)


def _check_requested_extensions(
    csr: x509.CertificateSigningRequest, role: Role, granted: x509.KeyUsage
) -> None:
    """Refuse a CSR asking for more than this role gets, rather than silently dropping what it asked for."""
    for extension in csr.extensions:
        value = extension.value
        if isinstance(value, (x509.SubjectAlternativeName, x509.SubjectKeyIdentifier)):
            continue
        if isinstance(value, x509.BasicConstraints):
            if value.ca:
                raise SigningError(
                    "CSR asks to be a CA (BasicConstraints ca=true); participants get leaf certificates"
                )
        elif isinstance(value, x509.KeyUsage):
            extra = _usages(value) - _usages(granted)
            if extra:
                raise SigningError(
                    f"CSR asks for key usages {sorted(extra)} which a {role.value} certificate does not get"
                )
        elif isinstance(value, x509.ExtendedKeyUsage):
            marks = [describe_usage(oid) for oid in value if is_role_mark(oid)]
            if marks:
                raise SigningError(
                    f"CSR asks for the role mark {marks}; the signer alone marks a certificate's "
                    f"role, from the role it certifies ({role.value})"
                )
            extra_eku = [
                _EKU_NAMES.get(oid, oid.dotted_string) for oid in value if oid != tls_usage(role)
            ]
            if extra_eku:
                raise SigningError(
                    f"CSR asks for extended key usages {extra_eku} which a {role.value} certificate does not get"
                )
        else:
            raise SigningError(
                f"CSR asks for extension {extension.oid.dotted_string} which the signer does not grant"
            )


def _check_signing_ca(signing_key: PrivateKey, signing_cert: x509.Certificate) -> None:
    if not key_matches_certificate(signing_key, signing_cert):
        raise SigningError("signing CA key does not match the signing CA certificate")
    try:
        constraints = signing_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise SigningError(
            "signing CA certificate is not a CA certificate (BasicConstraints ca=true missing)"
        )


def certify(
    csr: x509.CertificateSigningRequest,
    *,
    role: Role,
    expected_name: str,
    signing_key: PrivateKey,
    signing_cert: x509.Certificate,
    days: int,
    valid_from: datetime.datetime | None = None,
    expected_fingerprint: str | None = None,
) -> x509.Certificate:
    """Issue a participant certificate for a checked CSR; the signer, not the request, sets the extensions."""
    check_days(days)
    validate_name(role, expected_name)
    if expected_fingerprint is not None:
        wanted, actual = normalise_fingerprint(expected_fingerprint), fingerprint(csr)
        if not hmac.compare_digest(wanted, actual):
            raise FingerprintError(
                f"CSR fingerprint {actual} does not match the expected {wanted}; "
                "the request is not the one its owner reported"
            )
    if not csr.is_signature_valid:
        raise SigningError(
            "CSR signature is invalid: the request was altered or not signed by its own key"
        )
    requested_name = common_name_of(csr.subject, "CSR")
    if requested_name != expected_name:
        raise SigningError(
            f"CSR common name {requested_name!r} does not match the name being certified {expected_name!r}"
        )
    public_key = csr.public_key()
    problem = public_key_problem(public_key)
    if problem is not None or not isinstance(
        public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)
    ):
        raise SigningError(f"CSR public key: {problem}")
    key_usage = _leaf_key_usage(public_key)
    sans = _checked_sans(csr, role, expected_name)
    _check_requested_extensions(csr, role, key_usage)
    _check_signing_ca(signing_key, signing_cert)

    if valid_from is not None and valid_from.tzinfo is None:
        raise PkiError("valid_from must be timezone-aware (UTC)")
    start = valid_from if valid_from is not None else utc_now() - CLOCK_SKEW
    end = start + datetime.timedelta(days=days)
    ca_end = signing_cert.not_valid_after_utc
    if end > ca_end:
        # A certificate must not outlive its issuer; shorten it rather than issue a chain that breaks early.
        logger.info(
            "certificate for %s shortened to end with the signing CA on %s", expected_name, ca_end
        )
        end = ca_end
    if end <= start:
        raise SigningError(
            f"signing CA expires on {ca_end:%Y-%m-%d}, before the certificate would start"
        )

    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, expected_name)]))
        .issuer_name(signing_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        # TLS's usage and the role mark (`pki.roles`), which the services compare with the name's role.
        .add_extension(x509.ExtendedKeyUsage(extended_key_usages(role)), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(signing_cert), critical=False)
        .sign(signing_key, signature_hash(signing_key))
    )
