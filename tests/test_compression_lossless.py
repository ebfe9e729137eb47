"""The `lossless` code: any dtype's bytes back bit for bit, chunk by chunk, and every chunk that
is not what foedus' encoder writes refused by its header before Blosc2 inflates it, with
`CompressedFormatError` or `CompressedTooLargeError` and nothing else, whatever the bytes."""

from __future__ import annotations

import os
import struct
from typing import Any

import blosc2
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from foedus.compression.errors import CompressedFormatError, CompressedTooLargeError
from foedus.compression.lossless import (
    CHUNK_BYTES,
    HEADER_BYTES,
    MAX_OVERHEAD,
    TensorDecompressor,
    check_header,
    chunk_bytes,
    chunk_sizes,
    compress_chunk,
    compress_chunks,
    decompress_chunk,
    decompress_chunk_into,
)
from foedus.protos.codec import tensor_bytes

FUZZ = settings(
    max_examples=int(os.environ.get("FOEDUS_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
GIB = 1024**3
# Offsets in Blosc2's 32-byte chunk header (c-blosc2's README_CHUNK_FORMAT.rst).
VERSION, FLAGS, TYPESIZE = 0, 2, 3  # one byte each
NBYTES, BLOCKSIZE, CBYTES = 4, 8, 12  # little-endian int32 each
FILTERS, BLOSC2_FLAGS = 16, 31  # six filter codes, then (at 24) their six meta bytes


def model_like(count: int, seed: int = 0) -> np.ndarray[Any, np.dtype[np.float32]]:
    """float32 values with a model's structure: small, of a few magnitudes, some zeros."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(count).astype(np.float32) * np.float32(0.05)
    values[rng.random(count) < 0.1] = 0
    return values


def raw(array: np.ndarray[Any, Any]) -> memoryview:
    """An array's bytes, as the wire takes them (any dtype, bfloat16 too)."""
    return tensor_bytes(array)


def patched(frame: bytes, offset: int, fmt: str, value: int) -> bytes:
    """`frame` with one header field rewritten."""
    out = bytearray(frame)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def one_chunk() -> bytes:
    """A valid chunk of 1000 float32 values (4000 raw bytes)."""
    return compress_chunk(raw(model_like(1000)), 4)


@pytest.mark.parametrize(
    ("dtype", "count"),
    [
        ("<f4", 1),
        ("<f4", 700_000),  # three chunks, the last one shorter
        ("<f8", 300_000),
        (ml_dtypes.bfloat16, 524_288),  # exactly one chunk
        ("<f2", 12_345),
        ("<i8", 4_000),
        ("|u1", 3_000_001),
        ("|b1", 10_000),
        ("V3", 400_000),  # 3-byte items: a chunk ends on an item, at 1048575 bytes
    ],
)
def test_every_dtype_comes_back_bit_for_bit(dtype: Any, count: int) -> None:
    """Chunks of any dtype decode to the same bytes, one by one, in place, or streamed."""
    source = np.frombuffer(np.random.default_rng(1).bytes(count * np.dtype(dtype).itemsize), dtype)
    source = np.where(np.arange(count) % 3 == 0, np.zeros(1, dtype), source)  # some structure
    itemsize = source.dtype.itemsize
    frames = list(compress_chunks(raw(source), itemsize))
    sizes = list(chunk_sizes(source.nbytes, itemsize))
    assert len(frames) == len(sizes) and sum(sizes) == source.nbytes
    assert all(size % itemsize == 0 and size <= CHUNK_BYTES for size in sizes)
    joined = b"".join(
        decompress_chunk(frame, expected_bytes=size, itemsize=itemsize)
        for frame, size in zip(frames, sizes, strict=True)
    )
    assert joined == source.tobytes()
    received = np.empty_like(source)
    decoder = TensorDecompressor(raw(received), itemsize, tensor="t")
    stream = b"".join(frames)
    for start in range(0, len(stream), 65_537):  # slices across the chunks' boundaries
        decoder.feed(stream[start : start + 65_537])
    decoder.finish()
    assert received.tobytes() == source.tobytes()


def test_a_model_s_values_take_fewer_bytes() -> None:
    """A model's float32 values compress, a chunk of zeros to its header, and the same values
    always make the same bytes."""
    values = model_like(CHUNK_BYTES // 4)
    frame = compress_chunk(raw(values), 4)
    assert len(frame) < 0.9 * values.nbytes
    assert frame == compress_chunk(raw(values.copy()), 4)
    assert len(compress_chunk(bytes(CHUNK_BYTES), 4)) == HEADER_BYTES


def test_bytes_that_do_not_compress_take_at_most_blosc2s_overhead_more() -> None:
    """The bound the decoder holds a chunk to (`MAX_OVERHEAD`, written down in foedus so that
    Blosc2 is imported only where a chunk is coded) is the library's own, and holds."""
    noise = np.random.default_rng(5).integers(0, 256, CHUNK_BYTES, np.uint8)
    assert MAX_OVERHEAD == blosc2.MAX_OVERHEAD
    assert len(compress_chunk(raw(noise), 1)) <= CHUNK_BYTES + MAX_OVERHEAD


def test_a_chunk_is_inflated_straight_into_its_place() -> None:
    """`decompress_chunk_into` writes the chunk's bytes into a slice of the receive array and
    nowhere else."""
    values = model_like(1000)
    received = np.full(3000, 7, np.float32)
    decompress_chunk_into(one_chunk(), raw(received)[4000:8000], 4)
    assert np.array_equal(received[1000:2000], values)
    assert (received[:1000] == 7).all() and (received[2000:] == 7).all()
    with pytest.raises(ValueError, match="writable"):
        decompress_chunk_into(one_chunk(), memoryview(bytes(4000)), 4)


def test_the_encoder_takes_whole_items_of_one_chunk_at_most() -> None:
    """A chunk past `chunk_bytes`, empty, or cut inside an item is the caller's bug."""
    with pytest.raises(ValueError, match="whole 4-byte items"):
        compress_chunk(bytes(CHUNK_BYTES + 4), 4)
    with pytest.raises(ValueError, match="whole 4-byte items"):
        compress_chunk(b"", 4)
    with pytest.raises(ValueError, match="whole 8-byte items"):
        compress_chunk(bytes(12), 8)
    with pytest.raises(ValueError, match="an item is 1 to 255 bytes"):
        chunk_bytes(256)
    with pytest.raises(ValueError, match="whole number of 4-byte items"):
        list(chunk_sizes(10, 4))
    assert chunk_bytes(3) == CHUNK_BYTES - 1 and list(chunk_sizes(0, 4)) == []


# -- hostile chunks: refused by their header, before anything is inflated ---------------------


def test_a_header_claiming_a_gigabyte_is_refused_before_inflating() -> None:
    """A chunk that declares 1 GiB where the tensor's chunk has 4000 bytes: too large, refused
    without allocating (the header alone is read)."""
    liar = patched(one_chunk(), NBYTES, "<i", GIB)
    with pytest.raises(CompressedTooLargeError) as refused:
        decompress_chunk(liar, expected_bytes=4000, itemsize=4, tensor="fc.weight")
    assert str(refused.value) == (
        "lossless chunk of tensor 'fc.weight': declares 1073741824 raw bytes where this chunk "
        "of the tensor has 4000: refused before it is inflated"
    )
    with pytest.raises(CompressedTooLargeError):
        check_header(liar[:HEADER_BYTES], expected_bytes=4000, itemsize=4)


def test_a_valid_chunk_of_another_size_is_refused() -> None:
    """A genuine chunk of 4000 bytes where 8000 or 2000 are expected: too small is malformed,
    too large is too large."""
    with pytest.raises(CompressedFormatError, match="declares 4000 raw bytes where") as small:
        decompress_chunk(one_chunk(), expected_bytes=8000, itemsize=4)
    assert not isinstance(small.value, CompressedTooLargeError)
    with pytest.raises(CompressedTooLargeError, match="declares 4000 raw bytes where"):
        decompress_chunk(one_chunk(), expected_bytes=2000, itemsize=4)


def test_a_truncated_or_padded_chunk_is_refused() -> None:
    """Bytes missing from the end, or more than the header declares, or fewer than a header."""
    frame = one_chunk()
    with pytest.raises(CompressedFormatError, match=f"declares {len(frame)} compressed bytes"):
        decompress_chunk(frame[:-1], expected_bytes=4000, itemsize=4)
    with pytest.raises(CompressedFormatError, match=f"but {len(frame) + 1} came"):
        decompress_chunk(frame + b"\0", expected_bytes=4000, itemsize=4)
    with pytest.raises(CompressedFormatError, match="shorter than Blosc2's 32-byte header"):
        decompress_chunk(frame[:31], expected_bytes=4000, itemsize=4)
    with pytest.raises(CompressedFormatError, match="shorter than Blosc2's 32-byte header"):
        decompress_chunk(b"", expected_bytes=4000, itemsize=4)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (VERSION, "B", 4, "Blosc2 chunk format 4, where foedus reads format 5"),
        (FLAGS, "B", 0x85 | 0x08, "no delta filter"),  # Blosc1's delta filter
        (FLAGS, "B", 0x25, "foedus writes zstd chunks"),  # lz4
        (FLAGS, "B", 0xC5, "foedus writes zstd chunks"),  # a user-defined codec
        (FLAGS, "B", 0x80, "extended header"),
        (TYPESIZE, "B", 8, "items of 8 bytes, where the tensor's dtype has 4"),
        (BLOCKSIZE, "<i", GIB, "Blosc2 blocks of 1073741824 bytes in a chunk of 4000"),
        (BLOCKSIZE, "<i", 0, "Blosc2 blocks of 0 bytes"),
        (CBYTES, "<i", 5000, "declares 5000 compressed bytes for 4000 raw"),
        (CBYTES, "<i", -1, "declares -1 compressed bytes"),
        (NBYTES, "<i", -4, "declares -4 raw bytes"),
        (FILTERS, "B", 2, "foedus writes a byte shuffle alone"),  # bit shuffle
        (FILTERS + 1, "B", 3, "foedus writes a byte shuffle alone"),  # then delta
        (FILTERS + 8, "B", 1, "foedus writes a byte shuffle alone"),  # a filter's meta
        (BLOSC2_FLAGS, "B", 0x01, "a dictionary"),
        (BLOSC2_FLAGS, "B", 0x02, "a longer header"),
        (BLOSC2_FLAGS, "B", 0x08, "a lazy chunk"),
        (BLOSC2_FLAGS, "B", 0x40, "values it does not hold"),  # uninitialised values
        (BLOSC2_FLAGS, "B", 0x20, "flags 0x20"),  # a run of NaN: never written by foedus
    ],
)
def test_a_header_foedus_never_writes_is_refused(
    offset: int, fmt: str, value: int, message: str
) -> None:
    """Each of Blosc2's features foedus' encoder never uses, and each impossible size, is
    refused by the header (`CompressedFormatError`), naming what it found."""
    liar = patched(one_chunk(), offset, fmt, value)
    with pytest.raises(CompressedFormatError, match=message.replace("(", r"\(")) as refused:
        decompress_chunk(liar, expected_bytes=4000, itemsize=4, tensor="b")
    assert str(refused.value).startswith("lossless chunk of tensor 'b': ")
    assert not isinstance(refused.value, CompressedTooLargeError)


def test_a_corrupt_body_behind_a_valid_header_is_refused() -> None:
    """A chunk whose blocks are garbage: Blosc2 fails, and the failure is a format error."""
    frame = one_chunk()
    garbage = frame[:HEADER_BYTES] + bytes([0xFF]) * (len(frame) - HEADER_BYTES)
    with pytest.raises(CompressedFormatError, match="the chunk is corrupt"):
        decompress_chunk(garbage, expected_bytes=4000, itemsize=4)


def test_a_streamed_tensor_refuses_a_wrong_chunk_extra_bytes_and_an_early_end() -> None:
    """The streaming decoder checks each chunk's size in turn, bytes past the last chunk, and
    a stream that ends before the tensor is whole."""
    values = model_like(700_000)
    frames = list(compress_chunks(raw(values), 4))
    received = np.empty_like(values)
    with pytest.raises(CompressedTooLargeError, match="declares 1048576 raw bytes"):
        decoder = TensorDecompressor(raw(received), 4, tensor="w")
        decoder.feed(frames[0] + frames[0] + frames[0])  # the last chunk is shorter
    decoder = TensorDecompressor(raw(received), 4, tensor="w")
    decoder.feed(b"".join(frames))
    with pytest.raises(CompressedFormatError, match="lossless tensor 'w': 1 bytes past its 3"):
        decoder.feed(b"\0")
    decoder = TensorDecompressor(raw(received), 4, tensor="w")
    decoder.feed(frames[0] + frames[1][:100])
    with pytest.raises(CompressedFormatError, match=r"ended after 1 of the tensor's 3 chunks"):
        decoder.finish()
    empty = TensorDecompressor(memoryview(bytearray()), 4)
    empty.finish()  # a tensor of no values has no chunks
    with pytest.raises(CompressedFormatError, match="past its 0 chunks"):
        empty.feed(frames[0][:1])


# -- fuzzing: whatever the bytes, the bytes back or one of the two errors ---------------------

VALID = one_chunk()


def decode_or_refuse(frame: bytes, expected: int, itemsize: int) -> None:
    """Decode `frame`; the only exceptions allowed are the two refusals, and a decoded chunk
    has exactly the expected size."""
    try:
        out = decompress_chunk(frame, expected_bytes=expected, itemsize=itemsize)
    except CompressedTooLargeError:
        return
    except CompressedFormatError:
        return
    assert len(out) == expected


@FUZZ
@given(
    frame=st.binary(max_size=600),
    expected=st.integers(1, 8000),
    itemsize=st.sampled_from([1, 2, 4, 8]),
)
@example(frame=VALID[:HEADER_BYTES], expected=4000, itemsize=4)
@example(frame=VALID[:HEADER_BYTES] + bytes(600), expected=4000, itemsize=4)
def test_random_bytes_decode_or_are_refused(frame: bytes, expected: int, itemsize: int) -> None:
    """Random bytes (most refused by the header) never raise anything but the two errors."""
    decode_or_refuse(frame, expected, itemsize)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.integers(0, 40),
)
def test_a_valid_chunk_with_bytes_changed_decodes_or_is_refused(
    edits: list[tuple[int, int]], cut: int
) -> None:
    """A genuine chunk with a few bytes changed, in its header or its blocks, and maybe cut:
    it decodes to 4000 bytes (TLS, not this code, keeps the bytes honest) or is refused."""
    frame = bytearray(VALID)
    for offset, value in edits:
        frame[offset] = value
    decode_or_refuse(bytes(frame[: len(frame) - cut]), 4000, 4)


@FUZZ
@given(body=st.binary(min_size=0, max_size=400), blocksize=st.integers(1, 4000))
def test_a_valid_header_over_random_blocks_decodes_or_is_refused(
    body: bytes, blocksize: int
) -> None:
    """A header foedus would write, any block size, over random blocks: Blosc2 itself must
    refuse what is corrupt, and it comes out as a format error."""
    frame = patched(VALID[:HEADER_BYTES] + body, CBYTES, "<i", HEADER_BYTES + len(body))
    decode_or_refuse(patched(frame, BLOCKSIZE, "<i", blocksize), 4000, 4)
