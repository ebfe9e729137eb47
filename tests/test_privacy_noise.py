"""DP-FedAvg's noise: standard normals, the same for any slice and every call, independent.

The statistical checks draw a million values under a fresh secret each run; each check's
false-alarm rate (a correct generator failing it) is stated beside it, 1e-6 apiece: z = 4.89
for a two-sided normal bound, p < 1e-6 for the Kolmogorov-Smirnov test. The secret is in each
assertion's message, so a failure can be replayed.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from scipy import stats

from foedus.privacy import SECRET_BYTES, gaussian, new_secret, not_noisable, stream_key

DRAWS = 1_000_000
Z = 4.89  # P(|N(0, 1)| > 4.89) = 1.0e-6: the false-alarm rate of each two-sided bound below
P_VALUE = 1e-6  # the false-alarm rate of the Kolmogorov-Smirnov test
SECRET = bytes(range(SECRET_BYTES))


@pytest.fixture(scope="module")
def draws() -> tuple[bytes, np.ndarray]:
    """A fresh secret and a million draws of round 1's noise for one tensor."""
    secret = new_secret()
    return secret, gaussian(secret, 1, "layer.weight", 0, DRAWS)


def test_the_mean_is_zero(draws: tuple[bytes, np.ndarray]) -> None:
    """|mean| < 4.89 / sqrt(N): false alarm 1e-6."""
    secret, values = draws
    assert abs(values.mean()) < Z / math.sqrt(DRAWS), secret.hex()


def test_the_standard_deviation_is_one(draws: tuple[bytes, np.ndarray]) -> None:
    """The sample variance of N standard normals is 1 with std sqrt(2 / N): |var - 1| <
    4.89 sqrt(2 / N), false alarm 1e-6. Scaled by noise_multiplier x clip, the std is theirs."""
    secret, values = draws
    assert abs(values.var() - 1) < Z * math.sqrt(2 / DRAWS), secret.hex()
    scaled = 1.3 * 0.7 * values
    assert abs(scaled.std() / (1.3 * 0.7) - 1) < Z * math.sqrt(1 / (2 * DRAWS)), secret.hex()


def test_the_values_are_normal(draws: tuple[bytes, np.ndarray]) -> None:
    """Kolmogorov-Smirnov against N(0, 1), tails and all: p above 1e-6."""
    secret, values = draws
    assert stats.kstest(values, "norm").pvalue > P_VALUE, secret.hex()


def test_each_pair_and_its_neighbours_are_independent(draws: tuple[bytes, np.ndarray]) -> None:
    """Box-Muller makes two values from one radius: their correlation, and their squares',
    is N(0, 1 / n) for independent values (|r| < 4.89 / sqrt(n)); so is a pair's with the next."""
    secret, values = draws
    even, odd = values[0::2], values[1::2]
    bound = Z / math.sqrt(even.size)
    for first, second in [(even, odd), (even**2, odd**2), (odd[:-1], even[1:])]:
        assert abs(np.corrcoef(first, second)[0, 1]) < bound, secret.hex()


def test_streams_of_other_rounds_tensors_and_secrets_are_independent(
    draws: tuple[bytes, np.ndarray],
) -> None:
    """Another round, tensor or secret gives a stream uncorrelated with this one (false alarm
    1e-6 each)."""
    secret, values = draws
    others = [
        gaussian(secret, 2, "layer.weight", 0, DRAWS),
        gaussian(secret, 1, "layer.bias", 0, DRAWS),
        gaussian(new_secret(), 1, "layer.weight", 0, DRAWS),
    ]
    for other in others:
        assert abs(np.corrcoef(values, other)[0, 1]) < Z / math.sqrt(DRAWS), secret.hex()


def test_the_same_arguments_give_the_same_bytes() -> None:
    """The noise is a function of (secret, round, tensor, element): a resume after kill -9
    adds exactly what the undisturbed run added."""
    first = gaussian(SECRET, 7, "w", 0, 10_001)
    assert first.tobytes() == gaussian(SECRET, 7, "w", 0, 10_001).tobytes()
    assert first.dtype == np.float64 and first.shape == (10_001,)
    for other in [
        gaussian(SECRET, 8, "w", 0, 10_001),
        gaussian(SECRET, 7, "w2", 0, 10_001),
        gaussian(bytes(SECRET_BYTES), 7, "w", 0, 10_001),
    ]:
        assert not np.any(first == other)


@pytest.mark.parametrize(
    ("start", "stop"),
    [
        (0, 0),
        (0, 1),
        (1, 2),
        (1, 3),
        (5, 6),
        (77, 1000),
        (131_071, 131_073),  # the end of the first block of pairs made at once, and past it
        (1, 262_145),
        (200_001, 300_000),
        (300_000, 300_000),
    ],
)
def test_any_slice_equals_the_whole_streams(start: int, stop: int) -> None:
    """Elements [start, stop) alone are the same elements of the whole stream, odd ends too."""
    whole = gaussian(SECRET, 3, "conv.weight", 0, 300_000)
    assert gaussian(SECRET, 3, "conv.weight", start, stop).tobytes() == whole[start:stop].tobytes()


def test_the_key_of_a_stream_is_pinned() -> None:
    """The key derivation is part of the durable format: a change would change the noise of a
    federation resumed by a newer foedus. HMAC-SHA256 over the label, round and name."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    label = b"foedus.privacy.noise/v1" + (5).to_bytes(8, "big") + (1).to_bytes(4, "big") + b"w"
    assert stream_key(SECRET, 5, "w") == hmac.digest(SECRET, label, hashlib.sha256)
    assert stream_key(SECRET, 5, "w") != stream_key(SECRET, 5, "w\x00")


@pytest.mark.parametrize(
    ("secret", "round_number", "start", "stop", "message"),
    [
        (b"short", 1, 0, 1, "a noise secret is 32 bytes, not 5"),
        (SECRET, -1, 0, 1, "a round number is 0 to 2"),
        (SECRET, 1, 2, 1, r"a noise slice is 0 <= start <= stop, not \[2, 1\)"),
        (SECRET, 1, -1, 1, r"a noise slice is 0 <= start <= stop, not \[-1, 1\)"),
    ],
)
def test_arguments_that_mean_nothing_are_refused(
    secret: bytes, round_number: int, start: int, stop: int, message: str
) -> None:
    """A secret of the wrong size, a negative round or a reversed slice: a ValueError."""
    with pytest.raises(ValueError, match=message):
        gaussian(secret, round_number, "w", start, stop)


def test_a_fresh_secret_is_32_random_bytes() -> None:
    """Each federation gets its own secret."""
    first, second = new_secret(), new_secret()
    assert len(first) == len(second) == SECRET_BYTES and first != second


def test_noise_needs_floating_point_tensors() -> None:
    """Floats (bfloat16 too) take noise; the first other tensor is named with its dtype."""
    floats = {
        "a": np.zeros(2, np.float32),
        "b": np.zeros(2, np.float64),
        "c": np.zeros(2, ml_dtypes.bfloat16),
    }
    assert not_noisable(floats) is None
    mixed = {**floats, "steps": np.zeros(1, np.int64), "mask": np.zeros(1, bool)}
    assert not_noisable(mixed) == "tensor 'mask' is bool"
    assert not_noisable({**floats, "steps": np.zeros(1, np.int64)}) == "tensor 'steps' is int64"
