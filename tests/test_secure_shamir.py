"""Shamir's sharing over 2^521 - 1: any t shares rebuild the secret, t - 1 do not."""

from __future__ import annotations

import itertools
import secrets

import pytest

from foedus.secure import shamir


@pytest.mark.parametrize(("threshold", "holders"), [(1, 1), (1, 3), (2, 2), (3, 5), (4, 7)])
def test_any_threshold_of_the_shares_rebuild_the_secret(threshold: int, holders: int) -> None:
    """Every t-subset of the n shares gives the secret back, leading zero bytes included."""
    secret = b"\x00\x00" + secrets.token_bytes(30)
    shares = shamir.split(secret, threshold, range(1, holders + 1))
    assert sorted(shares) == list(range(1, holders + 1))
    assert all(len(share) == shamir.SHARE_BYTES for share in shares.values())
    for points in itertools.combinations(shares, threshold):
        assert shamir.combine({x: shares[x] for x in points}, 32) == secret


@pytest.mark.parametrize(("threshold", "holders"), [(2, 3), (3, 5), (4, 6)])
def test_fewer_than_the_threshold_do_not(threshold: int, holders: int) -> None:
    """t - 1 shares interpolate some other value (and mostly none of 32 bytes)."""
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold, range(1, holders + 1))
    for points in itertools.combinations(shares, threshold - 1):
        try:
            rebuilt = shamir.combine({x: shares[x] for x in points}, 32)
        except ValueError:
            continue
        assert rebuilt != secret


def test_the_points_may_be_any_distinct_indices_and_the_coefficients_given() -> None:
    """Shares at the holders' points (not 1..n), and the same shares again from the same
    coefficients (a restarted site's), other shares from others."""
    secret = secrets.token_bytes(32)
    coefficients = [secrets.randbelow(shamir.PRIME) for _ in range(2)]
    shares = shamir.split(secret, 3, [2, 5, 9, 11], coefficients=coefficients)
    assert shares == shamir.split(secret, 3, [2, 5, 9, 11], coefficients=coefficients)
    assert shares != shamir.split(secret, 3, [2, 5, 9, 11])
    assert shamir.combine({x: shares[x] for x in (5, 9, 11)}, 32) == secret


def test_a_share_of_another_polynomial_gives_another_secret() -> None:
    """One share swapped for another split's: the result is not the secret (the caller checks)."""
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, 3, [1, 2, 3])
    other = shamir.split(secret, 3, [1, 2, 3])
    with pytest.raises(ValueError, match="do not rebuild a secret of 32 bytes"):
        shamir.combine({1: shares[1], 2: shares[2], 3: other[3]}, 32)


@pytest.mark.parametrize(
    ("secret", "threshold", "points", "message"),
    [
        (b"", 2, [1, 2], "1 to 65 bytes"),
        (bytes(66), 2, [1, 2], "1 to 65 bytes"),
        (b"x", 0, [1, 2], "at least 1"),
        (b"x", 2, [1, 1], "distinct"),
        (b"x", 2, [0, 1], "distinct and between 1"),
    ],
)
def test_split_refuses_what_cannot_be_shared(
    secret: bytes, threshold: int, points: list[int], message: str
) -> None:
    """Empty or too long secrets, a threshold below 1, repeated or zero points."""
    with pytest.raises(ValueError, match=message):
        shamir.split(secret, threshold, points)


def test_combine_refuses_shares_that_are_not_field_elements() -> None:
    """A share of the wrong length, or a value at or above the prime, or no share at all."""
    with pytest.raises(ValueError, match="not a field element"):
        shamir.combine({1: b"\x01" * 65}, 32)
    with pytest.raises(ValueError, match="not a field element"):
        shamir.combine({1: b"\xff" * 66}, 32)
    with pytest.raises(ValueError, match="no shares"):
        shamir.combine({}, 32)
