"""A party's privacy secret: 32 random bytes in a file of mode 0600, made once and kept for good.

The file holds the 32 bytes and then one byte, the version of the transform its noise is drawn
with (`foedus.privacy.noise`: 2 for a secret made now); a file of the 32 bytes alone was made
before versions were kept, and draws with version 1, as it did then.

The aggregator keeps one beside its state (DP-FedAvg's noise), a site one in its collaborator
state folder (DP-SGD's sampling and noise, its noise share under secure aggregation). Whatever
is drawn from it depends on (secret, round) alone, so a party restarted after kill -9 draws
exactly what it drew before: the same release, never a second one. The file is written once,
whole and durably (`foedus.durable.files.replace_file`, mode 0600 from its creation on), and never
replaced: two processes racing to make it keep the first one's bytes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from foedus.durable.files import replace_file
from foedus.privacy.noise import (
    NOISE_V1,
    NOISE_VERSION,
    NOISE_VERSIONS,
    SECRET_BYTES,
    NoiseSecret,
    new_secret,
)
from foedus.refusals.errors import StorageError

SECRET_FILE = "privacy.secret"
SECRET_MODE = 0o600


def privacy_secret(path: Path, *, remedy: str, made: bytes | None = None) -> NoiseSecret:
    """The secret in `path`, made (mode 0600, durably, with today's noise version) when it is
    not there yet: `made`, or fresh bytes from the operating system's generator.

    `StorageError` naming the file when it cannot be kept or holds something else; `remedy` says
    what the party's operator does about a file that is not a secret (say, start with --reset).
    """
    fresh = new_secret() if made is None else made
    try:
        # Another process that made it first wins: its secret is the one (FileExistsError).
        with contextlib.suppress(FileExistsError):
            if not path.exists():
                kept = fresh + bytes([NOISE_VERSION])
                replace_file(path, lambda file: file.write(kept), mode=SECRET_MODE, replace=False)
        secret = path.read_bytes()
    except OSError as error:
        raise StorageError(
            f"{path}: cannot keep the privacy secret: {error.strerror or error}"
        ) from None
    if len(secret) == SECRET_BYTES:  # made before versions were kept
        return NoiseSecret(secret, version=NOISE_V1)
    if len(secret) != SECRET_BYTES + 1 or secret[-1] not in NOISE_VERSIONS:
        raise StorageError(
            f"{path}: holds {len(secret)} bytes, not the {SECRET_BYTES} of a privacy secret "
            f"and its noise version ({remedy})"
        )
    return NoiseSecret(secret[:SECRET_BYTES], version=secret[-1])
