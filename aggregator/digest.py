"""The integrity digest of the state's files: BLAKE3 (256 bits, in hex).

The state names every file it keeps with the digest of its bytes, and checks it when the state is
recovered and whenever a file written earlier is read back, so a torn or corrupted file is found,
never used. Every upload and every model file is hashed as it is written: the digest's speed is
paid on every byte of a round. On the benchmark's machine (AMD EPYC with the SHA extensions, 64
MiB in 1 MiB blocks, two runs): SHA-256 1.1-1.3 GB/s, BLAKE2b 0.6-0.7, BLAKE3 on one thread
3.3-4.1. BLAKE3 is a cryptographic hash as SHA-256 is (no file can be made to match another's
digest); `blake3` is its authors' own binding of their Rust implementation.

States written before named their files by SHA-256 (schema version 1); `foedus.aggregator.schema`
migrates them when it opens one, with `file_digests`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

import blake3

BLOCK_BYTES: Final = 1024 * 1024  # what is hashed at a time when a file is read back


def new_digest() -> blake3.blake3:
    """A digest to feed the bytes of a file as they are written."""
    return blake3.blake3()


def file_digest(path: Path) -> str:
    """The digest of the file at `path`, read a block at a time (`OSError` if it cannot be)."""
    digest = new_digest()
    with path.open("rb") as file:
        while block := file.read(BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def file_digests(path: Path) -> tuple[str, str]:
    """The SHA-256 (as schema version 1 stored) and the digest of a file, in one read."""
    old, new = hashlib.sha256(), new_digest()
    with path.open("rb") as file:
        while block := file.read(BLOCK_BYTES):
            old.update(block)
            new.update(block)
    return old.hexdigest(), new.hexdigest()
