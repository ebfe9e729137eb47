"""A site's secrets for one secure round, and the file they are kept in.

They are what a site must never lose nor show: its two X25519 private keys, its self-mask seed,
the seed its shares and nonces are drawn from, the survivor list it confirmed and what it
revealed. The file is JSON (never pickle), keys in hex; a corrupt one is a one-line
`SecretsFileError`. Writing it (mode 0600, atomically, before anything that depends on it is
posted) is the caller's: `foedus.collaborator.secure`.
"""

from __future__ import annotations

import binascii
import json
import secrets as random_bytes
from dataclasses import dataclass, field
from typing import Any

from foedus.secure.errors import SecretsFileError
from foedus.secure.keys import KEY_BYTES
from foedus.secure.records import SecretKind

SECRETS_FORMAT = "foedus secure round secrets"
SECRETS_VERSION = 1
_KEY_FIELDS = ("encryption_private", "mask_private", "seed", "sharing_seed")


@dataclass
class SiteSecrets:
    """A site's secrets for one round, and what it has already confirmed and revealed."""

    encryption_private: bytes  # X25519 c: the shares sealed for this site open with it
    mask_private: bytes  # X25519 s: the pairwise masks are agreed with it
    seed: bytes  # b: the self-mask's seed
    sharing_seed: bytes  # draws the Shamir coefficients and the nonces (the same again on restart)
    revealed: dict[str, SecretKind] = field(default_factory=dict)  # owner -> kind revealed
    confirmed: tuple[str, ...] | None = None  # the survivor list this site signed, once signed

    @classmethod
    def generate(cls) -> SiteSecrets:
        """Fresh secrets for a round, from the operating system's randomness."""
        draw = random_bytes.token_bytes
        return cls(draw(KEY_BYTES), draw(KEY_BYTES), draw(KEY_BYTES), draw(KEY_BYTES))

    def to_bytes(self) -> bytes:
        """The secrets file's content: JSON, keys in hex (never pickle)."""
        document: dict[str, Any] = {"format": SECRETS_FORMAT, "version": SECRETS_VERSION}
        document.update({name: getattr(self, name).hex() for name in _KEY_FIELDS})
        document["revealed"] = {owner: kind.name for owner, kind in sorted(self.revealed.items())}
        document["confirmed"] = None if self.confirmed is None else list(self.confirmed)
        return (json.dumps(document, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> SiteSecrets:
        """Secrets read back from `to_bytes`'s output; SecretsFileError (one line) when corrupt."""
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SecretsFileError(f"not a secure round's secrets file: {error}") from None
        if not isinstance(document, dict) or document.get("format") != SECRETS_FORMAT:
            raise SecretsFileError(
                f"not a secure round's secrets file (no format {SECRETS_FORMAT!r})"
            )
        if document.get("version") != SECRETS_VERSION:
            raise SecretsFileError(
                f"secrets file version {document.get('version')!r}; this foedus reads "
                f"version {SECRETS_VERSION}"
            )
        keys: dict[str, bytes] = {}
        for name in _KEY_FIELDS:
            try:
                value = bytes.fromhex(document[name])
            except (KeyError, TypeError, ValueError, binascii.Error):
                raise SecretsFileError(f"secrets file: {name} is missing or not hex") from None
            if len(value) != KEY_BYTES:
                raise SecretsFileError(f"secrets file: {name} is not {KEY_BYTES} bytes long")
            keys[name] = value
        revealed = document.get("revealed")
        confirmed = document.get("confirmed")
        if not isinstance(revealed, dict) or not all(
            isinstance(owner, str) and kind in SecretKind.__members__
            for owner, kind in revealed.items()
        ):
            raise SecretsFileError("secrets file: revealed is not a map of owners to secret kinds")
        if confirmed is not None and not (
            isinstance(confirmed, list) and all(isinstance(name, str) for name in confirmed)
        ):
            raise SecretsFileError("secrets file: confirmed is not a list of names")
        return cls(
            keys["encryption_private"],
            keys["mask_private"],
            keys["seed"],
            keys["sharing_seed"],
            revealed={owner: SecretKind[kind] for owner, kind in revealed.items()},
            confirmed=None if confirmed is None else tuple(confirmed),
        )
