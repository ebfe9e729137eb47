"""Tests of the pki library: CA and leaf extensions, chain verification, signing checks, files, local setup."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from foedus.pki.binding import binding_name
from foedus.pki.ca import create_root_ca, create_signing_ca, utc_now
from foedus.pki.errors import (
    CertificateRequestError,
    FingerprintError,
    KeyFileError,
    PemFileError,
    PkiError,
    SigningError,
)
from foedus.pki.files import (
    check_private_key_mode,
    read_certificate,
    read_certificates,
    read_csr,
    read_private_key,
    write_csr,
    write_private_key,
)
from foedus.pki.keys import generate_private_key, key_matches_certificate, public_key_der
from foedus.pki.layout import CertsLayout
from foedus.pki.local import SetupResult, load_signing_ca, setup_local_federation
from foedus.pki.requests import (
    Role,
    create_key_and_csr,
    fingerprint,
    normalise_fingerprint,
    spki_pin,
)
from foedus.pki.roles import (
    FOEDUS_ARC,
    ROLE_OIDS,
    PeerCertificate,
    Unmarked,
    role_mark,
    role_refusal,
)
from foedus.pki.signing import certify

from conftest import COLLABORATORS, Identity, without_role_mark


def _ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _certify(
    certs: CertsLayout,
    csr: x509.CertificateSigningRequest,
    name: str,
    role: Role = Role.COLLABORATOR,
    *,
    days: int = 1,
    valid_from: datetime.datetime | None = None,
    expected_fingerprint: str | None = None,
) -> x509.Certificate:
    """certify() with the session federation's signing CA."""
    key, cert = load_signing_ca(certs)
    return certify(
        csr,
        role=role,
        expected_name=name,
        signing_key=key,
        signing_cert=cert,
        days=days,
        valid_from=valid_from,
        expected_fingerprint=expected_fingerprint,
    )


def _verifier_builder(certs: CertsLayout) -> PolicyBuilder:
    return PolicyBuilder().store(Store([read_certificate(certs.root_ca_cert)])).time(utc_now())


# --- CA -------------------------------------------------------------------------------------------


def test_root_ca_extensions(certs: CertsLayout) -> None:
    """The root CA is self-signed, a critical CA with path length 1 and critical certificate-signing usage."""
    root = read_certificate(certs.root_ca_cert)
    constraints = _ext(root, x509.BasicConstraints)
    usage = _ext(root, x509.KeyUsage)
    assert constraints.critical and constraints.value == x509.BasicConstraints(
        ca=True, path_length=1
    )
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert _ext(root, x509.SubjectKeyIdentifier).value.digest


def test_signing_ca_extensions(certs: CertsLayout) -> None:
    """The signing CA is issued by the root, path length 0, critical usage, and its AKI names the root's SKI."""
    root = read_certificate(certs.root_ca_cert)
    signing = read_certificate(certs.signing_ca_cert)
    constraints = _ext(signing, x509.BasicConstraints)
    usage = _ext(signing, x509.KeyUsage)
    assert constraints.critical and constraints.value == x509.BasicConstraints(
        ca=True, path_length=0
    )
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    signing.verify_directly_issued_by(root)
    root_ski = _ext(root, x509.SubjectKeyIdentifier).value.digest
    assert _ext(signing, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    assert signing.not_valid_after_utc <= root.not_valid_after_utc


def test_ca_bundle_is_signing_then_root(certs: CertsLayout) -> None:
    """cert_chain.crt holds the signing CA followed by the root CA."""
    bundle = read_certificates(certs.ca_bundle)
    assert bundle == [read_certificate(certs.signing_ca_cert), read_certificate(certs.root_ca_cert)]


def test_ca_rejects_bad_days_and_mismatched_root_key() -> None:
    """create_root_ca refuses zero days; create_signing_ca refuses a root key that is not the root's."""
    with pytest.raises(PkiError, match="days"):
        create_root_ca("x", 0)
    _, root_cert = create_root_ca("x", 1)
    with pytest.raises(PkiError, match="does not match"):
        create_signing_ca(generate_private_key(), root_cert, "y", 1)


# --- leaf certificates ------------------------------------------------------------------------------


def _check_leaf_common(cert: x509.Certificate, certs: CertsLayout) -> None:
    constraints = _ext(cert, x509.BasicConstraints)
    usage = _ext(cert, x509.KeyUsage)
    assert constraints.critical and constraints.value.ca is False
    assert usage.critical and usage.value.digital_signature and usage.value.key_agreement
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    signing = read_certificate(certs.signing_ca_cert)
    signing_ski = _ext(signing, x509.SubjectKeyIdentifier).value.digest
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == signing_ski
    assert _ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        cert.public_key()  # type: ignore[arg-type]
    )
    assert cert.issuer == signing.subject
    assert cert.not_valid_before_utc.tzinfo is not None


def test_aggregator_certificate_extensions(certs: CertsLayout) -> None:
    """The aggregator certificate is a serverAuth leaf marked as the aggregator's, whose SAN holds
    its host name, IP addresses and the name bound to its common name."""
    cert = read_certificate(certs.aggregator_cert)
    _check_leaf_common(cert, certs)
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ROLE_OIDS[Role.AGGREGATOR],
    ]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", binding_name("localhost")]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"


@pytest.mark.parametrize("name", COLLABORATORS)
def test_collaborator_certificate_extensions(certs: CertsLayout, name: str) -> None:
    """A collaborator certificate is a clientAuth leaf marked as a collaborator's, whose SAN is
    exactly DNS:<its name>."""
    cert = read_certificate(certs.collaborator_cert(name))
    _check_leaf_common(cert, certs)
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ROLE_OIDS[Role.COLLABORATOR],
    ]
    assert list(_ext(cert, x509.SubjectAlternativeName).value) == [x509.DNSName(name)]
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


@pytest.mark.parametrize(
    "subject",
    [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ],
)
def test_aggregator_chain_verifies_under_server_policy(
    certs: CertsLayout, subject: x509.DNSName | x509.IPAddress
) -> None:
    """The aggregator certificate chains to the root through the bundle for each of its names."""
    intermediates = read_certificates(certs.ca_bundle)
    chain = (
        _verifier_builder(certs)
        .build_server_verifier(subject)
        .verify(read_certificate(certs.aggregator_cert), intermediates)
    )
    assert chain[-1] == read_certificate(certs.root_ca_cert)


@pytest.mark.parametrize("name", COLLABORATORS)
def test_collaborator_chain_verifies_under_client_policy(certs: CertsLayout, name: str) -> None:
    """Each collaborator certificate chains to the root under the client-auth policy."""
    verified = (
        _verifier_builder(certs)
        .build_client_verifier()
        .verify(read_certificate(certs.collaborator_cert(name)), read_certificates(certs.ca_bundle))
    )
    assert verified.subjects == [x509.DNSName(name)]


def test_collaborator_certificate_fails_server_policy(certs: CertsLayout) -> None:
    """A collaborator certificate cannot pass as a server: it lacks serverAuth."""
    verifier = _verifier_builder(certs).build_server_verifier(x509.DNSName("alice"))
    with pytest.raises(VerificationError, match="EKU"):
        verifier.verify(
            read_certificate(certs.collaborator_cert("alice")), read_certificates(certs.ca_bundle)
        )


def test_misnamed_aggregator_fails_server_policy_for_localhost(
    certs: CertsLayout, misnamed_aggregator: Identity
) -> None:
    """The misnamed aggregator fixture is well signed but does not name localhost."""
    cert = read_certificate(misnamed_aggregator.cert)
    builder = _verifier_builder(certs)
    builder.build_server_verifier(x509.DNSName("elsewhere.example")).verify(
        cert, read_certificates(certs.ca_bundle)
    )
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("localhost")).verify(
            cert, read_certificates(certs.ca_bundle)
        )


@pytest.mark.parametrize("fixture", ["foreign_alice", "expired_alice", "future_alice"])
def test_hostile_alices_fail_client_policy(
    certs: CertsLayout, fixture: str, request: pytest.FixtureRequest
) -> None:
    """Alice from another CA, expired or not yet valid is refused by the client-auth policy."""
    identity: Identity = request.getfixturevalue(fixture)
    assert _mode(identity.key) == 0o600
    with pytest.raises(VerificationError):
        _verifier_builder(certs).build_client_verifier().verify(
            read_certificate(identity.cert), read_certificates(certs.ca_bundle)
        )


def test_stranger_is_well_signed(certs: CertsLayout, stranger: Identity) -> None:
    """The stranger fixture passes the chain check: only the plan's list of names keeps it out."""
    verified = (
        _verifier_builder(certs)
        .build_client_verifier()
        .verify(read_certificate(stranger.cert), read_certificates(certs.ca_bundle))
    )
    assert verified.subjects == [x509.DNSName("mallory")]


# --- signing checks ---------------------------------------------------------------------------------


def test_certify_refuses_csr_for_another_name(certs: CertsLayout) -> None:
    """A CSR whose common name is not the name being certified is refused."""
    _, csr = create_key_and_csr(Role.COLLABORATOR, "mallory")
    with pytest.raises(SigningError, match=r"'mallory' does not match .*'alice'"):
        _certify(certs, csr, "alice")


def test_certify_refuses_altered_csr(certs: CertsLayout) -> None:
    """A CSR altered after signing (its name edited in the DER) fails the signature check."""
    _, csr = create_key_and_csr(Role.COLLABORATOR, "alice")
    der = csr.public_bytes(serialization.Encoding.DER)
    assert der.count(b"alice") == 2  # CN and SAN
    tampered = x509.load_der_x509_csr(der.replace(b"alice", b"alicf"))
    with pytest.raises(SigningError, match="signature is invalid"):
        _certify(certs, tampered, "alicf")


def test_certify_checks_fingerprint(certs: CertsLayout) -> None:
    """A wrong fingerprint is refused; the right one is accepted even with colons and upper case."""
    _, csr = create_key_and_csr(Role.COLLABORATOR, "alice")
    _, other = create_key_and_csr(Role.COLLABORATOR, "alice")
    with pytest.raises(FingerprintError, match="does not match"):
        _certify(certs, csr, "alice", expected_fingerprint=fingerprint(other))
    hex_digits = fingerprint(csr)
    spelled = ":".join(hex_digits[i : i + 2] for i in range(0, 64, 2)).upper()
    cert = _certify(certs, csr, "alice", expected_fingerprint=spelled)
    assert cert.public_key() == csr.public_key()


@pytest.mark.parametrize("text", ["", "abc", "zz" * 32, "ab" * 33])
def test_normalise_fingerprint_rejects_non_sha256(text: str) -> None:
    """Only 64 hex digits (after removing colons and spaces) are a fingerprint."""
    with pytest.raises(FingerprintError, match="not a SHA-256 fingerprint"):
        normalise_fingerprint(text)


def test_fingerprint_is_sha256_of_der(certs: CertsLayout) -> None:
    """The fingerprint of a certificate equals cryptography's own SHA-256 fingerprint."""
    cert = read_certificate(certs.aggregator_cert)
    assert fingerprint(cert) == cert.fingerprint(hashes.SHA256()).hex()
    assert normalise_fingerprint(" " + fingerprint(cert).upper() + "\n") == fingerprint(cert)


def test_spki_pin_is_the_keys_digest(certs: CertsLayout) -> None:
    """The pin is base64(SHA-256) of the certified key's SPKI, read here from the private key."""
    key = read_private_key(certs.aggregator_key)
    expected = base64.b64encode(hashlib.sha256(public_key_der(key)).digest()).decode()
    assert spki_pin(read_certificate(certs.aggregator_cert)) == expected
    assert spki_pin(read_certificate(certs.collaborator_cert("alice"))) != expected


def _custom_csr(name: str, *extensions: x509.ExtensionType) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(generate_private_key(), hashes.SHA384())


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


@pytest.mark.parametrize(
    ("extension", "message"),
    [
        (x509.BasicConstraints(ca=True, path_length=None), "CA"),
        (_CA_USAGE, "key_cert_sign"),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), "serverAuth"),
        (
            x509.SubjectAlternativeName([x509.DNSName("alice"), x509.DNSName("aggregator")]),
            "aggregator",
        ),
        (x509.OCSPNoCheck(), "1.3.6.1.5.5.7.48.1.5"),
        *(
            (
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ROLE_OIDS[role]]),
                f"CSR asks for the role mark ['foedus role {role.value}']; the signer alone",
            )
            for role in Role  # its own role's mark too: the signer decides, never the request
        ),
        (
            x509.ExtendedKeyUsage([x509.ObjectIdentifier(f"{FOEDUS_ARC}.1.9")]),
            f"role mark ['{FOEDUS_ARC}.1.9']",
        ),
    ],
)
def test_certify_refuses_collaborator_csr_asking_for_more(
    certs: CertsLayout, extension: x509.ExtensionType, message: str
) -> None:
    """A collaborator CSR asking to be a CA, a server, another name or anything unknown is refused, not trimmed."""
    csr = _custom_csr("alice", extension)
    with pytest.raises(SigningError, match=re.escape(message) if "[" in message else message):
        _certify(certs, csr, "alice")


def test_certify_takes_aggregator_sans_from_csr_and_adds_its_name(certs: CertsLayout) -> None:
    """An aggregator CSR's DNS and IP SANs are kept, and the host name is always among them."""
    requested = x509.SubjectAlternativeName(
        [x509.DNSName("agg.example.org"), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))]
    )
    csr = _custom_csr("agg.internal", requested)
    cert = _certify(certs, csr, "agg.internal", Role.AGGREGATOR)
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "agg.internal",
        "agg.example.org",
        binding_name("agg.internal"),
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


@pytest.mark.parametrize(
    "entry",
    [
        x509.RFC822Name("agg@example.org"),
        x509.UniformResourceIdentifier("https://x"),
        x509.DNSName("bad_name"),
        x509.DNSName("*.cn.foedus.invalid"),
        x509.DNSName(binding_name("localhost")),
        x509.DNSName(binding_name("elsewhere.example").upper()),
        x509.DNSName("foedus.invalid"),
    ],
)
def test_certify_refuses_aggregator_csr_with_unacceptable_san(
    certs: CertsLayout, entry: x509.GeneralName
) -> None:
    """An aggregator CSR with an e-mail, URI, malformed DNS SAN or a name the signer alone
    derives (foedus.invalid) is refused: the name binding is never copied from a request."""
    csr = _custom_csr("localhost", x509.SubjectAlternativeName([entry]))
    with pytest.raises(PkiError):
        _certify(certs, csr, "localhost", Role.AGGREGATOR)


@pytest.mark.parametrize("role", list(Role))
def test_no_certificate_is_named_in_the_reserved_namespace(certs: CertsLayout, role: Role) -> None:
    """A common name under foedus.invalid is refused for either role, so no certificate can be
    named in the binding's namespace (a binding itself, 70 characters, is too long for a CN)."""
    name = "x.cn.foedus.invalid"
    with pytest.raises(CertificateRequestError, match="reserved"):
        create_key_and_csr(role, name)
    with pytest.raises(CertificateRequestError, match="reserved"):
        _certify(certs, _custom_csr(name), name, role)


def test_binding_names_are_canonical_and_distinct() -> None:
    """Case and IPv6 spelling do not change the binding; different common names differ."""
    assert binding_name("Agg.Example.org") == binding_name("agg.example.org")
    assert binding_name("::1") == binding_name("0:0:0:0:0:0:0:1")
    names = {binding_name(n) for n in ("localhost", "127.0.0.1", "::1", "agg.example.org")}
    assert len(names) == 4
    assert all(len(name.split(".")[0]) == 52 for name in names)


def test_certify_sets_validity_and_caps_it_at_the_signing_ca(certs: CertsLayout) -> None:
    """valid_from and days set the validity; a period beyond the signing CA's end is shortened to it."""
    _, csr = create_key_and_csr(Role.COLLABORATOR, "alice")
    start = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    ca_end = read_certificate(certs.signing_ca_cert).not_valid_after_utc
    cert = _certify(certs, csr, "alice", days=2, valid_from=start)
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (
        start,
        start + datetime.timedelta(days=2),
    )
    long = _certify(certs, csr, "alice", days=100_000)
    assert long.not_valid_after_utc == ca_end
    assert utc_now() - datetime.timedelta(minutes=2) < long.not_valid_before_utc < utc_now()


def test_certify_refuses_naive_valid_from_and_a_non_ca_signer(certs: CertsLayout) -> None:
    """A naive valid_from, or a leaf posing as the signing CA, is refused."""
    _, csr = create_key_and_csr(Role.COLLABORATOR, "alice")
    with pytest.raises(PkiError, match="timezone"):
        _certify(certs, csr, "alice", valid_from=datetime.datetime(2030, 1, 1))
    leaf_key = read_private_key(certs.collaborator_key("bob"))
    leaf_cert = read_certificate(certs.collaborator_cert("bob"))
    with pytest.raises(SigningError, match="not a CA"):
        certify(
            csr,
            role=Role.COLLABORATOR,
            expected_name="alice",
            days=1,
            signing_key=leaf_key,
            signing_cert=leaf_cert,
        )


@pytest.mark.parametrize(
    ("role", "name", "dns", "ips"),
    [
        (Role.COLLABORATOR, "", (), ()),
        (Role.COLLABORATOR, "a/b", (), ()),
        (Role.COLLABORATOR, "..", (), ()),
        (Role.COLLABORATOR, "-alice", (), ()),
        (Role.COLLABORATOR, "al ice", (), ()),
        (Role.COLLABORATOR, "x" * 65, (), ()),
        (Role.COLLABORATOR, "alice", ("alice.example",), ()),
        (Role.AGGREGATOR, "", (), ()),
        (Role.AGGREGATOR, "agg/1", (), ()),
        (Role.AGGREGATOR, "localhost", ("bad_name!",), ()),
        (Role.AGGREGATOR, "localhost", (), ("300.1.1.1",)),
        (Role.AGGREGATOR, "localhost", (), ("localhost",)),
    ],
)
def test_create_key_and_csr_rejects_bad_names(
    role: Role, name: str, dns: tuple[str, ...], ips: tuple[str, ...]
) -> None:
    """Empty, path-like or odd names, bad DNS names and unparsable IPs are refused with CertificateRequestError."""
    with pytest.raises(CertificateRequestError):
        create_key_and_csr(role, name, dns_names=dns, ip_addresses=ips)


def test_aggregator_csr_for_an_ip_host_and_collaborator_csr() -> None:
    """An IP host becomes an IP SAN; a collaborator CSR's SAN is its name; both CSRs are P-384 and self-consistent."""
    key, csr = create_key_and_csr(
        Role.AGGREGATOR, "10.1.2.3", dns_names=["agg.example"], ip_addresses=["10.1.2.3"]
    )
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [
        x509.DNSName("agg.example"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    ]
    assert csr.is_signature_valid and key.curve.name == "secp384r1"
    _, csr = create_key_and_csr(Role.COLLABORATOR, "site_1")
    assert list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.DNSName("site_1")
    ]


# --- files ------------------------------------------------------------------------------------------


def test_layout_keys_are_0600(certs: CertsLayout) -> None:
    """Every private key of the local federation, CA keys included, has mode 0600."""
    keys = [certs.root_ca_key, certs.signing_ca_key, certs.aggregator_key]
    keys += [certs.collaborator_key(name) for name in COLLABORATORS]
    assert {path: _mode(path) for path in keys} == dict.fromkeys(keys, 0o600)
    for path in keys:
        check_private_key_mode(path)


def test_write_private_key_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    """An existing key is kept (error names the path and --force); with force it is replaced, still 0600."""
    path = tmp_path / "keys" / "k.key"
    write_private_key(path, generate_private_key())
    original = path.read_bytes()
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    with pytest.raises(KeyFileError, match=rf"{path}.*--force"):
        write_private_key(path, generate_private_key())
    assert path.read_bytes() == original
    write_private_key(path, generate_private_key(), force=True)
    assert path.read_bytes() != original
    assert _mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["k.key"]  # no temporary files left behind


def test_check_private_key_mode_rejects_group_readable(tmp_path: Path) -> None:
    """A key readable by others is refused with the chmod command that fixes it."""
    path = tmp_path / "k.key"
    write_private_key(path, generate_private_key())
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=rf"mode 0644.*chmod 600 {path}"):
        check_private_key_mode(path)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_private_key(path)
    assert read_private_key(path, check_mode=False)


def test_read_private_key_rejects_encrypted_key(tmp_path: Path) -> None:
    """A passphrase-protected key is refused with a message saying so."""
    path = tmp_path / "enc.key"
    data = generate_private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=rf"{path}: private key is encrypted"):
        read_private_key(path)


@pytest.mark.parametrize(
    "reader", [read_certificate, read_certificates, read_csr, read_private_key]
)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"hello\n", "not a PEM file"),
        (
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
            r"contains CERTIFICATE|damaged",
        ),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n",
            r"contains|damaged",
        ),
        (
            b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
            r"contains PRIVATE KEY|damaged",
        ),
    ],
)
def test_read_functions_report_the_file(
    tmp_path: Path, reader: Callable[[Path], object], content: bytes | None, message: str
) -> None:
    """Missing, non-PEM, damaged or wrong-kind files raise PkiError naming the file and the problem."""
    path = tmp_path / "some.pem"
    if content is not None:
        path.write_bytes(content)
        path.chmod(0o600)
    with pytest.raises(PemFileError, match=message) as caught:
        reader(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_readers_round_trip(certs: CertsLayout, tmp_path: Path) -> None:
    """What the writers wrote, the readers read back; a directory given as a file is reported."""
    csr_path = tmp_path / "a.csr"
    _, csr = create_key_and_csr(Role.COLLABORATOR, "alice")
    write_csr(csr_path, csr)
    assert read_csr(csr_path) == csr
    assert key_matches_certificate(
        read_private_key(certs.aggregator_key), read_certificate(certs.aggregator_cert)
    )
    with pytest.raises(PemFileError, match="is a directory"):
        read_certificate(tmp_path)


# --- local federation ---------------------------------------------------------------------------------


def _setup(
    layout: CertsLayout,
    collaborators: tuple[str, ...] = ("alice", "bob"),
    *,
    dns_names: tuple[str, ...] = ("localhost",),
    force: bool = False,
) -> SetupResult:
    return setup_local_federation(
        layout,
        aggregator_host="localhost",
        dns_names=dns_names,
        ip_addresses=["127.0.0.1"],
        collaborators=collaborators,
        force=force,
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_setup_local_federation_is_idempotent(tmp_path: Path) -> None:
    """A second run changes nothing and reports everything kept; a new collaborator is added alone."""
    layout = CertsLayout(tmp_path / "certs")
    first = _setup(layout)
    assert first.created == ("CA", "aggregator localhost", "collaborator alice", "collaborator bob")
    before = _snapshot(layout.root)
    second = _setup(layout)
    assert second.created == () and second.renewed == ()
    assert second.kept == first.created
    assert _snapshot(layout.root) == before
    third = _setup(layout, ("alice", "bob", "dave"))
    assert third.created == ("collaborator dave",)
    after = _snapshot(layout.root)
    assert {k: v for k, v in after.items() if "dave" not in k} == before


def test_setup_recertifies_a_stale_certificate_with_the_same_key(tmp_path: Path) -> None:
    """A missing certificate or changed SAN list is re-issued for the existing key, never a new key."""
    layout = CertsLayout(tmp_path / "certs")
    _setup(layout)
    alice_key = layout.collaborator_key("alice").read_bytes()
    aggregator_key = layout.aggregator_key.read_bytes()
    layout.collaborator_cert("alice").unlink()
    result = _setup(layout, dns_names=("localhost", "agg.example"))
    assert result.renewed == ("aggregator localhost", "collaborator alice")
    assert layout.collaborator_key("alice").read_bytes() == alice_key
    assert layout.aggregator_key.read_bytes() == aggregator_key
    san = _ext(read_certificate(layout.aggregator_cert), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "localhost",
        "agg.example",
        binding_name("localhost"),
    ]


def test_setup_force_makes_everything_new(tmp_path: Path) -> None:
    """With force the CA, every key and every certificate are replaced."""
    layout = CertsLayout(tmp_path / "certs")
    _setup(layout)
    before = _snapshot(layout.root)
    result = _setup(layout, force=True)
    after = _snapshot(layout.root)
    assert result.kept == ()
    assert all(after[name] != before[name] for name in before)
    assert _mode(layout.signing_ca_key) == 0o600


def test_setup_refuses_an_incomplete_ca_and_an_exposed_key(tmp_path: Path) -> None:
    """A CA with a file missing, or a participant key readable by others, stops setup with the file named."""
    layout = CertsLayout(tmp_path / "certs")
    _setup(layout)
    layout.collaborator_key("bob").chmod(0o640)
    with pytest.raises(KeyFileError, match=rf"{layout.collaborator_key('bob')}.*chmod 600"):
        _setup(layout)
    layout.collaborator_key("bob").chmod(0o600)
    layout.root_ca_key.unlink()
    with pytest.raises(PkiError, match=rf"{layout.root_ca_key}: missing .*--force"):
        _setup(layout)


def test_setup_checks_every_name_before_writing(tmp_path: Path) -> None:
    """A bad or duplicate collaborator name fails before anything is written."""
    layout = CertsLayout(tmp_path / "certs")
    with pytest.raises(CertificateRequestError):
        _setup(layout, ("alice", "bad/name"))
    with pytest.raises(PkiError, match="duplicate"):
        _setup(layout, ("alice", "alice"))
    assert not layout.root.exists()


# -- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_each_role_gets_exactly_its_mark(certs: CertsLayout, role: Role) -> None:
    """The signer marks a certificate with the role it certifies, and with nothing else of ours."""
    name = "agg.internal" if role is Role.AGGREGATOR else "alice"
    cert = _certify(certs, create_key_and_csr(role, name)[1], name, role)
    usages = list(_ext(cert, x509.ExtendedKeyUsage).value)
    assert [oid for oid in usages if oid.dotted_string.startswith(FOEDUS_ARC)] == [ROLE_OIDS[role]]
    assert role_mark(cert) is role


def test_a_user_named_like_a_site_is_certified_as_a_user(certs: CertsLayout) -> None:
    """A person's request named like collaborator 'alice' gets a user-marked certificate."""
    cert = _certify(certs, create_key_and_csr(Role.USER, "alice")[1], "alice", Role.USER)
    assert role_mark(cert) is Role.USER
    assert role_mark(read_certificate(certs.collaborator_cert("alice"))) is Role.COLLABORATOR


def test_role_marks_of_certificates_made_otherwise(certs: CertsLayout) -> None:
    """No mark (made before marks) is NONE; two marks, or one we never issue, is UNCLEAR."""
    signing_key, _ = load_signing_ca(certs)
    cert = read_certificate(certs.collaborator_cert("alice"))
    assert role_mark(without_role_mark(cert, signing_key)) is Unmarked.NONE

    def with_usages(*oids: x509.ObjectIdentifier) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(cert.issuer)
            .public_key(cert.public_key())
            .serial_number(1)
            .not_valid_before(cert.not_valid_before_utc)
            .not_valid_after(cert.not_valid_after_utc)
            .add_extension(x509.ExtendedKeyUsage(list(oids)), critical=False)
        )
        return builder.sign(signing_key, hashes.SHA384())

    both = with_usages(ROLE_OIDS[Role.COLLABORATOR], ROLE_OIDS[Role.USER])
    assert role_mark(both) is Unmarked.UNCLEAR
    assert role_mark(with_usages(x509.ObjectIdentifier(f"{FOEDUS_ARC}.1.9"))) is Unmarked.UNCLEAR


def test_role_refusal_names_both_roles_and_warns_once_about_an_unmarked_certificate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A mark of another role is refused naming both roles; an unmarked certificate passes with
    one warning naming the command that reissues it, however often it calls."""

    def refusal(peer: PeerCertificate) -> str | None:
        return role_refusal(
            peer,
            name="alice",
            expected=Role.COLLABORATOR,
            listed_as="director.yaml envoys",
            reissue="pki certify --role collaborator --name alice",
        )

    assert refusal(PeerCertificate(Role.USER, "a" * 64)) == (
        "certificate 'alice' is a user certificate, but director.yaml envoys names 'alice', which "
        "needs a collaborator certificate: it must be issued for that role (pki certify --role "
        "collaborator --name alice)"
    )
    unclear = refusal(PeerCertificate(Unmarked.UNCLEAR, "b" * 64))
    assert unclear is not None and "carries several or unknown role marks" in unclear
    assert refusal(PeerCertificate(Role.COLLABORATOR, "c" * 64)) is None
    caplog.set_level(logging.WARNING, logger="foedus.pki.roles")
    old = PeerCertificate(Unmarked.NONE, "d" * 64)
    for _ in range(3):
        assert refusal(old) is None
    warnings = [
        record.getMessage() for record in caplog.records if record.name == "foedus.pki.roles"
    ]
    assert len(warnings) == 1, warnings
    assert "'alice' has no role mark" in warnings[0]
    assert "reissue it: pki certify --role collaborator --name alice" in warnings[0]


def test_setup_reissues_a_certificate_made_before_role_marks(tmp_path: Path) -> None:
    """`pki setup` re-certifies an unmarked certificate with the same key, now marked."""
    layout = CertsLayout(tmp_path / "certs")
    _setup(layout)
    signing_key, _ = load_signing_ca(layout)
    old = without_role_mark(read_certificate(layout.collaborator_cert("alice")), signing_key)
    layout.collaborator_cert("alice").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    result = _setup(layout)
    assert result.renewed == ("collaborator alice",)
    renewed = read_certificate(layout.collaborator_cert("alice"))
    assert role_mark(renewed) is Role.COLLABORATOR
    assert renewed.public_key() == old.public_key()
