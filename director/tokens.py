"""People's dashboard tokens: issued by `director dashboard-token`, kept only as SHA-256 digests.

A token is 32 random bytes (URL-safe text). The file `<state_dir>/dashboard_tokens.json` (mode
0600) maps each token's digest to the name it was issued to, so a copy of the file lets nobody in.
Issuing a new token for a name replaces the old one; `revoke` removes it. The dashboard reads the
file on every request (it is small), so an issued or revoked token counts at once, and a name
taken out of director.yaml's users and admins loses access even with a valid token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path

from foedus.durable.files import write_text
from foedus.refusals.errors import StorageError

TOKENS_FILE = "dashboard_tokens.json"
TOKEN_BYTES = 32


def digest(token: str) -> str:
    """The token's SHA-256, as stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The tokens of one director, in its state folder."""

    def __init__(self, state_dir: Path) -> None:
        """Tokens in `state_dir`/dashboard_tokens.json (created when the first is issued)."""
        self.path = state_dir / TOKENS_FILE

    def issue(self, name: str) -> str:
        """A new token for `name`, replacing any it had; the only time the token is seen whole."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        entries = {d: e for d, e in self._read().items() if e.get("name") != name}
        entries[digest(token)] = {"name": name, "issued_at": time.time()}
        self._write(entries)
        return token

    def revoke(self, name: str) -> bool:
        """Remove `name`'s token; whether it had one."""
        entries = self._read()
        kept = {d: e for d, e in entries.items() if e.get("name") != name}
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    def name_of(self, token: str) -> str | None:
        """Whose token this is, or None for an unknown one."""
        wanted = digest(token)
        for stored, entry in self._read().items():
            if hmac.compare_digest(stored, wanted):
                name = entry.get("name")
                return name if isinstance(name, str) else None
        return None

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise StorageError(f"{self.path}: cannot read: {error}") from None
        if not isinstance(data, dict):
            raise StorageError(f"{self.path}: not a JSON object; issue the tokens again")
        return {str(d): e for d, e in data.items() if isinstance(e, dict)}

    def _write(self, entries: dict[str, dict[str, object]]) -> None:
        """Atomically and durably, at mode 0600 from its creation (`foedus.durable.files`)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(entries, indent=1, sort_keys=True), mode=0o600)
        except OSError as error:
            raise StorageError(f"{self.path}: cannot write: {error.strerror}") from None
