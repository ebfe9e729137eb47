"""The records a secure round's stages exchange, as plain values (`foedus.secure.wire`: the proto)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SecretKind(enum.IntEnum):
    """Which of an owner's two secrets a revealed share is of (the wire's `SecretKind` numbers)."""

    SELF_MASK_SEED = 1  # a survivor's: its self-mask is removed from the sum
    MASK_PRIVATE_KEY = 2  # a dropped site's: its pairwise masks are removed from the sum


@dataclass(frozen=True)
class Advertisement:
    """A site's public keys for one round, signed with its certificate's private key (KEYS)."""

    collaborator: str
    encryption_key: bytes  # X25519 public key (32 bytes): shares for this site are sealed under it
    mask_key: bytes  # X25519 public key (32 bytes): pairwise masks are agreed with it
    seed_commitment: bytes  # SHA-256 of the label, the name and the self-mask seed (32 bytes)
    certificate: bytes  # the site's certificate, DER
    signature: bytes  # over `foedus.secure.keys.advertised_bytes`


@dataclass(frozen=True)
class SealedShare:
    """One site's Shamir shares of its two secrets for one holder, sealed for it (SHARES)."""

    sender: str
    receiver: str
    ciphertext: bytes  # 12-byte nonce, then AES-256-GCM of the point and the two shares


@dataclass(frozen=True)
class SurvivorConfirmation:
    """A survivor's signature of the survivor list the aggregator named (SURVIVORS)."""

    collaborator: str
    survivors: tuple[str, ...]
    signature: bytes  # over `foedus.secure.keys.survivors_bytes`


@dataclass(frozen=True)
class RevealedShare:
    """A share of `owner`'s secret of `kind`, revealed to the aggregator by its holder (UNMASK).

    The share's point is its revealer's (`RoundContext.point`): the aggregator knows who posted it.
    """

    owner: str
    kind: SecretKind
    share: bytes
