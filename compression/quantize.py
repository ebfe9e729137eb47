"""Fewer bits a value: bfloat16 (2 bytes) and blockwise int8 (1 byte and a scale per block).

bfloat16 is float32's upper half, rounded to nearest even: the same 8-bit exponent, 8 bits of
mantissa; the payload is the 2-byte values, little-endian, and nothing else (the format has
nothing to vary). It is rounded on float32's bits in plain numpy: byte for byte what
`ml_dtypes`' cast gives every float32 it carries, a little faster, and without importing
`ml_dtypes` (half a second, which a process's first bfloat16 model paid).

int8 keeps one float32 scale per `block` values (max |x| / 127 of the block, 0 for a block of
zeros) and each value as round-half-even(x / scale) in [-127, 127]; it decodes to q x scale in
float32. Its payload says what decoding needs besides the element count, so the block size may
change without breaking old payloads:

    header (8 bytes): format 1 (u8), 3 zero bytes, block size (u32 LE)
    scales: ceil(count / block) float32 LE
    values: count int8

Both decoders check the payload's exact length against the element count the caller gives (the
tensor's shape in its own model) before they allocate, and refuse what an encoder never makes:
NaN or infinite values or scales, negative scales, -128. An int8 payload also decodes as its
chunks pass, into the tensor's own array: `int8_layout` from the header and the payload's size,
`int8_scales` (1.6 % of it, first), then `int8_dequantize` on each part of the values, wherever
a chunk cuts them. A bfloat16 payload cut on a value's edge decodes part by part as it is.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from foedus.compression.errors import CompressedFormatError
from foedus.compression.vectors import (
    Float32Array,
    Payload,
    byte_view,
    checked_count,
    float32_vector,
    label,
)

BFLOAT16_BYTES = 2
INT8_BLOCK = 256  # a scale per 256 values: 1.6 % more bytes, error bounded by each block's own peak
INT8_MAX_BLOCK = 1 << 24
INT8_FORMAT = 1
INT8_LIMIT = 127  # -127..127: symmetric, so -x encodes as -q
_INT8_HEADER = struct.Struct("<B3sI")  # format, 3 zero bytes, block size
INT8_HEADER_BYTES = _INT8_HEADER.size
_CHUNK_VALUES = 1 << 18  # values quantized at a time: float32 temporaries of 1 MB, kept in cache
_BF16_EXPONENT = 0x7F80  # all ones: infinity or NaN
_FLOAT32_LIMIT = np.float32(INT8_LIMIT)
# The smallest float32 that rounds to bfloat16's infinity: halfway from its largest, 0x7F7F
# (odd), to 0x7F80, so the tie goes up. Every finite value below it in magnitude rounds finite.
_BF16_OVERFLOW = np.uint32(0x7F7F8000).view(np.float32)
_BF16_BELOW_HALF = np.uint32(0x7FFF)  # added with the lowest kept bit: ties go to the even side
_SIXTEEN = np.uint32(16)


# -- bfloat16 --------------------------------------------------------------------------------


def bfloat16_encode(values: Float32Array, *, name: str = "") -> bytes:
    """`values` (1-D float32) as bfloat16, rounded to nearest even, 2 bytes a value LE;
    `ValueError` for a NaN or infinity, or a value past bfloat16's largest (about 3.39e38)."""
    vector = float32_vector(values, name=name)
    upper = np.empty(vector.size, "<u2")
    for start, rounded in _bfloat16_rounded(vector, name):
        np.right_shift(rounded, _SIXTEEN, out=upper[start : start + rounded.size], casting="unsafe")
    return upper.tobytes()


def bfloat16_round(values: Float32Array, *, name: str = "") -> Float32Array:
    """What `bfloat16_decode` gives of `bfloat16_encode(values)`, bit for bit, without the
    payload between them (a site's view of a model sent in bfloat16); the same `ValueError`s."""
    vector = float32_vector(values, name=name)
    decoded: Float32Array = np.empty(vector.size, np.float32)
    words = decoded.view(np.uint32)
    for start, rounded in _bfloat16_rounded(vector, name):
        np.bitwise_and(rounded, np.uint32(0xFFFF0000), out=words[start : start + rounded.size])
    return decoded


def _bfloat16_rounded(
    vector: Float32Array, name: str
) -> Iterator[tuple[int, npt.NDArray[np.uint32]]]:
    """The float32 bits of `vector` (a `float32_vector`) rounded to nearest even at bit 16, a
    slice of `_CHUNK_VALUES` at a time, each with its start: the bfloat16 is a word's upper
    half, its lower half is junk. The slice is a scratch array reused for the next one, so each
    pass over it stays in cache; `ValueError` at the slice of a value that rounds past
    bfloat16's largest (nothing is returned of a vector holding one)."""
    bits = vector.view(np.uint32)
    scratch = np.empty(min(bits.size, _CHUNK_VALUES), np.uint32)
    for start in range(0, bits.size, _CHUNK_VALUES):
        part = vector[start : start + _CHUNK_VALUES]
        if part.max() >= _BF16_OVERFLOW or part.min() <= -_BF16_OVERFLOW:
            position = start + int(np.flatnonzero(np.abs(part) >= _BF16_OVERFLOW)[0])
            raise ValueError(
                f"{label(name)}: value at position {position} ({vector[position]}) rounds past "
                "bfloat16's largest value (about 3.39e38)"
            )
        words = bits[start : start + _CHUNK_VALUES]
        rounded = scratch[: words.size]
        np.right_shift(words, _SIXTEEN, out=rounded)
        rounded &= np.uint32(1)  # the lowest bit kept: a tie rounds up only when it is odd
        rounded += _BF16_BELOW_HALF
        rounded += words  # a carry out of the lower half rounds up; no value overflows here
        yield start, rounded


def bfloat16_decode(payload: Payload, count: int, *, name: str = "") -> Float32Array:
    """The `count` float32 values of a bfloat16 payload (each exactly as bfloat16 holds it);
    `CompressedFormatError` for another length or a NaN or infinity."""
    count = checked_count(count)
    view = byte_view(payload)
    if view.nbytes != BFLOAT16_BYTES * count:
        raise CompressedFormatError(
            f"bfloat16 payload of {label(name)}: {view.nbytes} bytes where {count} values need "
            f"{BFLOAT16_BYTES * count}"
        )
    halves = np.frombuffer(view, dtype="<u2", count=count)
    nonfinite = np.flatnonzero((halves & np.uint16(_BF16_EXPONENT)) == _BF16_EXPONENT)
    if nonfinite.size:
        raise CompressedFormatError(
            f"bfloat16 payload of {label(name)}: value at position {int(nonfinite[0])} is a NaN "
            "or an infinity, which no encoder sends"
        )
    words = halves.astype(np.uint32)
    words <<= np.uint32(16)
    decoded: Float32Array = words.view(np.float32)
    return decoded


# -- int8, blockwise -------------------------------------------------------------------------


def int8_size(count: int, block: int) -> int:
    """The bytes of an int8 payload of `count` values in blocks of `block`."""
    return Int8Layout(count, block).size


def int8_encode(values: Float32Array, *, block: int = INT8_BLOCK, name: str = "") -> bytes:
    """`values` (1-D float32) as blockwise int8 (the module's docstring has the format);
    `ValueError` for a NaN or infinity, or for a value whose block's scale would overflow."""
    vector = float32_vector(values, name=name)
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= INT8_MAX_BLOCK:
        raise ValueError(f"int8 block size {block!r}: an integer 1..{INT8_MAX_BLOCK}")
    count = vector.size
    blocks = -(-count // block)
    out = bytearray(int8_size(count, block))
    _INT8_HEADER.pack_into(out, 0, INT8_FORMAT, bytes(3), block)
    scales = np.frombuffer(out, dtype="<f4", count=blocks, offset=_INT8_HEADER.size)
    codes = np.frombuffer(out, dtype=np.int8, count=count, offset=_INT8_HEADER.size + 4 * blocks)
    step = block * max(1, _CHUNK_VALUES // block)
    for start in range(0, count, step):
        stop = min(count, start + step)
        chunk = vector[start:stop]
        whole = chunk.size - chunk.size % block
        first = start // block
        if whole:
            _quantize_blocks(
                chunk[:whole].reshape(-1, block),
                scales[first : first + whole // block],
                codes[start : start + whole].reshape(-1, block),
            )
        if whole < chunk.size:  # the last, shorter block
            _quantize_blocks(
                chunk[whole:].reshape(1, -1),
                scales[first + whole // block : first + whole // block + 1],
                codes[start + whole : stop].reshape(1, -1),
            )
    _check_scales(scales, name, block)
    return bytes(out)


def _quantize_blocks(rows: Float32Array, scales: Float32Array, codes: np.ndarray) -> None:
    """Fill `scales` (one per row) and `codes` (int8, the shape of `rows`) for these blocks."""
    peaks = np.max(np.abs(rows), axis=1)
    scales[:] = peaks / _FLOAT32_LIMIT
    # A block of zeros (or of values so small that max/127 underflows to 0) is all zero codes.
    divisors = np.where(scales > 0, scales, np.float32(1))
    quotients = rows / divisors[:, None]
    np.rint(quotients, out=quotients)  # round half to even
    np.clip(quotients, -INT8_LIMIT, INT8_LIMIT, out=quotients)
    codes[:] = quotients


def _check_scales(scales: Float32Array, name: str, block: int) -> None:
    """`ValueError` when 127 x a block's scale overflows float32 (its values would decode to inf)."""
    with np.errstate(over="ignore"):
        past = np.flatnonzero(~np.isfinite(scales * _FLOAT32_LIMIT))
    if past.size:
        raise ValueError(
            f"{label(name)}: block {int(past[0])} (values from position {int(past[0]) * block}) "
            "holds a value too near float32's largest to quantize as int8"
        )


@dataclass(frozen=True)
class Int8Layout:
    """Where an int8 payload's parts lie, from its header: what a receiver decoding it as its
    chunks pass needs (`int8_layout`, then `int8_scales`, then `int8_dequantize` a part at a
    time, straight into the tensor's array)."""

    count: int
    block: int

    @property
    def blocks(self) -> int:
        """The number of scales: ceil(count / block)."""
        return -(-self.count // self.block)

    @property
    def codes_start(self) -> int:
        """The offset of the int8 values; the scales lie between the header and it."""
        return INT8_HEADER_BYTES + 4 * self.blocks

    @property
    def size(self) -> int:
        """The payload's bytes."""
        return self.codes_start + self.count


def int8_layout(header: Payload, count: int, *, size: int, name: str = "") -> Int8Layout:
    """The layout of an int8 payload of `size` bytes holding `count` values, from its first
    `INT8_HEADER_BYTES` bytes (`header`: at least those); `CompressedFormatError` for a header
    this version does not read, or a `size` other than the one the header and `count` give."""
    count = checked_count(count)
    view = byte_view(header)
    what = f"int8 payload of {label(name)}"
    if min(view.nbytes, size) < INT8_HEADER_BYTES:
        raise CompressedFormatError(
            f"{what}: {min(view.nbytes, size)} bytes, shorter than its "
            f"{INT8_HEADER_BYTES}-byte header"
        )
    version, reserved, block = _INT8_HEADER.unpack_from(view)
    if version != INT8_FORMAT or reserved != bytes(3):
        raise CompressedFormatError(
            f"{what}: header {bytes(view[:4]).hex()} is not int8 format {INT8_FORMAT} "
            "(a newer sender, or not an int8 payload)"
        )
    if not 1 <= block <= INT8_MAX_BLOCK:
        raise CompressedFormatError(f"{what}: block size {block}, not 1..{INT8_MAX_BLOCK}")
    layout = Int8Layout(count, block)
    if size != layout.size:
        raise CompressedFormatError(
            f"{what}: {size} bytes where {count} values in blocks of {block} need {layout.size}"
        )
    return layout


def int8_scales(data: Payload, layout: Int8Layout, *, name: str = "") -> Float32Array:
    """The scales of an int8 payload: its bytes [INT8_HEADER_BYTES, layout.codes_start), each
    checked (finite, not negative, 127 times it a float32); `CompressedFormatError` otherwise."""
    view = byte_view(data)
    if view.nbytes != 4 * layout.blocks:
        raise CompressedFormatError(
            f"int8 payload of {label(name)}: {view.nbytes} bytes of scales where "
            f"{layout.blocks} blocks need {4 * layout.blocks}"
        )
    scales = np.frombuffer(view, dtype="<f4", count=layout.blocks)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = np.flatnonzero(np.signbit(scales) | ~np.isfinite(scales * _FLOAT32_LIMIT))
    if bad.size:
        raise CompressedFormatError(
            f"int8 payload of {label(name)}: scale of block {int(bad[0])} is {scales[bad[0]]}: "
            "a scale is finite, not negative, and 127 times it a float32"
        )
    return scales


def int8_dequantize(
    codes: Payload,
    scales: Float32Array,
    layout: Int8Layout,
    start: int,
    *,
    out: Float32Array | None = None,
    name: str = "",
) -> Float32Array:
    """Values [start, start + len(codes)) of an int8 payload, q x scale, from those values'
    bytes (a part of the payload past `layout.codes_start`, wherever a chunk cuts it), into
    `out` when given (as many float32 as `codes` has bytes); `CompressedFormatError` for -128."""
    view = byte_view(codes)
    stop = start + view.nbytes
    if not 0 <= start <= stop <= layout.count or scales.size != layout.blocks:
        raise ValueError(
            f"values [{start}, {stop}) with {scales.size} scales: not a part of an int8 payload "
            f"of {layout.count} values in {layout.blocks} blocks"
        )
    quantized = np.frombuffer(view, dtype=np.int8)
    if quantized.size and int(quantized.min()) < -INT8_LIMIT:
        position = start + int(np.argmin(quantized))
        raise CompressedFormatError(
            f"int8 payload of {label(name)}: value at position {position} is -128: int8 values "
            "are -127..127"
        )
    decoded: Float32Array = np.empty(view.nbytes, np.float32) if out is None else out
    if decoded.shape != (view.nbytes,) or decoded.dtype != np.float32:
        raise ValueError(f"out is {decoded.dtype} {decoded.shape}, not float32 ({view.nbytes},)")
    block = layout.block
    # A part of a block up to the first boundary, whole blocks, then a part of one again.
    head = min(stop, -(-start // block) * block)
    whole = head + (stop - head) // block * block
    if head > start:
        np.multiply(quantized[: head - start], scales[start // block], out=decoded[: head - start])
    if whole > head:
        np.multiply(
            quantized[head - start : whole - start].reshape(-1, block),
            scales[head // block : whole // block, None],
            out=decoded[head - start : whole - start].reshape(-1, block),
        )
    if stop > whole:
        np.multiply(
            quantized[whole - start :], scales[whole // block], out=decoded[whole - start :]
        )
    return decoded


def int8_decode(payload: Payload, count: int, *, name: str = "") -> Float32Array:
    """The `count` float32 values of an int8 payload, q x scale; `CompressedFormatError` for a
    payload this version does not read, of another length, or with values no encoder makes."""
    view = byte_view(payload)
    layout = int8_layout(view, count, size=view.nbytes, name=name)
    scales = int8_scales(view[INT8_HEADER_BYTES : layout.codes_start], layout, name=name)
    return int8_dequantize(view[layout.codes_start :], scales, layout, 0, name=name)
