"""The noise DP-FedAvg adds: standard normals from AES-256-CTR under a key made from a secret.

The aggregator keeps one 32-byte secret (`new_secret`) for a federation's life. The noise of
round r for tensor t is a stream of standard normals, element i of which depends on (secret, r,
t, i) alone: any slice [start, stop) is computed by itself and equals those elements of the
whole stream, so a resume after kill -9 adds exactly the noise the undisturbed run added, and
the model is computed a slice at a time in any order.

The stream: its key is HMAC-SHA256(secret, "foedus.privacy.noise/v1" | round as 8 bytes
big-endian | the tensor name's UTF-8 length as 4 bytes big-endian | the name). AES-256-CTR
under that key, counter block 0 first, encrypts zeros; keystream block j (16 bytes, two
little-endian 64-bit words w1, w2) makes elements 2j and 2j + 1 by the Box-Muller transform on
53-bit uniforms u1 = ((w1 >> 11) + 1) / 2^53 in (0, 1] and u2 = (w2 >> 11) / 2^53 in [0, 1):
z_2j = sqrt(-2 ln u1) cos(2 pi u2), z_2j+1 = sqrt(-2 ln u1) sin(2 pi u2). The transform is
exact for exact uniforms; 53-bit uniforms cut the tails at |z| = sqrt(106 ln 2) = 8.57, which
a standard normal passes with probability 1e-17. The logarithm, sine and cosine are numpy's:
the same machine and numpy give the same bits (a resume), another CPU may differ in the last
bit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from foedus.protos.dtypes import is_float

SECRET_BYTES = 32  # the noise secret: an AES-256 key's worth of entropy
_LABEL = b"foedus.privacy.noise/v1"
_BLOCK = 16  # one AES block: two 64-bit words, one pair of normals
_PAIRS = 1 << 16  # pairs made at a time: 1 MB of keystream, temporaries that stay in cache
_UNIT = 2.0**-53

Float64Array = npt.NDArray[np.float64]


def new_secret() -> bytes:
    """A fresh noise secret from the operating system's generator, made once per federation."""
    return secrets.token_bytes(SECRET_BYTES)


def stream_key(secret: bytes, round_number: int, tensor: str) -> bytes:
    """The AES-256 key of round `round_number`'s noise for `tensor` (one stream per pair)."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a noise secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not 0 <= round_number < 1 << 64:
        raise ValueError(f"a round number is 0 to 2^64 - 1, not {round_number}")
    name = tensor.encode("utf-8")
    label = _LABEL + round_number.to_bytes(8, "big") + len(name).to_bytes(4, "big") + name
    return hmac.digest(secret, label, hashlib.sha256)


def gaussian(secret: bytes, round_number: int, tensor: str, start: int, stop: int) -> Float64Array:
    """Elements [start, stop) of round `round_number`'s standard normal noise for `tensor`.

    Deterministic in its arguments; a slice equals the same elements of any larger slice.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"a noise slice is 0 <= start <= stop, not [{start}, {stop})")
    key = stream_key(secret, round_number, tensor)
    out: Float64Array = np.empty(stop - start, dtype=np.float64)
    first, end = start // 2, (stop + 1) // 2  # the pairs [first, end) hold the slice
    encryptor = Cipher(algorithms.AES(key), modes.CTR(first.to_bytes(_BLOCK, "big"))).encryptor()
    zeros = bytes(min(end - first, _PAIRS) * _BLOCK)
    # update_into wants room for a block more than it writes.
    keystream = bytearray(len(zeros) + _BLOCK)
    for pair in range(first, end, _PAIRS):
        count = min(_PAIRS, end - pair)
        encryptor.update_into(zeros[: count * _BLOCK], keystream)
        words = np.frombuffer(keystream, dtype="<u8", count=2 * count)
        normals = _box_muller(words)
        low = max(start, 2 * pair)
        high = min(stop, 2 * (pair + count))
        out[low - start : high - start] = normals[low - 2 * pair : high - 2 * pair]
    return out


def _box_muller(words: npt.NDArray[np.uint64]) -> Float64Array:
    """Standard normals, two from each pair of 64-bit words (the module's docstring)."""
    pairs = words.reshape(-1, 2)
    u1 = ((pairs[:, 0] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * _UNIT
    u2 = (pairs[:, 1] >> np.uint64(11)).astype(np.float64) * _UNIT
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = (2.0 * np.pi) * u2
    normals: Float64Array = np.empty(words.size, dtype=np.float64)
    normals[0::2] = radius * np.cos(angle)
    normals[1::2] = radius * np.sin(angle)
    return normals


def not_noisable(model: Mapping[str, npt.NDArray[np.generic]]) -> str | None:
    """The first tensor (by name) Gaussian noise cannot be added to, with its dtype, or None.

    Noise needs floating point (bfloat16 too): an integer or boolean tensor would round it away.
    """
    for name in sorted(model):
        dtype = model[name].dtype
        if not is_float(dtype):
            return f"tensor {name!r} is {dtype}"
    return None
