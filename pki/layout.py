"""Where one federation keeps its certificates and keys on disk (paths only, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from foedus.pki.errors import PkiError


def _path_component(name: str) -> str:
    """Return name if it is safe as a single file name, so a name can never escape the folder."""
    if (
        not name
        or name in {".", ".."}
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise PkiError(f"name {name!r} cannot be used as a file name in the certificate folder")
    return name


@dataclass(frozen=True)
class CertsLayout:
    """The conventional layout of one federation's certificate folder."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        """Folder holding both CAs' certificates and keys."""
        return self.root / "ca"

    @property
    def root_ca_cert(self) -> Path:
        """Self-signed root CA certificate."""
        return self.ca_dir / "root_ca.crt"

    @property
    def root_ca_key(self) -> Path:
        """Root CA private key; only needed to (re)make the signing CA."""
        return self.ca_dir / "root_ca.key"

    @property
    def signing_ca_cert(self) -> Path:
        """Intermediate CA certificate that signs every participant's certificate."""
        return self.ca_dir / "signing_ca.crt"

    @property
    def signing_ca_key(self) -> Path:
        """Intermediate CA private key."""
        return self.ca_dir / "signing_ca.key"

    @property
    def ca_bundle(self) -> Path:
        """Signing CA followed by root CA, the trust bundle every participant loads."""
        return self.root / "cert_chain.crt"

    @property
    def aggregator_dir(self) -> Path:
        """Folder holding the aggregator's key, request and certificate."""
        return self.root / "aggregator"

    @property
    def aggregator_cert(self) -> Path:
        """Aggregator (server) certificate."""
        return self.aggregator_dir / "aggregator.crt"

    @property
    def aggregator_key(self) -> Path:
        """Aggregator private key."""
        return self.aggregator_dir / "aggregator.key"

    @property
    def aggregator_csr(self) -> Path:
        """Aggregator certificate signing request."""
        return self.aggregator_dir / "aggregator.csr"

    @property
    def collaborators_dir(self) -> Path:
        """Folder holding every collaborator's key, request and certificate."""
        return self.root / "collaborators"

    def collaborator_cert(self, name: str) -> Path:
        """Certificate of the collaborator called name."""
        return self.collaborators_dir / f"{_path_component(name)}.crt"

    def collaborator_key(self, name: str) -> Path:
        """Private key of the collaborator called name."""
        return self.collaborators_dir / f"{_path_component(name)}.key"

    def collaborator_csr(self, name: str) -> Path:
        """Certificate signing request of the collaborator called name."""
        return self.collaborators_dir / f"{_path_component(name)}.csr"

    @property
    def users_dir(self) -> Path:
        """Folder holding the keys, requests and certificates of people using a director."""
        return self.root / "users"

    def user_cert(self, name: str) -> Path:
        """Certificate of the user called name."""
        return self.users_dir / f"{_path_component(name)}.crt"

    def user_key(self, name: str) -> Path:
        """Private key of the user called name."""
        return self.users_dir / f"{_path_component(name)}.key"

    def user_csr(self, name: str) -> Path:
        """Certificate signing request of the user called name."""
        return self.users_dir / f"{_path_component(name)}.csr"
