"""gRPC TLS credentials from certificate files; server certificates rotate without a restart."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509

from foedus.pki.ca import CLOCK_SKEW, utc_now
from foedus.pki.errors import CertificateValidityError, KeyFileError, MissingTLSFileError, PkiError
from foedus.pki.files import (
    check_private_key_mode,
    parse_certificates,
    parse_private_key,
    read_pem_file,
)
from foedus.pki.keys import key_matches_certificate
from foedus.pki.requests import common_name_of

logger = logging.getLogger(__name__)

_Stamp = tuple[int, int, int] | None


def common_name(cert: x509.Certificate) -> str:
    """The subject common name, the identity foedus authenticates a peer by."""
    return common_name_of(cert.subject, "certificate")


def load_identity(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """Read and check a certificate (chain) and its key; return their PEM bytes for gRPC."""
    # gRPC gets the very bytes checked here, so a file replaced in between cannot slip past the checks.
    check_private_key_mode(key)
    key_pem = read_pem_file(key, "private key", error=KeyFileError)
    private_key = parse_private_key(key_pem, key)
    cert_pem = read_pem_file(cert, "certificate")
    leaf = parse_certificates(cert_pem, cert)[0]
    if not key_matches_certificate(private_key, leaf):
        raise KeyFileError(f"{key}: private key does not match the certificate in {cert}")
    _check_validity_period(leaf, cert)
    return cert_pem, key_pem


def _check_validity_period(leaf: x509.Certificate, path: Path) -> None:
    """Refuse our own certificate outside its dates: a peer would only say "handshake failed"."""
    now = utc_now()
    if leaf.not_valid_after_utc < now:
        raise CertificateValidityError(
            f"{path}: certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "have it renewed (pki certify)"
        )
    if leaf.not_valid_before_utc > now + CLOCK_SKEW:
        raise CertificateValidityError(
            f"{path}: certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
            "UTC; check this machine's clock or the certificate"
        )


def check_tls_files(files: Sequence[tuple[str, Path]], key: Path) -> None:
    """Each named file is there and readable, and `key` is private: checked before serving or dialing.

    Raises `MissingTLSFileError` (its `absent` says which) or `KeyFileError` for an exposed key.
    """
    for what, path in files:
        if not path.is_file():
            raise MissingTLSFileError(f"{what} not found: {path}", absent=True)
        if not os.access(path, os.R_OK):
            raise MissingTLSFileError(
                f"{what} not readable: {path} (check the file's owner and permissions)",
                absent=False,
            )
    check_private_key_mode(key)


def tls_files_problem(
    ca_bundle: Path, cert: Path, key: Path, *, named: str = "{}", where: str, make: str
) -> str | None:
    """What is wrong with the CA bundle, the certificate, the key or the key's mode, or None.

    `named` names the certificate and the key in the line ("aggregator {}": "aggregator private
    key"). A missing or unreadable file is named after `where` (the config file and its field),
    with `make` (how to make it) when it is absent; an exposed key's line names the key file.
    """
    files = (
        ("CA bundle", ca_bundle),
        (named.replace("{}", "certificate", 1), cert),
        (named.replace("{}", "private key", 1), key),
    )
    try:
        check_tls_files(files, key)
    except MissingTLSFileError as error:
        hint = f" ({make})" if error.absent else ""
        return f"{where}: {error}{hint}"
    except KeyFileError as error:
        return str(error)
    return None


def load_ca_bundle(ca_bundle: Path) -> bytes:
    """Read and check the PEM bundle of CA certificates that peers are verified against."""
    data = read_pem_file(ca_bundle, "CA bundle")
    parse_certificates(data, ca_bundle)
    return data


def _stamp(path: Path) -> _Stamp:
    """What identifies one version of a file: a rewrite or rename changes at least one field."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class ServerCertificateFetcher:
    """The callable gRPC asks at each handshake: a new configuration when the files changed, else None."""

    def __init__(self, cert: Path, key: Path, ca_bundle: Path) -> None:
        """Load and check the files now, so a bad configuration fails at start-up, naming the file."""
        self._cert, self._key, self._ca_bundle = Path(cert), Path(key), Path(ca_bundle)
        self._lock = threading.Lock()
        # Stamps are taken before reading, so a change made while loading is picked up next time.
        self._stamps = self._current_stamps()
        self.initial = self._load()

    def _current_stamps(self) -> tuple[_Stamp, _Stamp, _Stamp]:
        return (_stamp(self._cert), _stamp(self._key), _stamp(self._ca_bundle))

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_pem, key_pem = load_identity(self._cert, self._key)
        ca_pem = load_ca_bundle(self._ca_bundle)
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)], root_certificates=ca_pem
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a fresh configuration if any file changed and loads cleanly; otherwise None (keep current)."""
        with self._lock:
            stamps = self._current_stamps()
            if stamps == self._stamps:
                return None
            # Remember this version even if it fails to load, so a broken file warns once, not per handshake.
            self._stamps = stamps
            try:
                config = self._load()
            except PkiError as exc:
                logger.warning(
                    "keeping the current TLS certificate; the changed files do not load: %s", exc
                )
                return None
            except Exception:
                logger.exception(
                    "keeping the current TLS certificate; unexpected error reloading %s", self._cert
                )
                return None
            logger.info("TLS files changed; new handshakes use the certificate in %s", self._cert)
            return config


def server_credentials(
    cert: Path, key: Path, ca_bundle: Path, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server credentials that verify clients against ca_bundle and pick up replaced files without a restart."""
    fetcher = ServerCertificateFetcher(cert, key, ca_bundle)
    # gRPC documents None from the fetcher as "no change"; the stubs type the return as non-optional.
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], fetcher)
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetch, require_client_authentication=require_client_auth
    )


def channel_credentials(
    ca_bundle: Path, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials:
    """Client credentials read fresh on every call, so a reconnect after rotation uses the new files."""
    if (cert is None) != (key is None):
        raise PkiError("a client certificate and its key must be given together (or neither)")
    ca_pem = load_ca_bundle(ca_bundle)
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=ca_pem)
    cert_pem, key_pem = load_identity(cert, key)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
