"""Create the federation's root CA and the intermediate signing CA."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from foedus.pki.errors import PkiError
from foedus.pki.keys import (
    PrivateKey,
    generate_private_key,
    key_matches_certificate,
    signature_hash,
)

# Certificates start a little in the past so a peer whose clock runs slightly behind accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=1)

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def utc_now() -> datetime.datetime:
    """Current time, timezone-aware in UTC, as every certificate date must be."""
    return datetime.datetime.now(datetime.UTC)


def check_days(days: int) -> None:
    """Refuse a validity period that would make a useless certificate."""
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise PkiError(f"days: expected a whole number of days >= 1, got {days!r}")


def _name(common_name: str) -> x509.Name:
    if not common_name.strip():
        raise PkiError("CA common name must not be empty")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_root_ca(
    common_name: str, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Make a self-signed root CA that anchors trust for one federation."""
    check_days(days)
    key = generate_private_key()
    name = _name(common_name)
    start = utc_now() - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        # path_length=1: the root signs only the signing CA, which signs only leaves.
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, signature_hash(key))
    )
    return key, cert


def create_signing_ca(
    root_key: PrivateKey, root_cert: x509.Certificate, common_name: str, days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Make the intermediate CA that signs participants, so the root key can stay offline."""
    check_days(days)
    if not key_matches_certificate(root_key, root_cert):
        raise PkiError("root CA key does not match the root CA certificate")
    key = generate_private_key()
    start = utc_now() - CLOCK_SKEW
    end = min(start + datetime.timedelta(days=days), root_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority_key_identifier(root_cert), critical=False)
        .sign(root_key, signature_hash(root_key))
    )
    return key, cert


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """AKI pointing at the issuer's SKI (or its key when it has none), so chains build unambiguously."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public = issuer.public_key()
        if not isinstance(public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise PkiError(
                "issuer certificate has no subject key identifier and an unsupported key"
            ) from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
