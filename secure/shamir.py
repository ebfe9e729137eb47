"""Shamir's secret sharing over the prime field 2^521 - 1, our own (small and tested).

Why our own: the `cryptography` package has none, and pycryptodome's (`Crypto.Protocol.SecretSharing`)
takes 16-byte secrets over GF(2^128) and would be a second crypto library beside `cryptography`.
The Mersenne prime 2^521 - 1 holds any secret of up to 65 bytes (ours are 32) as one element, and
Python's integers do the arithmetic. A share is its point's value, 66 bytes big-endian; the points
are the holders' (`RoundContext.point`), known to whoever combines.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 65  # every secret of this many bytes is below PRIME


def split(
    secret: bytes,
    threshold: int,
    points: Sequence[int],
    *,
    coefficients: Sequence[int] | None = None,
) -> dict[int, bytes]:
    """Shares of `secret` at `points`: any `threshold` of them rebuild it, fewer tell nothing.

    `coefficients` (threshold - 1 field elements) replace the random ones from `secrets`, for a
    caller that must make the same shares again (a restarted site derives them from its own
    secret seed). Fewer points than `threshold` are allowed: then nobody can rebuild the secret.
    """
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret is 1 to {MAX_SECRET_BYTES} bytes long, not {len(secret)}")
    if threshold < 1:
        raise ValueError(f"the threshold must be at least 1, not {threshold}")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError(f"the points must be distinct and between 1 and 2^521 - 2: {points}")
    if coefficients is None:
        coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    elif len(coefficients) != threshold - 1 or any(not 0 <= c < PRIME for c in coefficients):
        raise ValueError(f"{threshold - 1} coefficients in the field are needed")
    polynomial = [int.from_bytes(secret, "big"), *coefficients]
    shares: dict[int, bytes] = {}
    for x in points:
        value = 0
        for coefficient in reversed(polynomial):  # Horner
            value = (value * x + coefficient) % PRIME
        shares[x] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], length: int) -> bytes:
    """The secret of `length` bytes that exactly these shares (point -> share) interpolate.

    The caller picks which shares (t of them); shares of a different polynomial give another
    value (ValueError when it does not fit in `length` bytes): check the result where you can.
    """
    if not shares:
        raise ValueError("no shares to combine")
    values: dict[int, int] = {}
    for x, share in shares.items():
        value = int.from_bytes(share, "big")
        if len(share) != SHARE_BYTES or value >= PRIME or not 0 < x < PRIME:
            raise ValueError(
                f"the share at point {x} is not a field element of {SHARE_BYTES} bytes"
            )
        values[x] = value
    secret = 0
    for x_i, y_i in values.items():
        numerator, denominator = 1, 1
        for x_j in values:
            if x_j != x_i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError(f"the shares do not rebuild a secret of {length} bytes")
    return secret.to_bytes(length, "big")
