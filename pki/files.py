"""Read and write PEM keys, requests and certificates, with safe modes and errors that name the file."""

from __future__ import annotations

import os
import re
import shlex
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from foedus.durable.files import replace_file
from foedus.pki.errors import KeyFileError, PemFileError
from foedus.pki.keys import PrivateKey

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_KEY_LABELS = {"PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY"}


def read_pem_file(path: Path, what: str, *, error: type[PemFileError] = PemFileError) -> bytes:
    """Read a whole file, turning every OS error into one that names the file and what was expected."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a {what} file") from None
    except PermissionError:
        raise error(f"{path}: cannot read {what} file: permission denied") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what} file: {exc.strerror or exc}") from None


def _wrong_kind(
    source: Path, data: bytes, label: str, what: str, error: type[PemFileError]
) -> PemFileError:
    found = sorted({match.decode("ascii") for match in _PEM_LABEL.findall(data)})
    if not found:
        return error(
            f"{source}: not a PEM file (expected a {what} beginning '-----BEGIN {label}-----')"
        )
    return error(f"{source}: contains {', '.join(found)}, expected a {what}")


def parse_certificates(data: bytes, source: Path) -> list[x509.Certificate]:
    """Parse every PEM certificate in data (read from source, named in errors)."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise _wrong_kind(source, data, "CERTIFICATE", "certificate", PemFileError)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PemFileError(f"{source}: damaged PEM certificate ({exc})") from None


def parse_csr(data: bytes, source: Path) -> x509.CertificateSigningRequest:
    """Parse a PEM certificate signing request (read from source, named in errors)."""
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise _wrong_kind(
            source, data, "CERTIFICATE REQUEST", "certificate signing request", PemFileError
        )
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise PemFileError(f"{source}: damaged PEM certificate signing request ({exc})") from None


def parse_private_key(data: bytes, source: Path) -> PrivateKey:
    """Parse an unencrypted PEM private key (read from source, named in errors)."""
    labels = {match.decode("ascii") for match in _PEM_LABEL.findall(data)}
    if not labels & _KEY_LABELS:
        raise _wrong_kind(source, data, "PRIVATE KEY", "private key", KeyFileError)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(
            f"{source}: private key is encrypted; foedus needs an unencrypted key kept at mode 0600"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{source}: damaged or unsupported PEM private key ({exc})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise KeyFileError(
            f"{source}: {type(key).__name__} is not supported; use an ECDSA (P-384) or RSA key"
        )
    return key


def read_certificates(path: Path) -> list[x509.Certificate]:
    """Read a PEM bundle (one or more certificates), e.g. the federation's CA chain."""
    return parse_certificates(read_pem_file(path, "certificate"), path)


def read_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate; if the file holds a chain, the first (leaf) certificate."""
    return read_certificates(path)[0]


def read_csr(path: Path) -> x509.CertificateSigningRequest:
    """Read a PEM certificate signing request."""
    return parse_csr(read_pem_file(path, "certificate signing request"), path)


def check_private_key_mode(path: Path) -> None:
    """Refuse a key file that other users could read or change, as ssh does."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: private key file not found") from None
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot check private key file: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: expected a private key file, found something else")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: private key is accessible by group or others (mode {mode:04o}); run: chmod 600 {shlex.quote(str(path))}"
        )


def read_private_key(path: Path, *, check_mode: bool = True) -> PrivateKey:
    """Read an unencrypted PEM private key, first refusing one that other users can read."""
    if check_mode:
        check_private_key_mode(path)
    return parse_private_key(read_pem_file(path, "private key", error=KeyFileError), path)


def _make_parent(path: Path, *, private: bool, error: type[PemFileError]) -> None:
    try:
        path.parent.mkdir(mode=0o700 if private else 0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"{path.parent}: cannot create folder: {exc.strerror or exc}") from None


def _write_file(
    path: Path,
    data: bytes,
    mode: int,
    error: type[PemFileError],
    *,
    replace: bool = True,
    what: str = "",
) -> None:
    """Write atomically and durably at `mode` from creation (`foedus.durable.files.replace_file`), so
    a reader (or a crash) never sees half a file, nor a key readable by others for an instant."""
    _make_parent(path, private=mode & 0o077 == 0, error=error)
    try:
        replace_file(path, lambda stream: stream.write(data), mode=mode, replace=replace)
    except OSError as exc:
        if isinstance(exc, FileExistsError) and not replace:
            raise  # the caller says what to do about the file already there
        raise error(f"{path}: cannot write{what}: {exc.strerror or exc}") from None


def write_private_key(path: Path, key: PrivateKey, *, force: bool = False) -> None:
    """Write key as unencrypted PKCS8 PEM with mode 0600 from creation; never replace one unless forced."""
    path = Path(path)
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        # Not forced, refusing a key already there is the step that puts the new one in place.
        _write_file(
            path, data, 0o600, KeyFileError, replace=force, what="" if force else " private key"
        )
    except FileExistsError:
        raise KeyFileError(
            f"{path}: private key already exists; pass --force to replace it"
        ) from None


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Write one PEM certificate (mode 0644, replacing any old one atomically)."""
    write_pem_bundle(path, [cert])


def write_pem_bundle(path: Path, certs: Sequence[x509.Certificate]) -> None:
    """Write certificates back to back as one PEM file, e.g. signing CA then root CA."""
    if not certs:
        raise PemFileError(f"{path}: refusing to write an empty certificate bundle")
    data = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    _write_file(Path(path), data, 0o644, PemFileError)


def write_csr(path: Path, csr: x509.CertificateSigningRequest) -> None:
    """Write a PEM certificate signing request (mode 0644, replacing any old one atomically)."""
    _write_file(Path(path), csr.public_bytes(serialization.Encoding.PEM), 0o644, PemFileError)
