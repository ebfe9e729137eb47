"""bfloat16 and blockwise int8: exact formats, rounding to nearest even, and decoders that trust nothing."""

from __future__ import annotations

import itertools
import os
import re
import struct

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from foedus.compression.errors import CompressedFormatError
from foedus.compression.quantize import (
    INT8_BLOCK,
    INT8_HEADER_BYTES,
    bfloat16_decode,
    bfloat16_encode,
    bfloat16_round,
    int8_decode,
    int8_dequantize,
    int8_encode,
    int8_layout,
    int8_scales,
    int8_size,
)

FUZZ = settings(
    max_examples=int(os.environ.get("FOEDUS_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
F32_MAX = float(np.finfo(np.float32).max)
FINITE_F32 = hnp.arrays(
    np.float32,
    st.integers(0, 700),
    elements=st.floats(-F32_MAX / 4, F32_MAX / 4, width=32, allow_subnormal=True),
)


def _bits(*words: int) -> npt.NDArray[np.float32]:
    """float32 values from their bit patterns."""
    return np.array(words, dtype=np.uint32).view(np.float32)


def _reference_int8(
    values: npt.NDArray[np.float32], block: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int8]]:
    """Blockwise int8 written the plain way, a block at a time: (scales, codes)."""
    scales, codes = [], []
    for start in range(0, values.size, block):
        part = values[start : start + block]
        scale = np.float32(np.max(np.abs(part)) / np.float32(127))
        scales.append(scale)
        divided = part / scale if scale > 0 else np.zeros_like(part)
        codes.append(np.clip(np.rint(divided), -127, 127).astype(np.int8))
    return (
        np.array(scales, dtype=np.float32),
        np.concatenate(codes) if codes else np.zeros(0, np.int8),
    )


# -- bfloat16 --------------------------------------------------------------------------------


def test_bfloat16_rounds_to_nearest_even() -> None:
    """Halfway cases go to the even mantissa, the rest to the nearest, sign and zeros kept."""
    values = _bits(
        0x3F808000,  # 1 + 2^-8: halfway between 0x3F80 (even) and 0x3F81 -> 0x3F80
        0x3F818000,  # halfway between 0x3F81 (odd) and 0x3F82 -> 0x3F82
        0x3F808001,  # just past halfway -> 0x3F81
        0xBF807FFF,  # just below halfway, negative -> 0xBF80
        0x80000000,  # -0.0
        0x00000001,  # the smallest subnormal -> +0
        0x7F7F7FFF,  # below bfloat16's largest's halfway -> 0x7F7F
    )
    payload = bfloat16_encode(values)
    assert payload == struct.pack("<7H", 0x3F80, 0x3F82, 0x3F81, 0xBF80, 0x8000, 0x0000, 0x7F7F)
    assert payload == values.astype(ml_dtypes.bfloat16).tobytes()


def test_bfloat16_round_trip_is_ml_dtypes_cast() -> None:
    """A round trip gives exactly what ml_dtypes' bfloat16 gives, 2 bytes a value."""
    values = (np.random.default_rng(1).standard_normal(1001) * 1e3).astype(np.float32)
    payload = bfloat16_encode(values)
    assert len(payload) == 2 * values.size
    decoded = bfloat16_decode(payload, values.size)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert decoded.tobytes() == expected.tobytes()
    assert bfloat16_decode(bytearray(payload), values.size).tobytes() == expected.tobytes()
    assert bfloat16_decode(b"", 0).shape == (0,)


# The smallest float32 magnitude that rounds past bfloat16's largest (0x7F7F): the tie to 0x7F80.
_BF16_OVERFLOW_BITS = 0x7F7F8000
# Lower halves at and around every rounding boundary: exact, just below, at and past the tie.
_LOWER_HALVES = (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)


def _ml_dtypes_bfloat16(values: npt.NDArray[np.float32]) -> bytes:
    """ml_dtypes' cast to bfloat16, the reference the encoder must equal byte for byte."""
    return values.astype(ml_dtypes.bfloat16).tobytes()


def _carried_by_bfloat16(bits: npt.NDArray[np.uint32]) -> npt.NDArray[np.float32]:
    """The float32 values of `bits` that bfloat16 carries: finite, rounding below its infinity."""
    return bits[(bits & 0x7FFFFFFF) < _BF16_OVERFLOW_BITS].view(np.float32)


def _assert_bfloat16_is_ml_dtypes(values: npt.NDArray[np.float32]) -> None:
    """The payload is ml_dtypes' bytes; `bfloat16_round` and the decoder give its float32."""
    payload = bfloat16_encode(values)
    assert payload == _ml_dtypes_bfloat16(values)
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32).tobytes()
    assert bfloat16_decode(payload, values.size).tobytes() == expected
    assert bfloat16_round(values).tobytes() == expected


def test_bfloat16_is_ml_dtypes_cast_at_every_rounding_boundary() -> None:
    """Every sign, exponent and kept mantissa (all 65,536 upper halves, each with lower halves
    exact, just below, at and just past the tie): ties to even both ways, carries into the
    exponent, subnormals, -0.0, the largest values that round finite."""
    uppers = np.arange(1 << 16, dtype=np.uint32) << 16
    bits = (uppers[:, None] | np.array(_LOWER_HALVES, np.uint32)).reshape(-1)
    carried = _carried_by_bfloat16(bits)
    # Below 0x7F7F every lower half, each sign; 0x7F7F itself only below its tie.
    assert carried.size == 2 * (0x7F7F * len(_LOWER_HALVES) + 3)
    _assert_bfloat16_is_ml_dtypes(carried)


def test_bfloat16_is_ml_dtypes_cast_on_named_edge_cases() -> None:
    """The cases by name, beside each the bfloat16 it must be."""
    cases = {
        0x3F808000: 0x3F80,  # a tie, even side below: down
        0x3F818000: 0x3F82,  # a tie, odd side below: up
        0xBF818000: 0xBF82,  # the same, negative: away from zero
        0x3FFF8000: 0x4000,  # a tie rounding up carries into the exponent: 2.0
        0x00008000: 0x0000,  # a subnormal tie, even side: +0
        0x00018000: 0x0002,  # a subnormal tie, odd side: up
        0x807FFFFF: 0x8080,  # the largest subnormal rounds up to the smallest normal, negative
        0x00000001: 0x0000,  # the smallest subnormal: +0
        0x80000001: 0x8000,  # and negative: -0
        0x80000000: 0x8000,  # -0.0 stays -0.0
        0x7F7F7FFF: 0x7F7F,  # the largest float32 that rounds to bfloat16's largest
        0xFF7F7FFF: 0xFF7F,  # and its negative
        0x7F000000: 0x7F00,  # 2^127, the largest power of two
    }
    values = _bits(*cases)
    assert bfloat16_encode(values) == struct.pack(f"<{len(cases)}H", *cases.values())
    _assert_bfloat16_is_ml_dtypes(values)
    powers = np.ldexp(np.float32(1), np.arange(-149, 128)).astype(np.float32)
    assert np.all(powers > 0) and np.isfinite(powers).all()
    _assert_bfloat16_is_ml_dtypes(np.concatenate([powers, -powers]))


def test_bfloat16_is_ml_dtypes_cast_on_random_bit_patterns() -> None:
    """A million float32 bit patterns drawn uniformly (non-finite and overflowing ones left out)."""
    bits = np.random.default_rng(16).integers(0, 1 << 32, 1 << 20, dtype=np.uint32)
    carried = _carried_by_bfloat16(bits)
    assert carried.size > 0.99 * bits.size
    _assert_bfloat16_is_ml_dtypes(carried)
    _assert_bfloat16_is_ml_dtypes(carried[3:-5])  # starts and ends off any slice boundary


@pytest.mark.parametrize("word", [_BF16_OVERFLOW_BITS, 0x7F7FFFFF, 0xFF7F8000, 0xFF7FFFFF])
def test_bfloat16_refuses_exactly_where_ml_dtypes_gives_infinity(word: int) -> None:
    """From the tie past bfloat16's largest up to float32's largest, either sign: refused, by
    the encoder and by `bfloat16_round` alike, naming the tensor, the position and the value."""
    values = _bits(0x3F800000, 0x7F7F7FFF, word, 0xFF7F7FFF)
    assert np.isinf(values[2:3].astype(ml_dtypes.bfloat16).astype(np.float32)).all()
    message = (
        rf"^tensor 'w': value at position 2 \({re.escape(format(values[2]))}\) rounds past "
        r"bfloat16's largest value \(about 3\.39e38\)$"
    )
    for encode in (bfloat16_encode, bfloat16_round):
        with pytest.raises(ValueError, match=message):
            encode(values, name="w")


def test_bfloat16_refuses_a_nan_before_a_value_past_its_largest() -> None:
    """A NaN anywhere is the site's bug, named first even after an overflowing value."""
    values = _bits(0x7F7FFFFF, 0x3F800000, 0x7FC00000)
    for encode in (bfloat16_encode, bfloat16_round):
        with pytest.raises(ValueError, match=r"^a tensor: value at position 2 is nan: "):
            encode(values)


def test_bfloat16_round_is_a_new_array_for_an_empty_or_one_value() -> None:
    """Empty and one-value vectors, and the shape and type of what `bfloat16_round` gives."""
    for values in (np.zeros(0, np.float32), np.array([1 + 2**-8 + 2**-9], np.float32)):
        rounded = bfloat16_round(values)
        assert rounded.dtype == np.float32 and rounded.shape == values.shape
        assert rounded is not values
        _assert_bfloat16_is_ml_dtypes(values)
    assert bfloat16_encode(np.zeros(0, np.float32)) == b""


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bfloat16_encoder_names_the_position_of_a_nan_or_infinity(bad: float) -> None:
    """A NaN or infinity is the site's bug: a ValueError naming the tensor and the position."""
    values = np.zeros(10, np.float32)
    values[7] = bad
    with pytest.raises(ValueError, match=r"^tensor 'fc\.weight': value at position 7 is "):
        bfloat16_encode(values, name="fc.weight")


def test_bfloat16_encoder_refuses_a_value_that_rounds_to_infinity() -> None:
    """float32's largest values round past bfloat16's: refused, not sent as infinity."""
    values = np.array([1.0, F32_MAX], np.float32)
    with pytest.raises(ValueError, match=r"position 1 .* rounds past bfloat16's largest"):
        bfloat16_encode(values)


@pytest.mark.parametrize(
    "values",
    [np.zeros(3, np.float64), np.zeros((2, 2), np.float32), np.zeros(3, ">f4"), [1.0, 2.0]],
    ids=["float64", "2-D", "big-endian", "list"],
)
def test_encoders_take_1d_float32_only(values: npt.NDArray[np.generic]) -> None:
    """Another dtype or shape is the caller's bug, refused before anything is encoded."""
    for encode in (bfloat16_encode, int8_encode):
        with pytest.raises(ValueError, match="a lossy code encodes a 1-D float32 array"):
            encode(values)


def test_bfloat16_decoder_checks_the_length_first() -> None:
    """A payload of another length than 2 bytes a value is refused, saying both sizes."""
    with pytest.raises(
        CompressedFormatError,
        match=r"^bfloat16 payload of tensor 'w': 7 bytes where 4 values need 8$",
    ):
        bfloat16_decode(bytes(7), 4, name="w")


@pytest.mark.parametrize("word", [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF])
def test_bfloat16_decoder_refuses_nan_and_infinity(word: int) -> None:
    """No encoder sends a NaN or an infinity; a payload holding one is refused."""
    payload = struct.pack("<3H", 0x3F80, word, 0)
    with pytest.raises(CompressedFormatError, match="value at position 1 is a NaN or an infinity"):
        bfloat16_decode(payload, 3)


def test_decoders_need_a_count() -> None:
    """The count comes from the caller's own model: a negative one is the caller's bug."""
    for decode in (bfloat16_decode, int8_decode):
        with pytest.raises(ValueError, match="element count"):
            decode(b"", -1)


# -- int8 ------------------------------------------------------------------------------------


def test_int8_format_and_round_half_even() -> None:
    """Header, scale max|x| / 127 and codes round(x / scale) half to even, in the documented bytes."""
    values = np.array([127, 0.5, 1.5, 2.5, -2.5, -127, -0.5], np.float32)
    payload = int8_encode(values)
    header = struct.pack("<B3xI", 1, INT8_BLOCK)
    scale = struct.pack("<f", 1.0)
    codes = np.array([127, 0, 2, 2, -2, -127, 0], np.int8).tobytes()
    assert payload == header + scale + codes
    assert int8_decode(payload, values.size).tolist() == [127, 0, 2, 2, -2, -127, 0]


@pytest.mark.parametrize(("count", "block"), [(0, 256), (1, 256), (1000, 256), (1000, 7), (5, 1)])
def test_int8_round_trip_error_is_half_a_step(count: int, block: int) -> None:
    """Each value comes back within half its block's scale, and equals the plain reference."""
    rng = np.random.default_rng(count + block)
    values = (rng.standard_normal(count) * rng.uniform(0.01, 10)).astype(np.float32)
    payload = int8_encode(values, block=block)
    assert len(payload) == int8_size(count, block) == 8 + 4 * -(-count // block) + count
    decoded = int8_decode(payload, count)
    scales, codes = _reference_int8(values, block)
    assert decoded.tobytes() == (codes * np.repeat(scales, block)[:count]).tobytes()
    step = np.repeat(scales, block)[:count]
    assert np.all(np.abs(decoded - values) <= step / 2 * (1 + 1e-6))


def test_int8_chunks_agree_with_the_plain_reference() -> None:
    """Past one chunk of work, with a block that is not a power of two, the bytes are the plain
    block-at-a-time result."""
    count, block = 600_001, 1000
    values = (np.random.default_rng(3).standard_normal(count) * 0.02).astype(np.float32)
    payload = int8_encode(values, block=block)
    scales, codes = _reference_int8(values, block)
    assert payload == struct.pack("<B3xI", 1, block) + scales.tobytes() + codes.tobytes()


def test_int8_zero_and_tiny_blocks_have_scale_zero() -> None:
    """A block of zeros, or of values whose max / 127 underflows, has scale 0 and decodes to 0."""
    values = np.concatenate(
        [np.zeros(4, np.float32), _bits(1, 0x80000002, 0, 0), np.ones(4, np.float32)]
    )
    payload = int8_encode(values, block=4)
    scales = np.frombuffer(payload, "<f4", count=3, offset=8)
    assert scales.tolist() == [0.0, 0.0, np.float32(1) / np.float32(127)]
    assert int8_decode(payload, 12).tolist() == [0.0] * 8 + [1.0] * 4


def test_int8_payload_carries_its_block_size() -> None:
    """A payload made with another block size decodes alike: the decoder reads it from the header."""
    values = np.linspace(-3, 5, 300, dtype=np.float32)
    for block in (1, 64, 4096):
        payload = int8_encode(values, block=block)
        assert struct.unpack_from("<I", payload, 4) == (block,)
        scales, codes = _reference_int8(values, block)
        expected = codes * np.repeat(scales, block)[: values.size]
        assert int8_decode(payload, values.size).tobytes() == expected.tobytes()


def test_int8_encoder_refusals() -> None:
    """A NaN names its position; a value too near float32's largest, a bad block size: ValueError."""
    values = np.ones(600, np.float32)
    values[513] = np.nan
    with pytest.raises(ValueError, match="value at position 513 is nan"):
        int8_encode(values)
    with pytest.raises(ValueError, match=r"block 1 \(values from position 4\) .* too near"):
        int8_encode(np.array([1, 2, 3, 4, F32_MAX, 0], np.float32), block=4)
    for block in (0, -1, 1 << 25, 2.0, True):
        with pytest.raises(ValueError, match="int8 block size"):
            int8_encode(values[:10], block=block)  # type: ignore[arg-type]


def _int8_payload(scales: list[float], codes: list[int], block: int = 2, version: int = 1) -> bytes:
    """A hand-made int8 payload."""
    return (
        struct.pack("<B3xI", version, block)
        + np.array(scales, "<f4").tobytes()
        + np.array(codes, np.int8).tobytes()
    )


@pytest.mark.parametrize(
    ("payload", "count", "message"),
    [
        (b"\x01\x00\x00", 0, r"3 bytes, shorter than its 8-byte header"),
        (_int8_payload([1], [1, 1], version=2), 2, r"header 02000000 is not int8 format 1"),
        (b"\x01\x00\x01\x00" + struct.pack("<I", 2) + bytes(6), 2, r"header 01000100 is not"),
        (_int8_payload([1], [1, 1], block=0), 2, r"block size 0, not 1\.\.16777216"),
        (_int8_payload([1], [1, 1], block=1 << 25), 2, r"block size 33554432"),
        (_int8_payload([1], [1, 1, 1]), 2, r"15 bytes where 2 values in blocks of 2 need 14$"),
        (_int8_payload([1], [1]), 2, r"13 bytes where 2 values in blocks of 2 need 14$"),
        (_int8_payload([1, 1], [1, 1, 1]), 2, r"19 bytes where 2 values .* need 14$"),
        (_int8_payload([1, float("nan")], [1, 1, 1]), 3, r"scale of block 1 is nan"),
        (_int8_payload([float("inf")], [1, 1]), 2, r"scale of block 0 is inf"),
        (_int8_payload([-1.0], [1, 1]), 2, r"scale of block 0 is -1\.0"),
        (_int8_payload([-0.0], [1, 1]), 2, r"scale of block 0 is -0\.0"),
        (_int8_payload([F32_MAX / 100], [1, 1]), 2, r"127 times it a float32"),
        (_int8_payload([1], [1, -128]), 2, r"value at position 1 is -128"),
    ],
)
def test_int8_decoder_refuses(payload: bytes, count: int, message: str) -> None:
    """Each malformed payload is refused with what is wrong, before its values are decoded."""
    with pytest.raises(CompressedFormatError, match=f"^int8 payload of tensor 'w': .*{message}"):
        int8_decode(payload, count, name="w")


def test_int8_decoder_allocates_nothing_for_a_huge_claimed_count() -> None:
    """The count is the caller's; a payload sized for another count is refused by length."""
    with pytest.raises(
        CompressedFormatError,
        match=re.escape("14 bytes where 1073741824 values in blocks of 16777216 need 1073742088"),
    ):
        int8_decode(_int8_payload([1], [1, 1], block=1 << 24), 1 << 30)


def _decode_in_parts(payload: bytes, count: int, cuts: list[int]) -> npt.NDArray[np.float32]:
    """An int8 payload decoded as a receiver does while its chunks pass, cut at `cuts`."""
    layout = int8_layout(payload[:INT8_HEADER_BYTES], count, size=len(payload))
    scales = int8_scales(payload[INT8_HEADER_BYTES : layout.codes_start], layout)
    decoded = np.full(count, np.nan, np.float32)
    bounds = [layout.codes_start, *sorted(cuts), layout.size]
    for first, last in itertools.pairwise(bounds):
        start = first - layout.codes_start
        int8_dequantize(
            payload[first:last], scales, layout, start, out=decoded[start : start + last - first]
        )
    return decoded


def test_int8_decodes_a_part_at_a_time() -> None:
    """Parts cut anywhere, inside a block or on its edge, decode to the whole payload's values."""
    values = np.linspace(-5, 7, 1000, dtype=np.float32)
    payload = int8_encode(values, block=64)
    start = int8_layout(payload, 1000, size=len(payload)).codes_start
    cuts = [start + 1, start + 63, start + 64, start + 65, start + 500, start + 999]
    assert _decode_in_parts(payload, 1000, cuts).tobytes() == int8_decode(payload, 1000).tobytes()
    layout = int8_layout(payload, 1000, size=len(payload))
    scales = int8_scales(payload[INT8_HEADER_BYTES:start], layout)
    with pytest.raises(CompressedFormatError, match=r"'w': value at position 702 is -128"):
        int8_dequantize(b"\x01\x02\x80", scales, layout, 700, name="w")


def test_int8_parts_are_checked() -> None:
    """The layout checks the payload's whole size from its header; scales are checked as they
    come; a part outside the payload, or an `out` of another size, is the caller's bug."""
    payload = int8_encode(np.ones(10, np.float32), block=4)
    with pytest.raises(
        CompressedFormatError,
        match=r"^int8 payload of a tensor: 31 bytes where 10 values in blocks of 4 need 30$",
    ):
        int8_layout(payload[:8], 10, size=31)
    layout = int8_layout(payload[:8], 10, size=len(payload))
    assert (layout.blocks, layout.codes_start, layout.size) == (3, 20, 30)
    with pytest.raises(CompressedFormatError, match=r"8 bytes of scales where 3 blocks need 12"):
        int8_scales(payload[8:16], layout)
    scales = int8_scales(payload[8:20], layout)
    with pytest.raises(ValueError, match=r"values \[8, 11\) with 3 scales: not a part"):
        int8_dequantize(bytes(3), scales, layout, 8)
    with pytest.raises(ValueError, match=r"out is float32 \(3,\), not float32 \(2,\)"):
        int8_dequantize(bytes(2), scales, layout, 8, out=np.zeros(3, np.float32))


# -- fuzzing ---------------------------------------------------------------------------------


@FUZZ
@given(FINITE_F32, st.sampled_from([1, 3, 64, 256]))
@example(np.array([0.0, -0.0, 1e-45], np.float32), 2)
def test_fuzz_round_trips(values: npt.NDArray[np.float32], block: int) -> None:
    """Any finite array: bfloat16 is ml_dtypes' cast, int8 is within half a step and repeatable."""
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32).tobytes()
    assert bfloat16_decode(bfloat16_encode(values), values.size).tobytes() == expected
    assert bfloat16_round(values).tobytes() == expected
    payload = int8_encode(values, block=block)
    assert payload == int8_encode(values.copy(), block=block)
    decoded = int8_decode(payload, values.size)
    scales, _ = _reference_int8(values, block)
    step = np.repeat(scales, block)[: values.size].astype(np.float64)
    # Among subnormals a scale has few bits (or underflows to 0): a few hundred of the smallest.
    slack = 1e-42
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= step / 2 * (1 + 1e-6) + slack)


@FUZZ
@given(FINITE_F32, st.sampled_from([1, 3, 64]), st.lists(st.integers(0, 700), max_size=6))
def test_fuzz_int8_parts(values: npt.NDArray[np.float32], block: int, cuts: list[int]) -> None:
    """Cut anywhere, an int8 payload decodes part by part to the same bits as whole."""
    payload = int8_encode(values, block=block)
    layout = int8_layout(payload, values.size, size=len(payload))
    inside = [layout.codes_start + cut for cut in cuts if cut <= values.size]
    decoded = _decode_in_parts(payload, values.size, inside)
    assert decoded.tobytes() == int8_decode(payload, values.size).tobytes()


@FUZZ
@given(st.binary(max_size=80), st.integers(0, 80))
@example(_int8_payload([1], [1, 1]), 2)
@example(struct.pack("<B3xI", 1, 1) + b"\x00\x00\x80\x7f\x01", 1)
def test_fuzz_decoders_raise_only_their_refusal(payload: bytes, count: int) -> None:
    """Whatever the bytes, a decoder gives `count` float32 values or a CompressedFormatError."""
    for decode in (bfloat16_decode, int8_decode):
        try:
            decoded = decode(payload, count)
        except CompressedFormatError:
            continue
        assert decoded.dtype == np.float32 and decoded.shape == (count,)
        assert np.isfinite(decoded).all()
