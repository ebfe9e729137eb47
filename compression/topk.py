"""Top-k sparsification: only the k values of largest magnitude travel, with their positions.

For uploads only (a site's update delta, with error feedback keeping what was left out: see
`foedus.compression.feedback`); a download sends the whole model. k = ceil(fraction x n) in
float64, at least 1 (0 for an empty tensor); ties in magnitude go to the lowest position, so the
selection is a function of the values alone. It runs in O(n): a partition finds the k-th
largest magnitude, no sort of the whole tensor.

The positions travel sorted, as gaps (the first position itself, then each one's distance from
the one before, >= 1), each an unsigned LEB128 varint: 7 bits a byte, low bits first, the high
bit set on every byte but a gap's last. Measured at 1 %: 1.28 bytes an index on 25M Gaussian
values (a fixed width from the largest gap: 2 bytes, 1.375 bit-packed), 1.05 on a small MLP's
one-epoch update (fixed: 2 bytes, 1.75 bit-packed): large values cluster, and one long gap costs
a varint a byte more where it costs a fixed width on every index. The payload:

    header (20 bytes): format 1 (u8), values code (u8: 0 float32, 1 int8), 2 zero bytes,
                       k (u64 LE), the varints' bytes (u64 LE)
    the k gaps as varints
    the k values: float32 LE, or an int8 payload of k values (`foedus.compression.quantize`)

The decoder checks k against the count the caller gives, every length, and the gaps (canonical
varints of at most the bytes `count` needs, each position in range, strictly increasing), all
before it allocates more than a small multiple of the payload's own size; then the count zeros.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import numpy.typing as npt

from foedus.compression.errors import CompressedFormatError
from foedus.compression.quantize import int8_decode, int8_encode, int8_size
from foedus.compression.vectors import (
    Float32Array,
    Payload,
    byte_view,
    checked_count,
    first_nonfinite,
    float32_vector,
    label,
)

TOPK_FORMAT = 1
VALUE_CODES = ("float32", "int8")  # the values code's byte is its position here
_HEADER = struct.Struct("<BBHQQ")  # format, values code, reserved 0, k, varints' bytes
_SEVEN = np.uint64(7)
_LOW7 = np.uint64(0x7F)

Indices = npt.NDArray[np.int64]


def kept_count(count: int, fraction: float) -> int:
    """k for a tensor of `count` values: ceil(fraction x count) in float64, at least 1, at most
    `count`."""
    if count == 0:
        return 0
    return min(count, max(1, math.ceil(fraction * count)))


def topk_encode(
    values: Float32Array, fraction: float, *, values_code: str = "float32", name: str = ""
) -> bytes:
    """The k = ceil(fraction x n) values of largest magnitude of `values` (1-D float32) and their
    positions (the module's docstring has the format); `ValueError` for a NaN or infinity, a
    fraction outside (0, 1] or a values code other than float32 and int8."""
    vector = float32_vector(values, name=name)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"topk fraction {fraction!r}: a number in (0, 1]")
    if not 0 < fraction <= 1:  # NaN fails this too
        raise ValueError(f"topk fraction {fraction!r}: a number in (0, 1]")
    if values_code not in VALUE_CODES:
        raise ValueError(f"topk values code {values_code!r}: one of {', '.join(VALUE_CODES)}")
    k = kept_count(vector.size, fraction)
    positions = largest(vector, k)
    varints = encode_gaps(positions)
    kept = vector[positions]
    if values_code == "int8":
        kept_bytes = int8_encode(kept, name=name)
    else:
        kept_bytes = kept.astype("<f4", copy=False).tobytes()
    header = _HEADER.pack(TOPK_FORMAT, VALUE_CODES.index(values_code), 0, k, len(varints))
    return b"".join((header, varints, kept_bytes))


def largest(vector: Float32Array, k: int) -> Indices:
    """The sorted positions of the `k` largest magnitudes of `vector`, ties to the lowest
    position, in O(n)."""
    count = vector.size
    if k >= count:
        return np.arange(count, dtype=np.int64)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    magnitudes = np.abs(vector)
    threshold = np.partition(magnitudes, count - k)[count - k]  # the k-th largest
    chosen = magnitudes > threshold
    missing = k - int(np.count_nonzero(chosen))
    chosen[np.flatnonzero(magnitudes == threshold)[:missing]] = True  # lowest positions first
    positions: Indices = np.flatnonzero(chosen).astype(np.int64, copy=False)
    return positions


def topk_max_size(count: int, k: int) -> int:
    """The most bytes a well-formed topk payload of `k` values of `count` takes (each position
    its widest varint, the values float32 or int8 in blocks of 1): a receiver refuses a longer
    one before reading it."""
    values = max(4 * k, int8_size(k, 1))
    return _HEADER.size + k * varint_bytes(max(count - 1, 0)) + values


def varint_bytes(value: int) -> int:
    """The bytes of `value` as an unsigned LEB128 varint."""
    return max(1, -(-value.bit_length() // 7))


def encode_gaps(positions: Indices) -> bytes:
    """Sorted `positions` as gaps, each an unsigned LEB128 varint, concatenated."""
    if positions.size == 0:
        return b""
    gaps = np.diff(positions, prepend=0).astype(np.uint64)
    widest = varint_bytes(int(gaps.max()))
    lengths = np.ones(gaps.size, dtype=np.int64)
    for group in range(1, widest):
        lengths += gaps >= np.uint64(1 << (7 * group))
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - lengths
    for group in range(widest):
        here = np.flatnonzero(lengths > group)
        septet = (gaps[here] >> np.uint64(7 * group)) & _LOW7
        more = np.where(lengths[here] > group + 1, np.uint64(0x80), np.uint64(0))
        out[starts[here] + group] = septet | more
    return out.tobytes()


def decode_gaps(varints: npt.NDArray[np.uint8], k: int, count: int, what: str) -> Indices:
    """The k strictly increasing positions below `count` that `varints` hold as gaps;
    `CompressedFormatError` for anything else. Allocates 8 bytes a varint byte at most."""
    ends = np.flatnonzero(varints < 0x80)  # a varint's last byte has its high bit clear
    if ends.size != k or (k and ends[-1] != varints.size - 1):
        raise CompressedFormatError(
            f"{what}: its {varints.size} bytes of positions hold {ends.size} complete varints "
            f"where the header says {k}"
        )
    if k == 0:
        return np.empty(0, dtype=np.int64)
    lengths = np.diff(ends, prepend=-1)
    widest = varint_bytes(count - 1)
    if int(lengths.max()) > widest:
        at = int(np.argmax(lengths))
        raise CompressedFormatError(
            f"{what}: the gap before position number {at} takes {int(lengths[at])} bytes; a "
            f"gap within {count} values takes at most {widest} (a topk index out of range)"
        )
    overlong = np.flatnonzero((lengths > 1) & (varints[ends] == 0))
    if overlong.size:
        raise CompressedFormatError(
            f"{what}: the gap before position number {int(overlong[0])} is a varint with a "
            "trailing zero byte, which no encoder writes"
        )
    starts = ends - lengths + 1
    gaps = np.zeros(k, dtype=np.uint64)
    for group in range(int(lengths.max())):
        here = np.flatnonzero(lengths > group)
        septets = varints[starts[here] + group].astype(np.uint64) & _LOW7
        gaps[here] |= septets << (_SEVEN * np.uint64(group))
    repeated = np.flatnonzero(gaps[1:] == 0)
    if repeated.size:
        at = int(repeated[0]) + 1
        raise CompressedFormatError(
            f"{what}: the gap before position number {at} is 0: topk indices increase strictly"
        )
    # Each gap fits in `widest` varint bytes, so below 2**(7 x widest); a sum that wrapped
    # around 2**64 would show as a decrease, and the last position bounds them all.
    positions = np.cumsum(gaps)
    if k > 1 and not bool(np.all(positions[1:] > positions[:-1])):
        raise CompressedFormatError(f"{what}: topk indices out of range (their sum overflows)")
    last = int(positions[-1])
    if last >= count:
        raise CompressedFormatError(
            f"{what}: a topk index out of range: {last} in a tensor of {count} values"
        )
    decoded: Indices = positions.astype(np.int64)
    return decoded


def topk_decode(payload: Payload, count: int, *, name: str = "") -> Float32Array:
    """The `count` float32 values a topk payload stands for: zeros but the k it holds;
    `CompressedFormatError` for a payload this version does not read or that does not fit
    `count` (the module's docstring lists the checks)."""
    positions, kept = topk_kept(payload, count, name=name)
    decoded: Float32Array = np.zeros(count, dtype=np.float32)
    decoded[positions] = kept
    return decoded


def topk_kept(payload: Payload, count: int, *, name: str = "") -> tuple[Indices, Float32Array]:
    """The sorted positions and values a topk payload keeps of `count`, checked as `topk_decode`
    checks them, without the `count` zeros: a receiver places them a part at a time."""
    count = checked_count(count)
    view = byte_view(payload)
    what = f"topk payload of {label(name)}"
    if view.nbytes < _HEADER.size:
        raise CompressedFormatError(
            f"{what}: {view.nbytes} bytes, shorter than its {_HEADER.size}-byte header"
        )
    version, code, reserved, k, index_bytes = _HEADER.unpack_from(view)
    if version != TOPK_FORMAT or reserved != 0 or code >= len(VALUE_CODES):
        raise CompressedFormatError(
            f"{what}: header {bytes(view[:4]).hex()} is not topk format {TOPK_FORMAT} with "
            f"float32 or int8 values (a newer sender, or not a topk payload)"
        )
    if k > count:
        raise CompressedFormatError(f"{what}: keeps {k} values of a tensor of {count}")
    if count and k == 0:
        raise CompressedFormatError(f"{what}: keeps no value of {count}; an encoder keeps one")
    if not k <= index_bytes <= k * varint_bytes(max(count - 1, 0)):
        raise CompressedFormatError(
            f"{what}: {index_bytes} bytes of positions for {k} values kept of {count}"
        )
    values_start = _HEADER.size + index_bytes
    if view.nbytes < values_start:
        raise CompressedFormatError(
            f"{what}: {view.nbytes} bytes, shorter than its header and {index_bytes} bytes of "
            "positions"
        )
    values_code = VALUE_CODES[code]
    if values_code == "float32" and view.nbytes != values_start + 4 * k:
        raise CompressedFormatError(
            f"{what}: {view.nbytes} bytes where {k} float32 values and {index_bytes} bytes of "
            f"positions need {values_start + 4 * k}"
        )
    varints = np.frombuffer(view, dtype=np.uint8, count=index_bytes, offset=_HEADER.size)
    positions = decode_gaps(varints, k, count, what)
    if values_code == "int8":
        kept = int8_decode(view[values_start:], k, name=f"{name} (topk values)" if name else "")
    else:
        kept = np.frombuffer(view, dtype="<f4", count=k, offset=values_start)
        bad = first_nonfinite(kept)
        if bad is not None:
            raise CompressedFormatError(
                f"{what}: kept value number {bad} is a NaN or an infinity, which no encoder sends"
            )
    return positions, kept
