"""Shared fixtures: a real local federation's certificates, plus hostile identities, all made with pki."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from foedus.pki.ca import create_root_ca, create_signing_ca, utc_now
from foedus.pki.files import write_certificate, write_private_key
from foedus.pki.keys import PrivateKey, signature_hash
from foedus.pki.layout import CertsLayout
from foedus.pki.local import load_signing_ca, setup_local_federation
from foedus.pki.requests import Role, create_key_and_csr
from foedus.pki.roles import is_role_mark
from foedus.pki.signing import certify

from directors import make_director_certs

# secure_rounds' fixtures (`known`, `cas`) for the secure aggregation and noise share tests.
pytest_plugins = ["secure_rounds"]

AGGREGATOR_HOST = "localhost"
AGGREGATOR_DNS = ("localhost",)
AGGREGATOR_IPS = ("127.0.0.1", "::1")
COLLABORATORS = ("alice", "bob", "carol")


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key (mode 0600) on disk, for a peer to present."""

    cert: Path
    key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertsLayout:
    """The certificate folder of a local federation: aggregator 'localhost', collaborators alice, bob, carol."""
    layout = CertsLayout(tmp_path_factory.mktemp("certs"))
    setup_local_federation(
        layout,
        aggregator_host=AGGREGATOR_HOST,
        dns_names=AGGREGATOR_DNS,
        ip_addresses=AGGREGATOR_IPS,
        collaborators=COLLABORATORS,
    )
    return layout


def issue_identity(
    folder: Path,
    role: Role,
    name: str,
    *,
    signing_key: PrivateKey,
    signing_cert: x509.Certificate,
    days: int = 30,
    valid_from: datetime.datetime | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    role_mark: bool = True,
) -> Identity:
    """Make a key and a certificate through the real request -> certify path and write them to
    folder; `role_mark` False: as the signer made them before it marked roles."""
    key, csr = create_key_and_csr(role, name, dns_names=dns_names, ip_addresses=ip_addresses)
    cert = certify(
        csr,
        role=role,
        expected_name=name,
        signing_key=signing_key,
        signing_cert=signing_cert,
        days=days,
        valid_from=valid_from,
    )
    if not role_mark:
        cert = without_role_mark(cert, signing_key)
    identity = Identity(cert=folder / f"{name}.crt", key=folder / f"{name}.key")
    write_private_key(identity.key, key)
    write_certificate(identity.cert, cert)
    return identity


def without_role_mark(cert: x509.Certificate, signing_key: PrivateKey) -> x509.Certificate:
    """`cert` as the signer issued it before it marked roles: the same but for the mark, signed again."""
    return with_role_marks(cert, signing_key)


def with_role_marks(
    cert: x509.Certificate, signing_key: PrivateKey, *marks: x509.ObjectIdentifier
) -> x509.Certificate:
    """`cert` with `marks` in place of its role mark, signed again (no signer of ours does that)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        value = extension.value
        if isinstance(value, x509.ExtendedKeyUsage):
            value = x509.ExtendedKeyUsage(
                [*(oid for oid in value if not is_role_mark(oid)), *marks]
            )
        builder = builder.add_extension(value, critical=extension.critical)
    return builder.sign(signing_key, signature_hash(signing_key))


@pytest.fixture(scope="session")
def user_bob(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """A person's certificate from our CA whose name is collaborator 'bob''s."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("user_bob"),
        Role.USER,
        "bob",
        signing_key=signing_key,
        signing_cert=signing_cert,
    )


@pytest.fixture(scope="session")
def unmarked_bob(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Collaborator 'bob''s certificate from our CA as made before the signer marked roles."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("unmarked_bob"),
        Role.COLLABORATOR,
        "bob",
        signing_key=signing_key,
        signing_cert=signing_cert,
        role_mark=False,
    )


@pytest.fixture(scope="session")
def stranger(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Collaborator 'mallory': signed by our signing CA but not in the plan."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("stranger"),
        Role.COLLABORATOR,
        "mallory",
        signing_key=signing_key,
        signing_cert=signing_cert,
    )


@pytest.fixture(scope="session")
def foreign_alice(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Collaborator 'alice' signed by a different, freshly made CA."""
    root_key, root_cert = create_root_ca("foreign root CA", 30)
    signing_key, signing_cert = create_signing_ca(root_key, root_cert, "foreign signing CA", 30)
    return issue_identity(
        tmp_path_factory.mktemp("foreign_alice"),
        Role.COLLABORATOR,
        "alice",
        signing_key=signing_key,
        signing_cert=signing_cert,
    )


@pytest.fixture(scope="session")
def expired_alice(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Collaborator 'alice' from our CA, valid for one day starting ten days ago."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("expired_alice"),
        Role.COLLABORATOR,
        "alice",
        signing_key=signing_key,
        signing_cert=signing_cert,
        days=1,
        valid_from=utc_now() - datetime.timedelta(days=10),
    )


@pytest.fixture(scope="session")
def future_alice(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Collaborator 'alice' from our CA that only becomes valid in five days."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("future_alice"),
        Role.COLLABORATOR,
        "alice",
        signing_key=signing_key,
        signing_cert=signing_cert,
        valid_from=utc_now() + datetime.timedelta(days=5),
    )


@pytest.fixture(scope="session")
def misnamed_aggregator(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """Aggregator certificate from our CA for 'elsewhere.example' only (no localhost or 127.0.0.1)."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("misnamed_aggregator"),
        Role.AGGREGATOR,
        "elsewhere.example",
        signing_key=signing_key,
        signing_cert=signing_cert,
    )


@pytest.fixture(scope="module")
def director_certs(tmp_path_factory: pytest.TempPathFactory) -> CertsLayout:
    """Certificates of a director on localhost, its envoys and people: one set for each test
    module (`directors.make_director_certs`)."""
    return make_director_certs(tmp_path_factory.mktemp("director-certs"))
