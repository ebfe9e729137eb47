"""Top-k: the k largest magnitudes, ties to the lowest position, positions as varint gaps, a decoder that trusts nothing."""

from __future__ import annotations

import os
import struct

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from foedus.compression.errors import CompressedFormatError
from foedus.compression.quantize import int8_decode, int8_encode
from foedus.compression.topk import (
    decode_gaps,
    encode_gaps,
    kept_count,
    largest,
    topk_decode,
    topk_encode,
)

FUZZ = settings(
    max_examples=int(os.environ.get("FOEDUS_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
HEADER = struct.Struct("<BBHQQ")
SMALL_F32 = hnp.arrays(
    np.float32,
    st.integers(0, 300),
    elements=st.floats(-4, 4, width=32) | st.sampled_from([0.0, 1.0, -1.0]),
)


def _reference(values: npt.NDArray[np.float32], k: int) -> list[int]:
    """The k largest magnitudes' positions by a full stable sort (ties: lowest position), sorted."""
    order = np.argsort(-np.abs(values.astype(np.float64)), kind="stable")
    return sorted(order[:k].tolist())


def _payload(
    gaps: bytes, values: bytes, *, k: int, index_bytes: int | None = None, code: int = 0
) -> bytes:
    """A hand-made topk payload."""
    size = len(gaps) if index_bytes is None else index_bytes
    return HEADER.pack(1, code, 0, k, size) + gaps + values


def _f32(*values: float) -> bytes:
    """float32 values, little-endian."""
    return np.array(values, "<f4").tobytes()


def test_keeps_the_largest_magnitudes_with_ties_to_the_lowest_position() -> None:
    """Signs do not matter, equal magnitudes go to the lowest positions first."""
    values = np.array([1, -5, 2, 5, -2, 2, 0, -2], np.float32)
    assert largest(values, 2).tolist() == [1, 3]
    assert largest(values, 3).tolist() == [1, 2, 3]  # 2 at position 2, before 4, 5 and 7
    assert largest(values, 5).tolist() == [1, 2, 3, 4, 5]
    assert largest(values, 8).tolist() == list(range(8))
    decoded = topk_decode(topk_encode(values, 0.375), 8)  # k = 3
    assert decoded.tolist() == [0, -5, 2, 5, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("count", "fraction", "k"),
    [(0, 0.5, 0), (1, 0.01, 1), (10, 0.01, 1), (1000, 0.01, 10), (1001, 0.01, 11), (7, 1.0, 7)],
)
def test_k_is_the_ceiling_of_fraction_times_count_at_least_one(
    count: int, fraction: float, k: int
) -> None:
    """k = ceil(fraction x n), at least 1 for a tensor that has values."""
    assert kept_count(count, fraction) == k
    values = np.arange(1, count + 1, dtype=np.float32)
    payload = topk_encode(values, fraction)
    assert HEADER.unpack_from(payload)[3] == k
    assert np.flatnonzero(topk_decode(payload, count)).tolist() == list(range(count - k, count))


def test_payload_format() -> None:
    """Header, gaps as LEB128 varints (first position itself), values: the documented bytes."""
    values = np.zeros(20_001, np.float32)
    values[[0, 5, 200, 20_000]] = [4, -3, 2, 1]
    values[[1, 2]] = 0.5
    payload = topk_encode(values, 4 / 20_001)
    gaps = bytes([0x00, 0x05, 0xC3, 0x01, 0xD8, 0x9A, 0x01])  # 0, 5, 195, 19800
    assert payload == _payload(gaps, _f32(4, -3, 2, 1), k=4)
    assert (
        topk_decode(payload, values.size).tobytes()
        == np.where(np.abs(values) >= 1, values, 0).tobytes()
    )


def test_int8_values() -> None:
    """With int8 values the kept values are an int8 payload of k values, decoded as int8 decodes."""
    values = (np.random.default_rng(5).standard_normal(10_000)).astype(np.float32)
    payload = topk_encode(values, 0.05, values_code="int8")
    k = kept_count(values.size, 0.05)
    positions = _reference(values, k)
    varints = encode_gaps(np.array(positions, np.int64))
    kept = int8_encode(values[positions])
    assert payload == _payload(varints, kept, k=k, code=1)
    decoded = topk_decode(payload, values.size)
    assert np.flatnonzero(decoded).tolist() == positions
    assert decoded[positions].tobytes() == int8_decode(kept, k).tobytes()


def test_varints_round_trip_across_widths() -> None:
    """Gaps of every varint width, up to the widest a count allows, come back exactly."""
    positions = np.array([0, 1, 128, 128 + 16384, 2**40, 2**62 + 5], np.int64)
    varints = np.frombuffer(encode_gaps(positions), np.uint8)
    assert decode_gaps(varints, positions.size, 2**62 + 6, "t").tolist() == positions.tolist()


def test_encoder_refusals() -> None:
    """NaN at its position, a fraction outside (0, 1], an unknown values code: ValueError."""
    values = np.ones(9, np.float32)
    values[4] = -np.inf
    with pytest.raises(ValueError, match=r"^tensor 'b': value at position 4 is -inf"):
        topk_encode(values, 0.5, name="b")
    for fraction in (0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="topk fraction"):
            topk_encode(np.ones(3, np.float32), fraction)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topk values code 'bfloat16': one of float32, int8"):
        topk_encode(np.ones(3, np.float32), 0.5, values_code="bfloat16")
    with pytest.raises(ValueError, match="1-D float32"):
        topk_encode(np.ones((3, 3), np.float32), 0.5)


@pytest.mark.parametrize(
    ("payload", "count", "message"),
    [
        (b"\x01\x00", 4, r"2 bytes, shorter than its 20-byte header"),
        (HEADER.pack(2, 0, 0, 1, 1) + b"\x00" + _f32(1), 4, r"header 02000000 is not topk"),
        (HEADER.pack(1, 2, 0, 1, 1) + b"\x00" + _f32(1), 4, r"header 01020000 is not topk"),
        (HEADER.pack(1, 0, 1, 1, 1) + b"\x00" + _f32(1), 4, r"header 01000100 is not topk"),
        (_payload(b"\x00" * 5, _f32(1, 1, 1, 1, 1), k=5), 4, r"keeps 5 values of a tensor of 4$"),
        (_payload(b"\x00", _f32(1), k=2**63), 4, r"keeps 9223372036854775808 values of a"),
        (_payload(b"", b"", k=0), 4, r"keeps no value of 4; an encoder keeps one"),
        (_payload(b"\x00", _f32(1, 1), k=2), 4, r"1 bytes of positions for 2 values kept of 4$"),
        (_payload(b"\x00\x01", _f32(1), k=1), 4, r"2 bytes of positions for 1 values kept of 4"),
        (_payload(b"\x00", b"", k=1, index_bytes=1), 4, r"21 bytes where 1 float32 values .* 25$"),
        (_payload(b"\x00", _f32(1, 2), k=1), 4, r"29 bytes where 1 float32 values and 1 bytes"),
        (_payload(b"\x01\x00", _f32(1, 1), k=2), 4, r"gap before position number 1 is 0: .*"),
        (
            _payload(b"\x04", _f32(1), k=1),
            4,
            r"a topk index out of range: 4 in a tensor of 4 values$",
        ),
        (_payload(b"\x01\x02\x01", _f32(1, 1, 1), k=3), 4, r"index out of range: 4 in a"),
        (_payload(b"\x81\x00", _f32(1), k=1), 200, r"varint with a trailing zero byte"),
        (
            _payload(b"\x80\x80\x80\x01\x00", _f32(1, 1), k=2),
            20_000,
            r"takes 4 bytes; .* at most 3 \(a topk index out of range\)$",
        ),
        (_payload(b"\x80\x80", _f32(1, 1), k=2), 20_000, r"hold 0 complete varints where .* 2$"),
        (_payload(b"\x00\x80", _f32(1, 1), k=2), 20_000, r"hold 1 complete varints where .* 2$"),
        (_payload(b"\x00\x01", _f32(1, float("nan")), k=2), 4, r"kept value number 1 is a NaN"),
        (_payload(b"\x00\x01", _f32(1, float("inf")), k=2), 4, r"kept value number 1 is a NaN"),
    ],
)
def test_decoder_refuses(payload: bytes, count: int, message: str) -> None:
    """Each malformed payload is refused with what is wrong in it."""
    with pytest.raises(CompressedFormatError, match=f"^topk payload of tensor 'u': .*{message}"):
        topk_decode(payload, count, name="u")


def test_decoder_refuses_indices_whose_sum_overflows() -> None:
    """Gaps that each fit the count but wrap around 2**64 together are refused, before the
    count's zeros are allocated (2**63 - 1 of them would not fit)."""
    count = 2**63 - 1
    gap = encode_gaps(np.array([2**62 + 2**61], np.int64))  # 9 bytes, the widest allowed
    payload = _payload(gap * 3, _f32(1, 1, 1), k=3)
    with pytest.raises(CompressedFormatError, match="topk indices out of range"):
        topk_decode(payload, count)


def test_int8_values_are_checked_as_int8() -> None:
    """A topk payload's int8 values are refused as any int8 payload, naming the tensor."""
    kept = int8_encode(np.ones(2, np.float32))[:-1]
    payload = _payload(b"\x00\x01", kept, k=2, code=1)
    with pytest.raises(CompressedFormatError, match=r"^int8 payload of tensor 'u \(topk values\)'"):
        topk_decode(payload, 4, name="u")


def test_decoding_is_deterministic() -> None:
    """The same values give the same bytes; the same bytes decode to the same bits."""
    values = (np.random.default_rng(8).standard_normal(50_000) * 0.01).astype(np.float32)
    for code in ("float32", "int8"):
        payload = topk_encode(values, 0.01, values_code=code)
        assert payload == topk_encode(values.copy(), 0.01, values_code=code)
        assert topk_decode(payload, values.size).tobytes() == (
            topk_decode(bytearray(payload), values.size).tobytes()
        )


# -- fuzzing ---------------------------------------------------------------------------------


@FUZZ
@given(SMALL_F32, st.floats(0.001, 1.0))
@example(np.array([0.0, -0.0, 0.0], np.float32), 0.5)
@example(np.array([1, 1, 1, 1], np.float32), 0.5)
def test_fuzz_selection_is_the_stable_sort_reference(
    values: npt.NDArray[np.float32], fraction: float
) -> None:
    """The positions kept are those a full stable sort by magnitude keeps, and float32 values
    come back exactly."""
    k = kept_count(values.size, fraction)
    assert largest(values, k).tolist() == _reference(values, k)
    decoded = topk_decode(topk_encode(values, fraction), values.size)
    expected = np.zeros_like(values)
    expected[_reference(values, k)] = values[_reference(values, k)]
    assert decoded.tobytes() == expected.tobytes()


@FUZZ
@given(st.binary(max_size=80), st.integers(0, 300))
@example(_payload(b"\x00\x01", _f32(1, 2), k=2), 4)
def test_fuzz_decoder_raises_only_its_refusal(payload: bytes, count: int) -> None:
    """Random bytes give `count` finite float32 values or a CompressedFormatError."""
    try:
        decoded = topk_decode(payload, count)
    except CompressedFormatError:
        return
    assert decoded.dtype == np.float32 and decoded.shape == (count,)
    assert np.isfinite(decoded).all()


@FUZZ
@given(st.data())
def test_fuzz_altered_payloads(data: st.DataObject) -> None:
    """A valid payload with a byte changed, cut or added decodes to `count` values or is refused."""
    values = data.draw(SMALL_F32.filter(lambda array: array.size > 0))
    code = data.draw(st.sampled_from(["float32", "int8"]))
    payload = bytearray(topk_encode(values, 0.1, values_code=code))
    how = data.draw(st.sampled_from(["change", "cut", "add"]))
    at = data.draw(st.integers(0, len(payload) - 1))
    if how == "change":
        payload[at] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del payload[at:]
    else:
        payload.insert(at, data.draw(st.integers(0, 255)))
    try:
        decoded = topk_decode(bytes(payload), values.size)
    except CompressedFormatError:
        return
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    assert np.isfinite(decoded).all()
