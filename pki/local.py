"""File-level PKI operations shared by the CLI and the one-command local federation setup.

Reuse policy of ``setup_local_federation`` (so ``make demo`` can run it every time):

* The CA (root + signing) is made once. Later runs reuse it if all four files exist and are
  consistent and unexpired; a partial or broken CA is an error unless ``force``.
* A participant whose certificate is current (matches its key, signed by the current signing CA,
  within its validity, with the expected name, SANs and usage, role mark included) is kept
  untouched; one made before the signer marked roles is re-certified.
* A participant whose key exists but whose certificate is missing or stale is re-certified with
  the SAME key (a new CSR from that key), so no key is ever replaced without ``force``.
* ``force`` makes everything new: CA, every key, every certificate.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from foedus.pki.binding import has_binding
from foedus.pki.ca import check_days, create_root_ca, create_signing_ca, utc_now
from foedus.pki.errors import KeyFileError, PkiError
from foedus.pki.files import (
    read_certificate,
    read_csr,
    read_private_key,
    write_certificate,
    write_csr,
    write_pem_bundle,
    write_private_key,
)
from foedus.pki.keys import PrivateKey, key_matches_certificate
from foedus.pki.layout import CertsLayout
from foedus.pki.requests import (
    Role,
    build_csr,
    create_key_and_csr,
    fingerprint,
    validate_name,
)
from foedus.pki.roles import extended_key_usages
from foedus.pki.signing import certified_alt_names, certify

logger = logging.getLogger(__name__)

CA_NAME = "foedus"
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 365


@dataclass(frozen=True)
class LeafPaths:
    """Certificate, key and request files of one participant in a layout."""

    cert: Path
    key: Path
    csr: Path


def leaf_paths(layout: CertsLayout, role: Role, name: str) -> LeafPaths:
    """Where a participant's files live: the aggregator has one slot, the others one per name."""
    validate_name(role, name)  # first, so a bad name is reported as a name, not as a file name
    if role is Role.AGGREGATOR:
        return LeafPaths(layout.aggregator_cert, layout.aggregator_key, layout.aggregator_csr)
    if role is Role.USER:
        return LeafPaths(layout.user_cert(name), layout.user_key(name), layout.user_csr(name))
    return LeafPaths(
        layout.collaborator_cert(name), layout.collaborator_key(name), layout.collaborator_csr(name)
    )


def write_ca(
    layout: CertsLayout, *, days: int = DEFAULT_CA_DAYS, force: bool = False, name: str = CA_NAME
) -> tuple[PrivateKey, x509.Certificate]:
    """Make root and signing CA and the trust bundle in layout; refuse to replace CA keys unless forced."""
    check_days(days)
    if not force:
        for path in (layout.root_ca_key, layout.signing_ca_key):
            if path.exists():
                raise KeyFileError(f"{path}: CA key already exists; pass --force to replace it")
    root_key, root_cert = create_root_ca(f"{name} root CA", days)
    signing_key, signing_cert = create_signing_ca(root_key, root_cert, f"{name} signing CA", days)
    write_private_key(layout.root_ca_key, root_key, force=force)
    write_private_key(layout.signing_ca_key, signing_key, force=force)
    write_certificate(layout.root_ca_cert, root_cert)
    write_certificate(layout.signing_ca_cert, signing_cert)
    write_pem_bundle(layout.ca_bundle, [signing_cert, root_cert])
    return signing_key, signing_cert


def load_signing_ca(layout: CertsLayout) -> tuple[PrivateKey, x509.Certificate]:
    """Read and check the signing CA's key and certificate from layout."""
    key = read_private_key(layout.signing_ca_key)
    cert = read_certificate(layout.signing_ca_cert)
    if not key_matches_certificate(key, cert):
        raise KeyFileError(
            f"{layout.signing_ca_key}: does not match the certificate {layout.signing_ca_cert}"
        )
    return key, cert


def request_files(
    layout: CertsLayout,
    role: Role,
    name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    force: bool = False,
) -> tuple[LeafPaths, x509.CertificateSigningRequest]:
    """Make a participant's key (0600) and CSR in layout; refuse to replace its key unless forced."""
    paths = leaf_paths(layout, role, name)
    key, csr = create_key_and_csr(role, name, dns_names=dns_names, ip_addresses=ip_addresses)
    write_private_key(paths.key, key, force=force)
    write_csr(paths.csr, csr)
    return paths, csr


def certify_file(
    layout: CertsLayout,
    role: Role,
    name: str,
    *,
    days: int = DEFAULT_LEAF_DAYS,
    csr_path: Path | None = None,
    out: Path | None = None,
    expected_fingerprint: str | None = None,
    confirm: Callable[[str], None] | None = None,
) -> tuple[Path, x509.Certificate, str]:
    """Sign a CSR file with layout's signing CA; return the certificate's path, it, and the CSR fingerprint.

    `confirm`, if given, is shown the request's fingerprint after every other check passed and
    before the certificate is written; it raises to refuse (a person comparing it out of band).
    """
    paths = leaf_paths(layout, role, name)
    csr_path = csr_path if csr_path is not None else paths.csr
    out = out if out is not None else paths.cert
    csr = read_csr(csr_path)
    signing_key, signing_cert = load_signing_ca(layout)
    try:
        cert = certify(
            csr,
            role=role,
            expected_name=name,
            signing_key=signing_key,
            signing_cert=signing_cert,
            days=days,
            expected_fingerprint=expected_fingerprint,
        )
    except PkiError as exc:
        raise type(exc)(f"{csr_path}: {exc}") from None
    if confirm is not None:
        confirm(fingerprint(csr))
    write_certificate(out, cert)
    return out, cert, fingerprint(csr)


@dataclass(frozen=True)
class SetupResult:
    """What setup_local_federation did, item by item (e.g. 'collaborator alice')."""

    created: tuple[str, ...] = ()
    renewed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


@dataclass
class _Log:
    created: list[str] = field(default_factory=list)
    renewed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def result(self) -> SetupResult:
        return SetupResult(tuple(self.created), tuple(self.renewed), tuple(self.kept))


def _existing_ca(layout: CertsLayout) -> tuple[PrivateKey, x509.Certificate] | None:
    """The usable CA already in layout, None if there is none; an error if one is there but unusable."""
    paths = (layout.root_ca_cert, layout.root_ca_key, layout.signing_ca_cert, layout.signing_ca_key)
    present = [path for path in paths if path.exists()]
    if not present:
        return None
    hint = "; pass --force to make a new CA (every participant then gets a new certificate)"
    if len(present) != len(paths):
        missing = next(path for path in paths if path not in present)
        raise PkiError(f"{missing}: missing from an incomplete CA in {layout.ca_dir}{hint}")
    root_key = read_private_key(layout.root_ca_key)
    root_cert = read_certificate(layout.root_ca_cert)
    if not key_matches_certificate(root_key, root_cert):
        raise KeyFileError(f"{layout.root_ca_key}: does not match {layout.root_ca_cert}{hint}")
    signing_key, signing_cert = load_signing_ca(layout)
    try:
        signing_cert.verify_directly_issued_by(root_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"{layout.signing_ca_cert}: not issued by {layout.root_ca_cert}{hint}"
        ) from None
    if signing_cert.not_valid_after_utc <= utc_now():
        raise PkiError(
            f"{layout.signing_ca_cert}: expired on {signing_cert.not_valid_after_utc:%Y-%m-%d}{hint}"
        )
    _write_bundle_if_changed(layout, signing_cert, root_cert)
    return signing_key, signing_cert


def _write_bundle_if_changed(
    layout: CertsLayout, signing_cert: x509.Certificate, root_cert: x509.Certificate
) -> None:
    wanted = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (signing_cert, root_cert))
    try:
        current = layout.ca_bundle.read_bytes()
    except OSError:
        current = b""
    if current != wanted:
        write_pem_bundle(layout.ca_bundle, [signing_cert, root_cert])


def _stale_reason(
    paths: LeafPaths,
    key: PrivateKey,
    *,
    role: Role,
    name: str,
    sans: list[x509.GeneralName],
    signing_cert: x509.Certificate,
    now: datetime.datetime,
) -> str | None:
    """Why the certificate on disk cannot be kept as is, or None when it is current."""
    if not paths.cert.exists():
        return "no certificate"
    try:
        cert = read_certificate(paths.cert)
    except PkiError as exc:
        return str(exc)
    if not key_matches_certificate(key, cert):
        return "certificate does not match the key"
    try:
        cert.verify_directly_issued_by(signing_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "certificate is not signed by the current signing CA"
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return "certificate is outside its validity period"
    if cert.subject != x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]):
        return "certificate names someone else"
    try:
        cert_sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "certificate lacks SAN or extended key usage"
    if set(cert_sans) != set(sans):
        if role is Role.AGGREGATOR and not has_binding(cert, name):
            return "certificate lacks the name bound to its common name, which collaborators check"
        return "certificate's alternative names differ from the requested ones"
    if list(eku) != extended_key_usages(role):
        # Also a certificate made before the signer marked roles (`pki.roles`): reissued here.
        return "certificate has the wrong extended key usage or no role mark"
    return None


def setup_local_federation(
    layout: CertsLayout,
    *,
    aggregator_host: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    collaborators: Sequence[str],
    users: Sequence[str] = (),
    days: int = DEFAULT_LEAF_DAYS,
    force: bool = False,
) -> SetupResult:
    """Make (or bring up to date) a whole federation's CA and certificates in one folder, for local runs."""
    check_days(days)
    for what, names in (("collaborators", collaborators), ("users", users)):
        if isinstance(names, str):
            raise PkiError(f"{what} must be a sequence of names, not a string")
        duplicates = sorted({name for name in names if list(names).count(name) > 1})
        if duplicates:
            raise PkiError(f"{what}: duplicate names {duplicates}")
    participants: list[tuple[Role, str, Sequence[str], Sequence[str]]] = [
        (Role.AGGREGATOR, aggregator_host, dns_names, ip_addresses),
        *((Role.COLLABORATOR, name, (), ()) for name in collaborators),
        *((Role.USER, name, (), ()) for name in users),
    ]
    # Check every name before touching the disk, so a typo leaves no half-made federation.
    expected_sans = [
        certified_alt_names(role, name, dns, ips) for role, name, dns, ips in participants
    ]

    log = _Log()
    ca = None if force else _existing_ca(layout)
    if ca is None:
        signing_key, signing_cert = write_ca(layout, days=max(days, DEFAULT_CA_DAYS), force=force)
        log.created.append("CA")
    else:
        signing_key, signing_cert = ca
        log.kept.append("CA")

    now = utc_now()
    for (role, name, dns, ips), sans in zip(participants, expected_sans, strict=True):
        label = f"{role.value} {name}"
        paths = leaf_paths(layout, role, name)
        if force or not paths.key.exists():
            key: PrivateKey
            key, csr = create_key_and_csr(role, name, dns_names=dns, ip_addresses=ips)
            write_private_key(paths.key, key, force=force)
            log.created.append(label)
        else:
            key = read_private_key(paths.key)
            reason = _stale_reason(
                paths, key, role=role, name=name, sans=sans, signing_cert=signing_cert, now=now
            )
            if reason is None:
                log.kept.append(label)
                continue
            logger.info("%s: re-certifying the existing key (%s)", label, reason)
            csr = build_csr(key, role, name, dns_names=dns, ip_addresses=ips)
            log.renewed.append(label)
        write_csr(paths.csr, csr)
        cert = certify(
            csr,
            role=role,
            expected_name=name,
            signing_key=signing_key,
            signing_cert=signing_cert,
            days=days,
        )
        write_certificate(paths.cert, cert)

    result = log.result()
    logger.info(
        "certificates in %s: created %s; renewed %s; kept %s",
        layout.root,
        ", ".join(result.created) or "nothing",
        ", ".join(result.renewed) or "nothing",
        ", ".join(result.kept) or "nothing",
    )
    return result
