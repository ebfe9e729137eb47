"""DP-FedAvg's noise: standard normals, the same for any slice and every call, independent.

The statistical checks draw a million values under a fresh secret each run; each check's
false-alarm rate (a correct generator failing it) is stated beside it, 1e-6 apiece: z = 4.89
for a two-sided normal bound, p < 1e-6 for the Kolmogorov-Smirnov test. The secret is in each
assertion's message, so a failure can be replayed. They run for each version of the
transform (`NOISE_V1`, which secrets made before versions keep, and `NOISE_V2`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

import ml_dtypes
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from foedus.privacy import SECRET_BYTES, NoiseSecret, gaussian, new_secret, not_noisable, stream_key
from foedus.privacy.noise import NOISE_V1, NOISE_V2, NOISE_VERSION

DRAWS = 1_000_000
Z = 4.89  # P(|N(0, 1)| > 4.89) = 1.0e-6: the false-alarm rate of each two-sided bound below
P_VALUE = 1e-6  # the false-alarm rate of the Kolmogorov-Smirnov test
SECRET = NoiseSecret(bytes(range(SECRET_BYTES)))  # today's version
VERSIONS = (NOISE_V1, NOISE_V2)


@pytest.fixture(scope="module", params=VERSIONS)
def draws(request: pytest.FixtureRequest) -> tuple[NoiseSecret, np.ndarray]:
    """A fresh secret of each version and a million draws of round 1's noise for one tensor."""
    secret = NoiseSecret(new_secret(), request.param)
    return secret, gaussian(secret, 1, "layer.weight", 0, DRAWS)


def test_the_mean_is_zero(draws: tuple[NoiseSecret, np.ndarray]) -> None:
    """|mean| < 4.89 / sqrt(N): false alarm 1e-6."""
    secret, values = draws
    assert abs(values.mean()) < Z / math.sqrt(DRAWS), secret.key.hex()


def test_the_standard_deviation_is_one(draws: tuple[NoiseSecret, np.ndarray]) -> None:
    """The sample variance of N standard normals is 1 with std sqrt(2 / N): |var - 1| <
    4.89 sqrt(2 / N), false alarm 1e-6. Scaled by noise_multiplier x clip, the std is theirs."""
    secret, values = draws
    assert abs(values.var() - 1) < Z * math.sqrt(2 / DRAWS), secret.key.hex()
    scaled = 1.3 * 0.7 * values
    assert abs(scaled.std() / (1.3 * 0.7) - 1) < Z * math.sqrt(1 / (2 * DRAWS)), secret.key.hex()


def test_the_values_are_normal(draws: tuple[NoiseSecret, np.ndarray]) -> None:
    """Kolmogorov-Smirnov against N(0, 1), tails and all: p above 1e-6."""
    secret, values = draws
    assert stats.kstest(values, "norm").pvalue > P_VALUE, secret.key.hex()


def test_each_pair_and_its_neighbours_are_independent(
    draws: tuple[NoiseSecret, np.ndarray],
) -> None:
    """Box-Muller makes two values from one radius: their correlation, and their squares',
    is N(0, 1 / n) for independent values (|r| < 4.89 / sqrt(n)); so is a pair's with the next."""
    secret, values = draws
    even, odd = values[0::2], values[1::2]
    bound = Z / math.sqrt(even.size)
    for first, second in [(even, odd), (even**2, odd**2), (odd[:-1], even[1:])]:
        assert abs(np.corrcoef(first, second)[0, 1]) < bound, secret.key.hex()


def test_streams_of_other_rounds_tensors_and_secrets_are_independent(
    draws: tuple[NoiseSecret, np.ndarray],
) -> None:
    """Another round, tensor, secret or version gives a stream uncorrelated with this one
    (false alarm 1e-6 each)."""
    secret, values = draws
    others = [
        gaussian(secret, 2, "layer.weight", 0, DRAWS),
        gaussian(secret, 1, "layer.bias", 0, DRAWS),
        gaussian(NoiseSecret(new_secret(), secret.version), 1, "layer.weight", 0, DRAWS),
        gaussian(
            NoiseSecret(secret.key, NOISE_V1 + NOISE_V2 - secret.version),
            1,
            "layer.weight",
            0,
            DRAWS,
        ),
    ]
    for other in others:
        assert abs(np.corrcoef(values, other)[0, 1]) < Z / math.sqrt(DRAWS), secret.key.hex()


def test_the_same_arguments_give_the_same_bytes() -> None:
    """The noise is a function of (secret, round, tensor, element): a resume after kill -9
    adds exactly what the undisturbed run added."""
    first = gaussian(SECRET, 7, "w", 0, 10_001)
    assert first.tobytes() == gaussian(SECRET, 7, "w", 0, 10_001).tobytes()
    assert first.dtype == np.float64 and first.shape == (10_001,)
    for other in [
        gaussian(SECRET, 8, "w", 0, 10_001),
        gaussian(SECRET, 7, "w2", 0, 10_001),
        gaussian(NoiseSecret(bytes(SECRET_BYTES)), 7, "w", 0, 10_001),
        gaussian(NoiseSecret(SECRET.key, NOISE_V1), 7, "w", 0, 10_001),
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
    for version in VERSIONS:
        secret = NoiseSecret(SECRET.key, version)
        whole = gaussian(secret, 3, "conv.weight", 0, 300_000)
        alone = gaussian(secret, 3, "conv.weight", start, stop)
        assert alone.tobytes() == whole[start:stop].tobytes()


ANGLE_UNIT = float(np.float32(2 * math.pi / 2**24))  # version 2's, rounded to float32


def _as_documented(secret: NoiseSecret, round_number: int, tensor: str, count: int) -> list[float]:
    """The first `count` values as `foedus.privacy.noise`'s docstring writes them, in plain
    Python: HMAC-SHA256 key, AES-256-CTR keystream of zeros, Box-Muller on a 53-bit uniform's
    radius and the version's angle."""
    name = tensor.encode("utf-8")
    label = f"foedus.privacy.noise/v{secret.version}".encode() + round_number.to_bytes(8, "big")
    key = hmac.digest(secret.key, label + len(name).to_bytes(4, "big") + name, hashlib.sha256)
    pairs = (count + 1) // 2
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(16 * pairs))
    values: list[float] = []
    for first, second in struct.iter_unpack("<QQ", stream):
        radius = math.sqrt(-2 * math.log(((first >> 11) + 1) / 2**53))
        if secret.version == NOISE_V1:
            angle = 2 * math.pi * (second >> 11) / 2**53
        else:  # float32(w2 >> 40) x float32(2 pi / 2^24), exact in a double, rounded to float32
            angle = float(np.float32((second >> 40) * ANGLE_UNIT))
        values += [radius * math.cos(angle), radius * math.sin(angle)]
    return values[:count]


@pytest.mark.parametrize(("version", "tolerance"), [(NOISE_V1, 1e-12), (NOISE_V2, 1e-6)])
def test_the_noise_is_the_documented_function(version: int, tolerance: float) -> None:
    """The stream is part of a federation's durable state (a newer foedus resuming an older
    federation must add the same noise): computed again from the docstring in plain Python, to
    the last bits numpy's and the C library's sine may differ in (version 2: float32's sine,
    within a unit in its last place)."""
    secret = NoiseSecret(SECRET.key, version)
    for round_number, tensor in [(0, "w"), (5, "conv.weight"), (2**64 - 1, "é")]:
        expected = _as_documented(secret, round_number, tensor, 1001)
        actual = gaussian(secret, round_number, tensor, 0, 1001)
        assert actual.tolist() == pytest.approx(expected, rel=tolerance, abs=tolerance)


def test_the_key_of_a_stream_is_pinned() -> None:
    """The key derivation is part of the durable format: a change would change the noise of a
    federation resumed by a newer foedus. HMAC-SHA256 over the label and version, round and
    name; today's secrets draw with version 2."""
    assert NOISE_VERSION == NOISE_V2 and SECRET.version == NOISE_V2
    for version in VERSIONS:
        label = f"foedus.privacy.noise/v{version}".encode()
        label += (5).to_bytes(8, "big") + (1).to_bytes(4, "big") + b"w"
        secret = NoiseSecret(SECRET.key, version)
        assert stream_key(secret, 5, "w") == hmac.digest(SECRET.key, label, hashlib.sha256)
        assert stream_key(secret, 5, "w") != stream_key(secret, 5, "w\x00")


@pytest.mark.parametrize(
    ("round_number", "start", "stop", "message"),
    [
        (-1, 0, 1, "a round number is 0 to 2"),
        (1, 2, 1, r"a noise slice is 0 <= start <= stop, not \[2, 1\)"),
        (1, -1, 1, r"a noise slice is 0 <= start <= stop, not \[-1, 1\)"),
    ],
)
def test_arguments_that_mean_nothing_are_refused(
    round_number: int, start: int, stop: int, message: str
) -> None:
    """A negative round or a reversed slice: a ValueError."""
    with pytest.raises(ValueError, match=message):
        gaussian(SECRET, round_number, "w", start, stop)


@pytest.mark.parametrize(
    ("key", "version", "message"),
    [(b"short", NOISE_V2, "a noise secret is 32 bytes, not 5"), (SECRET.key, 3, "noise version 3")],
)
def test_a_secret_of_the_wrong_size_or_version_is_refused(
    key: bytes, version: int, message: str
) -> None:
    """No noise is drawn from a key that is not 32 bytes, or by a transform that is not one."""
    with pytest.raises(ValueError, match=message):
        NoiseSecret(key, version)


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
