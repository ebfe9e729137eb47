"""The noise DP-FedAvg adds: standard normals from AES-256-CTR under a key made from a secret.

The aggregator keeps one 32-byte secret (`new_secret`) for a federation's life. The noise of
round r for tensor t is a stream of standard normals, element i of which depends on (secret, r,
t, i) alone: any slice [start, stop) is computed by itself and equals those elements of the
whole stream, so a resume after kill -9 adds exactly the noise the undisturbed run added, and
the model is computed a slice at a time in any order.

The stream: its key is HMAC-SHA256(secret, "foedus.privacy.noise/vN" | round as 8 bytes
big-endian | the tensor name's UTF-8 length as 4 bytes big-endian | the name), N the secret's
noise version (`NoiseSecret.version`). AES-256-CTR under that key, counter block 0 first,
encrypts zeros; keystream block j (16 bytes, two little-endian 64-bit words w1, w2) makes
elements 2j and 2j + 1 by the Box-Muller transform: z_2j = R cos(A), z_2j+1 = R sin(A), with
R = sqrt(-2 ln u1) on the 53-bit uniform u1 = ((w1 >> 11) + 1) / 2^53 in (0, 1] (in float64),
and the angle A from w2:

* version 1: A = 2 pi u2, u2 = (w2 >> 11) / 2^53, its sine and cosine in float64;
* version 2 (new secrets): A = float32(w2 >> 40) x float32(2 pi / 2^24), a 24-bit uniform angle
  in float32, its sine and cosine in float32 (numpy's vectorised loops: the float64 ones were
  0.36 of the 0.44 s of CPU 25M normals took here, 100 MB of a float32 model), then widened to
  float64 for the product with R. The angle's grain of 2^-24 of a turn, and float32's sine
  (within a unit in the last place), bend the normal's density by parts in 10^7, where the
  radius alone decides the tails.

The transform is exact for exact uniforms; 53-bit uniforms u1 cut the tails at |z| =
sqrt(106 ln 2) = 8.57 in both versions, which a standard normal passes with probability 1e-17.
The logarithm, sine and cosine are numpy's: the same machine and numpy give the same bits (a
resume), another CPU may differ in the last bit. A federation keeps the version its secret was
made with (`foedus.privacy.secret`), so one resumed by a newer foedus adds the same noise.

Adaptive clipping's noise on a round's count of unclipped sites is drawn the same way under
another label, "foedus.privacy.clip-count/vN" (`CLIP_COUNT_STREAM`), so it is independent of
the model's noise, which it leaves unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from foedus.protos.dtypes import is_float

SECRET_BYTES = 32  # the noise secret: an AES-256 key's worth of entropy
# The labels of the noise streams, each its own keys: the noise added to the model's values,
# and that added to the count of a round's unclipped sites (`foedus.privacy.adaptive`).
MODEL_STREAM = b"foedus.privacy.noise"
CLIP_COUNT_STREAM = b"foedus.privacy.clip-count"
# The transforms from keystream to normals (the module's docstring); a secret keeps its own.
NOISE_V1 = 1  # the angle a 53-bit uniform, its sine and cosine in float64
NOISE_V2 = 2  # the angle a 24-bit uniform, its sine and cosine in float32: 4x less CPU
NOISE_VERSIONS = frozenset({NOISE_V1, NOISE_V2})
NOISE_VERSION = NOISE_V2  # what a new secret draws with
_BLOCK = 16  # one AES block: two 64-bit words, one pair of normals
_PAIRS = 1 << 16  # pairs made at a time: 1 MB of keystream, temporaries that stay in cache
_UNIT = 2.0**-53
_ANGLE_UNIT = np.float32(2.0 * np.pi / 2**24)  # version 2's angle per step of its 24-bit uniform

Float64Array = npt.NDArray[np.float64]


def new_secret() -> bytes:
    """A fresh noise secret's key from the operating system's generator, made once per
    federation (`NoiseSecret`)."""
    return secrets.token_bytes(SECRET_BYTES)


@dataclass(frozen=True)
class NoiseSecret:
    """A party's noise secret and the version of the transform it draws with (the module's
    docstring): what every stream of its noise is a function of."""

    key: bytes = field(repr=False)  # never in a log line, not even a repr
    version: int = NOISE_VERSION

    def __post_init__(self) -> None:
        if len(self.key) != SECRET_BYTES:
            raise ValueError(f"a noise secret is {SECRET_BYTES} bytes, not {len(self.key)}")
        if self.version not in NOISE_VERSIONS:
            raise ValueError(f"noise version {self.version} is not one of {sorted(NOISE_VERSIONS)}")


def stream_key(
    secret: NoiseSecret, round_number: int, tensor: str, *, stream: bytes = MODEL_STREAM
) -> bytes:
    """The AES-256 key of round `round_number`'s noise for `tensor` (one stream per pair);
    `stream` labels what the noise is for (another label: a stream of its own)."""
    if not 0 <= round_number < 1 << 64:
        raise ValueError(f"a round number is 0 to 2^64 - 1, not {round_number}")
    name = tensor.encode("utf-8")
    label = (
        stream
        + f"/v{secret.version}".encode("ascii")
        + round_number.to_bytes(8, "big")
        + len(name).to_bytes(4, "big")
        + name
    )
    return hmac.digest(secret.key, label, hashlib.sha256)


def gaussian(
    secret: NoiseSecret,
    round_number: int,
    tensor: str,
    start: int,
    stop: int,
    *,
    stream: bytes = MODEL_STREAM,
) -> Float64Array:
    """Elements [start, stop) of round `round_number`'s standard normal noise for `tensor`
    (of `stream`: the model's noise unless told).

    Deterministic in its arguments (the secret's version too); a slice equals the same
    elements of any larger slice.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"a noise slice is 0 <= start <= stop, not [{start}, {stop})")
    key = stream_key(secret, round_number, tensor, stream=stream)
    first, end = start // 2, (stop + 1) // 2  # the pairs [first, end) hold the slice
    # The pairs' normals straight into the array returned (a view that leaves out the pair's
    # other element when start or stop is odd): no copy, and the caller owns it.
    normals: Float64Array = np.empty(2 * (end - first), dtype=np.float64)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(first.to_bytes(_BLOCK, "big"))).encryptor()
    scratch = _scratch()
    for pair in range(first, end, _PAIRS):
        count = min(_PAIRS, end - pair)
        encryptor.update_into(scratch.zeros[: count * _BLOCK], scratch.keystream)  # type: ignore[arg-type]
        words, out = scratch.words[: 2 * count], normals[2 * (pair - first) :][: 2 * count]
        radius = scratch.buffers[0][:count]
        if secret.version == NOISE_V1:
            _box_muller(words, out, radius, *(buffer[:count] for buffer in scratch.buffers[1:]))
        else:
            _box_muller_v2(words, out, radius, *(buffer[:count] for buffer in scratch.singles))
    return normals[start - 2 * first : stop - 2 * first]


class _Scratch:
    """One thread's buffers for `gaussian`, kept between calls: a 100 MB tensor's noise is made
    in hundreds of calls, and fresh buffers of a few MB each would be fresh pages each time."""

    def __init__(self) -> None:
        self.zeros = memoryview(bytes(_PAIRS * _BLOCK))  # a slice of a memoryview copies nothing
        # update_into wants room for a block more than it writes.
        self.keystream = np.empty(_PAIRS * _BLOCK + _BLOCK, dtype=np.uint8)
        self.words = self.keystream[: _PAIRS * _BLOCK].view("<u8")
        self.buffers = tuple(np.empty(_PAIRS, dtype=np.float64) for _ in range(3))
        self.singles = tuple(np.empty(_PAIRS, dtype=np.float32) for _ in range(2))  # version 2


_local = threading.local()


def _scratch() -> _Scratch:
    """This thread's `_Scratch` (threads never share one: the aggregator computes slices in a pool)."""
    scratch: _Scratch | None = getattr(_local, "scratch", None)
    if scratch is None:
        scratch = _local.scratch = _Scratch()
    return scratch


def _box_muller(
    words: npt.NDArray[np.uint64],
    normals: Float64Array,
    radius: Float64Array,
    angle: Float64Array,
    values: Float64Array,
) -> None:
    """Standard normals into `normals`, two from each pair of `words` (the module's docstring).

    On buffers the caller reuses (`words` is overwritten; `radius`, `angle` and `values` hold
    one value per pair), so a slice of a 100 MB tensor makes no temporaries. The logarithm,
    sine and cosine run on contiguous arrays, as numpy's fastest loops want them.
    """
    np.right_shift(words, np.uint64(11), out=words)  # 53-bit integers
    np.multiply(words[0::2], _UNIT, out=radius)  # k1 / 2^53, exact
    np.add(radius, _UNIT, out=radius)  # u1 = (k1 + 1) / 2^53, exact: in (0, 1]
    np.log(radius, out=radius)
    np.multiply(radius, -2.0, out=radius)
    np.sqrt(radius, out=radius)
    np.multiply(words[1::2], _UNIT, out=angle)  # u2 = k2 / 2^53, exact: in [0, 1)
    np.multiply(angle, 2.0 * np.pi, out=angle)
    np.cos(angle, out=values)
    np.multiply(values, radius, out=normals[0::2])
    np.sin(angle, out=values)
    np.multiply(values, radius, out=normals[1::2])


def _box_muller_v2(
    words: npt.NDArray[np.uint64],
    normals: Float64Array,
    radius: Float64Array,
    angle: npt.NDArray[np.float32],
    values: npt.NDArray[np.float32],
) -> None:
    """Version 2's normals into `normals`: `_box_muller`'s radius, a float32 angle (the
    module's docstring); `angle` and `values` float32 buffers of one value per pair."""
    np.right_shift(words, np.uint64(11), out=words)
    np.multiply(words[0::2], _UNIT, out=radius)
    np.add(radius, _UNIT, out=radius)
    np.log(radius, out=radius)
    np.multiply(radius, -2.0, out=radius)
    np.sqrt(radius, out=radius)
    np.right_shift(words[1::2], np.uint64(29), out=words[1::2])  # w2 >> 40: 24 bits
    np.multiply(words[1::2], _ANGLE_UNIT, out=angle, casting="unsafe")  # exact, then rounded once
    np.cos(angle, out=values)
    np.multiply(values, radius, out=normals[0::2])
    np.sin(angle, out=values)
    np.multiply(values, radius, out=normals[1::2])


def not_noisable(model: Mapping[str, npt.NDArray[np.generic]]) -> str | None:
    """The first tensor (by name) Gaussian noise cannot be added to, with its dtype, or None.

    Noise needs floating point (bfloat16 too): an integer or boolean tensor would round it away.
    """
    for name in sorted(model):
        dtype = model[name].dtype
        if not is_float(dtype):
            return f"tensor {name!r} is {dtype}"
    return None
