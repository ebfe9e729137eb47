"""The tensor codec: OpenFL's float32 encoding, foedus's exact dtypes, and a decoder that trusts nothing."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import numpy.typing as npt
import pytest

from foedus.compression.codes import Code
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import (
    COMPRESSED_TAG,
    EXACT_DTYPES,
    LOSSY_TAG,
    MAX_DIMENSIONS,
    TensorFormatError,
    TensorTooLargeError,
    all_finite,
    coded_layout,
    coded_tensor_frame,
    decode_tensor,
    encode_tensor,
    encode_tensor_meta_into,
    tensor_bytes,
    tensor_field_frame,
)
from foedus.protos.dtypes import bfloat16_dtype

MAX_BYTES = 1 << 20


def _sample(dtype: str, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> npt.NDArray[np.generic]:
    """A deterministic array of `dtype` that uses the type's whole range."""
    rng = np.random.default_rng(seed)
    kind = np.dtype(dtype).kind
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(size=shape) * 100).astype(dtype)


def _tensor(
    shape: tuple[int, ...] | None = (2, 2),
    data: bytes = bytes(16),
    *,
    dtype: str = "",
    tags: tuple[str, ...] = (COMPRESSED_TAG,),
) -> base_pb2.NamedTensor:
    """A hand-made NamedTensor; `shape=None` leaves out the transformer metadata."""
    metadata = [] if shape is None else [base_pb2.MetadataProto(int_list=shape)]
    return base_pb2.NamedTensor(
        name="t",
        lossless=True,
        tags=tags,
        transformer_metadata=metadata,
        data_bytes=data,
        foedus_dtype=dtype,
    )


def _random_shift() -> base_pb2.NamedTensor:
    """A tensor as OpenFL's RandomShiftPipeline sends it: value + shift, the shift in the metadata."""
    tensor = _tensor((2, 2), bytes(16))
    tensor.transformer_metadata[0].int_to_float.update({0: 1.0, 1: -2.0, 2: 3.5, 3: 19.0})
    tensor.transformer_metadata.add().int_list.extend([2, 2])
    return tensor


# --- OpenFL's float32 encoding ------------------------------------------------------------------


def test_float32_uses_openfl_encoding() -> None:
    """A float32 array is sent exactly as OpenFL sends it: no foedus dtype, shape, LE C-order bytes."""
    array = _sample("float32", (2, 3, 4))
    tensor = encode_tensor("conv1.weight", array, round_number=7, tags=["model"], report=True)
    assert tensor.name == "conv1.weight"
    assert tensor.round_number == 7
    assert tensor.report is True
    assert tensor.lossless is True
    assert tensor.foedus_dtype == ""
    assert list(tensor.tags) == ["compressed", "model"]
    assert len(tensor.transformer_metadata) == 1
    assert list(tensor.transformer_metadata[0].int_list) == [2, 3, 4]
    assert tensor.data_bytes == np.asarray(array, "<f4").tobytes()
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded, array)


def test_float32_puts_no_foedus_field_on_the_wire() -> None:
    """A float32 tensor serializes without the extension field, so it is byte-for-byte OpenFL's."""
    tensor = encode_tensor("w", _sample("float32"))
    assert "foedus_dtype" not in {field.name for field, _ in tensor.ListFields()}


def test_openfl_made_tensor_decodes_as_float32() -> None:
    """A tensor built the way an OpenFL peer builds it (no extension field) decodes as float32."""
    array = np.array([[1.5, -2.0], [0.0, 3.25]], dtype="<f4")
    tensor = base_pb2.NamedTensor(
        name="w",
        round_number=1,
        lossless=True,
        tags=["compressed", "model", "trained"],
        transformer_metadata=[base_pb2.MetadataProto(int_list=[2, 2])],
        data_bytes=array.tobytes(),
    )
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded, array)


# --- exact dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "wire_dtype"),
    [
        ("float64", "<f8"),
        ("float16", "<f2"),
        ("int64", "<i8"),
        ("int32", "<i4"),
        ("int16", "<i2"),
        ("int8", "|i1"),
        ("uint64", "<u8"),
        ("uint32", "<u4"),
        ("uint16", "<u2"),
        ("uint8", "|u1"),
        ("bool", "|b1"),
    ],
)
def test_exact_dtype_round_trip(dtype: str, wire_dtype: str) -> None:
    """Every non-float32 dtype travels exactly, marked by its little-endian dtype string."""
    array = _sample(dtype)
    tensor = encode_tensor("x", array)
    assert tensor.foedus_dtype == wire_dtype
    assert wire_dtype in EXACT_DTYPES
    assert list(tensor.transformer_metadata[0].int_list) == [3, 4]
    assert tensor.data_bytes == np.asarray(array, np.dtype(wire_dtype)).tobytes()
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.dtype == np.dtype(wire_dtype)
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "bool"])
def test_scalar_has_empty_shape(dtype: str) -> None:
    """A 0-d array is sent with an empty `int_list` and comes back 0-d."""
    value = _sample(dtype, ())
    tensor = encode_tensor("loss", value, tags=["metric"])
    assert list(tensor.transformer_metadata[0].int_list) == []
    assert len(tensor.data_bytes) == np.dtype(dtype).itemsize
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.shape == ()
    assert decoded == value


def test_metric_scalar_is_four_bytes_of_float32() -> None:
    """A Python float sent with `as_float32` is OpenFL's metric: a float32 scalar of 4 bytes."""
    tensor = encode_tensor("acc", 0.75, tags=["metric", "validate_local"], as_float32=True)
    assert tensor.foedus_dtype == ""
    assert tensor.data_bytes == np.float32(0.75).tobytes()
    assert list(tensor.transformer_metadata[0].int_list) == []
    decoded = decode_tensor(tensor, max_bytes=4)
    assert decoded.shape == ()
    assert decoded == np.float32(0.75)


def test_scalar_decodes_from_empty_shape() -> None:
    """A scalar the OpenFL way (empty `int_list`, 4 bytes) decodes to a 0-d float32 array."""
    decoded = decode_tensor(_tensor((), np.float32(0.5).tobytes()), max_bytes=4)
    assert decoded.shape == ()
    assert decoded.dtype == np.dtype("<f4")
    assert decoded == np.float32(0.5)


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8"])
def test_empty_array_round_trip(dtype: str) -> None:
    """An array of shape (0, 3) is sent as zero bytes and keeps its shape."""
    tensor = encode_tensor("empty", np.zeros((0, 3), dtype=dtype))
    assert tensor.data_bytes == b""
    assert list(tensor.transformer_metadata[0].int_list) == [0, 3]
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.shape == (0, 3)
    assert decoded.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_non_contiguous_input_is_sent_in_c_order(dtype: str) -> None:
    """A transposed view is sent as its C-order copy and decodes to the same values."""
    array = np.arange(12, dtype=dtype).reshape(3, 4).T
    assert not array.flags.c_contiguous
    tensor = encode_tensor("t", array)
    assert list(tensor.transformer_metadata[0].int_list) == [4, 3]
    assert (
        tensor.data_bytes
        == np.ascontiguousarray(array, np.dtype(dtype).newbyteorder("<")).tobytes()
    )
    np.testing.assert_array_equal(decode_tensor(tensor, max_bytes=MAX_BYTES), array)


@pytest.mark.parametrize(
    ("dtype", "wire_dtype"), [(">f8", "<f8"), (">f4", ""), (">i4", "<i4"), (">u2", "<u2")]
)
def test_big_endian_input_is_sent_little_endian(dtype: str, wire_dtype: str) -> None:
    """A big-endian array is converted to little-endian and decodes to the same values."""
    array = (np.arange(6).reshape(2, 3) * 1000 + 1).astype(dtype)
    tensor = encode_tensor("t", array)
    assert tensor.foedus_dtype == wire_dtype
    assert tensor.data_bytes == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.dtype.byteorder in "<|="
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("dtype", ["float64", "float16", "int64", "uint8", "bool", ">f8"])
def test_as_float32_casts(dtype: str) -> None:
    """`as_float32=True` casts to OpenFL's float32 encoding (no foedus dtype)."""
    array = _sample(dtype)
    tensor = encode_tensor("t", array, as_float32=True)
    assert tensor.foedus_dtype == ""
    assert tensor.data_bytes == array.astype("<f4").tobytes()
    decoded = decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert decoded.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded, array.astype("<f4"))


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ((), ["compressed"]),
        (["model"], ["compressed", "model"]),
        (["trained", "model", "trained", "compressed"], ["compressed", "model", "trained"]),
        (iter(["validate_local", "metric", "metric"]), ["compressed", "metric", "validate_local"]),
    ],
)
def test_tags_sorted_and_deduplicated(tags: list[str], expected: list[str]) -> None:
    """Tags are sorted, de-duplicated, and always include `compressed`."""
    assert list(encode_tensor("t", np.zeros(1, "f4"), tags=tags).tags) == expected


def test_decoded_array_is_read_only_view() -> None:
    """The decoded array is a read-only view over the message's bytes, not a copy."""
    decoded = decode_tensor(encode_tensor("t", _sample("float64")), max_bytes=MAX_BYTES)
    assert not decoded.flags.writeable
    assert not decoded.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        decoded[0, 0] = 1.0


@pytest.mark.parametrize("dtype", ["float32", "int64", ">f8"])
def test_metadata_and_bytes_are_encode(dtype: str) -> None:
    """The metadata and the array's bytes, as streams and files send them, are encode_tensor."""
    array = _sample(dtype)
    tensor = base_pb2.NamedTensor()
    data = encode_tensor_meta_into(tensor, "t", array, round_number=3, tags=["b", "a"], report=True)
    assert not tensor.data_bytes
    tensor.data_bytes = bytes(tensor_bytes(data))
    assert tensor == encode_tensor("t", array, round_number=3, tags=["b", "a"], report=True)


def test_metadata_refuses_before_writing() -> None:
    """An unsendable array leaves the target message untouched."""
    target = base_pb2.NamedTensor()
    with pytest.raises(TensorFormatError, match="cannot be sent"):
        encode_tensor_meta_into(target, "bad", np.array(["a"]))
    assert target.ByteSize() == 0


# --- what encode refuses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.array(["a", "bc"]), id="str"),
        pytest.param(np.array([b"x"]), id="bytes"),
        pytest.param(np.array([object(), 1], dtype=object), id="object"),
        pytest.param(np.array([1.0], dtype=object), id="object-of-floats"),
        pytest.param(np.array([1 + 2j]), id="complex"),
        pytest.param(np.array(["2020-01-01"], dtype="datetime64[D]"), id="datetime"),
        pytest.param(np.zeros(2, dtype=[("a", "<f4")]), id="structured"),
    ],
)
def test_encode_refuses_unsendable_dtypes(array: npt.NDArray[np.generic]) -> None:
    """Object, string and other non-numeric dtypes are refused, naming the dtype."""
    with pytest.raises(TensorFormatError, match=r"tensor 'bad': dtype .* cannot be sent"):
        encode_tensor("bad", array)


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(np.array(["1.5", "2"]), id="numeric-str"),
        pytest.param(np.array(["a"]), id="str"),
        pytest.param(np.array([object()], dtype=object), id="object"),
        pytest.param(np.array([1 + 2j]), id="complex"),
    ],
)
def test_encode_as_float32_refuses_non_numeric(array: npt.NDArray[np.generic]) -> None:
    """Asking for float32 does not turn strings, objects or complex numbers into floats."""
    with pytest.raises(TensorFormatError, match="cannot be sent"):
        encode_tensor("bad", array, as_float32=True)


# --- what decode refuses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        pytest.param(_tensor((2, 2), bytes(15)), "needs 16 bytes, got 15", id="too-few-bytes"),
        pytest.param(_tensor((2, 2), bytes(17)), "needs 16 bytes, got 17", id="too-many-bytes"),
        pytest.param(_tensor((), b""), "needs 4 bytes, got 0", id="scalar-without-bytes"),
        pytest.param(_tensor((0, 3), bytes(4)), "needs 0 bytes, got 4", id="empty-with-bytes"),
        pytest.param(
            _tensor((2, 2), bytes(16), dtype="<f8"), "needs 32 bytes, got 16", id="dtype-itemsize"
        ),
        pytest.param(_tensor((2, -2), bytes(16)), "negative dimension", id="negative-dim"),
        pytest.param(_tensor((-1, -4), bytes(16)), "negative dimension", id="two-negatives"),
        pytest.param(_tensor((1,) * (MAX_DIMENSIONS + 1), bytes(4)), "33 dimensions", id="33-dims"),
        pytest.param(_tensor(dtype="object"), "unknown dtype 'object'", id="dtype-object"),
        pytest.param(_tensor(dtype="<U4"), "unknown dtype '<U4'", id="dtype-str"),
        pytest.param(_tensor(dtype="garbage"), "unknown dtype 'garbage'", id="dtype-garbage"),
        pytest.param(_tensor(dtype=">f4"), "unknown dtype '>f4'", id="dtype-big-endian"),
        pytest.param(_tensor(dtype="|V4"), "unknown dtype", id="dtype-void"),
        pytest.param(_tensor(None), "no transformer metadata", id="no-metadata"),
        pytest.param(
            _tensor(tags=(LOSSY_TAG,)), "lossy-compressed tensors are not supported", id="lossy"
        ),
        pytest.param(
            _tensor(tags=(COMPRESSED_TAG, LOSSY_TAG)), "lossy-compressed", id="lossy-and-compressed"
        ),
        pytest.param(_random_shift(), "2 transformer metadata entries", id="random-shift"),
    ],
)
def test_decode_rejects_malformed(tensor: base_pb2.NamedTensor, message: str) -> None:
    """A malformed tensor raises exactly TensorFormatError, naming the tensor and the problem."""
    with pytest.raises(TensorFormatError, match=f"^tensor 't': .*{re.escape(message)}") as caught:
        decode_tensor(tensor, max_bytes=MAX_BYTES)
    assert caught.type is TensorFormatError


def test_decode_accepts_the_most_dimensions() -> None:
    """Exactly MAX_DIMENSIONS dimensions are accepted."""
    decoded = decode_tensor(_tensor((1,) * MAX_DIMENSIONS, bytes(4)), max_bytes=MAX_BYTES)
    assert decoded.ndim == MAX_DIMENSIONS


@pytest.mark.parametrize(("max_bytes", "too_large"), [(15, True), (16, False)])
def test_max_bytes_is_inclusive(max_bytes: int, too_large: bool) -> None:
    """A tensor of exactly `max_bytes` is accepted; one byte over is TensorTooLargeError."""
    tensor = _tensor((4,), bytes(16))
    if too_large:
        with pytest.raises(TensorTooLargeError, match="16 bytes, over the limit of 15 bytes"):
            decode_tensor(tensor, max_bytes=max_bytes)
    else:
        assert decode_tensor(tensor, max_bytes=max_bytes).shape == (4,)


def test_too_large_is_a_format_error() -> None:
    """Callers that catch TensorFormatError also catch TensorTooLargeError."""
    assert issubclass(TensorTooLargeError, TensorFormatError)


@pytest.mark.parametrize("dtype", ["", "<f8", "|b1"])
def test_huge_claimed_shape_is_refused_before_allocating(dtype: str) -> None:
    """A tiny tensor claiming shape (2**31-1, 2**31-1) is TooLarge at once, not a MemoryError."""
    tensor = _tensor((2**31 - 1, 2**31 - 1), bytes(4), dtype=dtype)
    start = time.perf_counter()
    with pytest.raises(TensorTooLargeError, match="over the limit"):
        decode_tensor(tensor, max_bytes=2**40)
    assert time.perf_counter() - start < 1.0


def test_size_limit_is_checked_before_byte_count() -> None:
    """An oversized claim is reported as too large even though its bytes do not match either."""
    with pytest.raises(TensorTooLargeError):
        decode_tensor(_tensor((1024, 1024), bytes(4)), max_bytes=1024)


@pytest.mark.parametrize(
    "shape",
    [(0, 2**31 - 1, 2**31 - 1), (0, 2**31 - 1, 2**31 - 1, 2**31 - 1), (2**31 - 1,) * 5 + (0,)],
)
def test_zero_size_shape_numpy_cannot_represent_is_a_format_error(shape: tuple[int, ...]) -> None:
    """A zero-size shape whose other dimensions overflow numpy is a TensorFormatError."""
    with pytest.raises(TensorFormatError):
        decode_tensor(_tensor(shape, b""), max_bytes=MAX_BYTES)


# --- bounded deterministic fuzz ---------------------------------------------------------------------

FUZZ_CASES = 2000
FUZZ_MAX_BYTES = 4096
FUZZ_DTYPES = [
    *[""] * 4,
    *sorted(EXACT_DTYPES),
    ">f8",
    "f8",
    "<b1",
    "float32",
    "object",
    "O",
    "|O",
    "<U4",
    "|S4",
    "|V4",
    "<M8[ns]",
    "<c16",
    "garbage",
    "\x00",
    "ü",
]
FUZZ_TAGS = [COMPRESSED_TAG, COMPRESSED_TAG, LOSSY_TAG, "model", "trained", "metric", ""]


def _fuzz_tensor(rng: np.random.Generator, dims: list[int]) -> base_pb2.NamedTensor:
    """One random tensor: random dtype string, shape from `dims`, tags and (often wrong) bytes."""
    dtype = FUZZ_DTYPES[rng.integers(len(FUZZ_DTYPES))]
    ndim = int(rng.choice([0, 1, 1, 2, 2, 3, 4, 8, 32, 33, 40]))
    shape = [int(rng.choice(dims)) for _ in range(ndim)]
    tags = [FUZZ_TAGS[i] for i in rng.integers(len(FUZZ_TAGS), size=rng.integers(0, 4))]
    itemsize = np.dtype(dtype or "<f4").itemsize if dtype in EXACT_DTYPES | {""} else 4
    expected = math.prod(shape) * itemsize
    if rng.random() < 0.6 and 0 <= expected <= FUZZ_MAX_BYTES and min(shape, default=0) >= 0:
        length = expected
    else:
        length = int(rng.integers(0, 64))
    metadata = [base_pb2.MetadataProto(int_list=shape) for _ in range(rng.choice([0, 1, 1, 1, 2]))]
    return base_pb2.NamedTensor(
        name=f"fuzz{ndim}",
        lossless=bool(rng.integers(2)),
        tags=tags,
        transformer_metadata=metadata,
        data_bytes=rng.bytes(length),
        foedus_dtype=dtype,
    )


@pytest.mark.parametrize(
    ("seed", "dims"),
    [
        pytest.param(
            1, [-(2**31), -1, 1, 1, 1, 2, 2, 3, 5, 7, 2**16, 2**31 - 1], id="no-zero-dims"
        ),
        pytest.param(
            2,
            [-1, 0, 0, 1, 1, 2, 3, 2**31 - 1],
            id="with-zero-dims",
        ),
    ],
)
def test_decode_fuzz_gives_an_array_or_a_format_error(seed: int, dims: list[int]) -> None:
    """2,000 random tensors decode to a consistent array or raise TensorFormatError, nothing else."""
    rng = np.random.default_rng(seed)
    decoded = refused = 0
    unexpected: list[str] = []
    for index in range(FUZZ_CASES):
        tensor = _fuzz_tensor(rng, dims)
        try:
            array = decode_tensor(tensor, max_bytes=FUZZ_MAX_BYTES)
        except TensorFormatError:
            refused += 1
            continue
        except Exception as error:  # any other exception is the failure this test looks for
            shape = (
                list(tensor.transformer_metadata[0].int_list)
                if tensor.transformer_metadata
                else None
            )
            unexpected.append(f"case {index}: {shape} {tensor.foedus_dtype!r}: {error!r}")
            continue
        decoded += 1
        assert array.shape == tuple(tensor.transformer_metadata[0].int_list)
        assert array.nbytes == len(tensor.data_bytes)
        assert not array.flags.writeable
    assert not unexpected, "\n".join(unexpected[:10])
    # Both outcomes must be well exercised, or the fuzz tests nothing.
    assert decoded > FUZZ_CASES // 40 and refused > FUZZ_CASES // 2, (decoded, refused)


@pytest.mark.parametrize(
    "array",
    [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(7, np.int64), np.zeros(0, np.float64)],
)
def test_tensor_field_frame_is_the_serialized_field(array: np.ndarray) -> None:
    """A tensor framed around its array's buffer is byte for byte what protobuf would serialize."""
    frame = tensor_field_frame(5, "t", array, round_number=2, tags=["trained"], report=True)
    parts = frame.parts()
    expected = aggregator_pb2.TaskResults(
        tensors=[encode_tensor("t", array, round_number=2, tags=["trained"], report=True)]
    ).SerializeToString(deterministic=True)
    assert b"".join(parts) == expected
    if array.size:
        assert any(isinstance(part, memoryview) and part.obj is not None for part in parts)


@pytest.mark.parametrize(
    ("code", "dtype", "tag"),
    [
        (Code.INT8, "<f4", LOSSY_TAG),
        (Code.TOPK, "<f4", LOSSY_TAG),
        (Code.LOSSLESS, "<i8", COMPRESSED_TAG),
    ],
)
def test_a_coded_tensor_is_its_payload_and_the_decoded_layout(
    code: Code, dtype: str, tag: str
) -> None:
    """A coded tensor framed around its payload parses as protobuf would serialize it: the
    payload as data_bytes, the decoded dtype and shape, its code and delta flag after the data
    (with foedus_dtype), OpenFL's tag for what it is; `coded_layout` reads it back, and it is
    never read as raw values."""
    payload = bytes(range(7))
    frame = coded_tensor_frame(
        5,
        "w",
        payload,
        dtype=np.dtype(dtype),
        shape=(3, 4),
        code=code,
        delta=True,
        round_number=2,
        tags=["trained"],
    )
    sent = aggregator_pb2.TaskResults.FromString(b"".join(frame.parts())).tensors[0]
    assert sent.data_bytes == payload and sent.lossless == (not code.lossy)
    assert list(sent.tags) == sorted({"trained", tag}) and sent.round_number == 2
    assert b"".join(frame.parts()) == aggregator_pb2.TaskResults(tensors=[sent]).SerializeToString(
        deterministic=True
    )
    layout = coded_layout(sent, max_bytes=MAX_BYTES)
    assert (layout.dtype, layout.shape, layout.code, layout.delta) == (
        np.dtype(dtype),
        (3, 4),
        code,
        True,
    )
    assert layout.nbytes == 12 * np.dtype(dtype).itemsize and layout.count == 12
    with pytest.raises(TensorFormatError, match=f"coded '{code}' .compression., which is not read"):
        decode_tensor(sent, max_bytes=MAX_BYTES)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"foedus_code": "zstd"},
            "unknown code 'zstd'; expected one of lossless, bfloat16, int8, topk",
        ),
        ({"foedus_code": "none"}, "unknown code 'none'"),
        ({"foedus_code": "int8", "foedus_dtype": "<f8"}, "int8 codes float32 values, not float64"),
        (
            {"foedus_code": "lossless", "shape": (1 << 20,)},
            "shape (1048576,) of float32 is 4194304 bytes decoded",
        ),
        ({"foedus_code": "lossless", "extra": True}, "2 transformer metadata entries"),
    ],
)
def test_a_coded_tensors_metadata_is_checked(fields: dict[str, object], message: str) -> None:
    """An unknown code (or none spelt out), a lossy code on other values than float32, a decoded
    size past the limit, a second metadata entry: refused, the tensor named."""
    tensor = base_pb2.NamedTensor(name="w", foedus_code=str(fields["foedus_code"]))
    tensor.foedus_dtype = str(fields.get("foedus_dtype", ""))
    tensor.transformer_metadata.add().int_list.extend(fields.get("shape", (2, 2)))  # type: ignore[arg-type]
    if fields.get("extra"):
        tensor.transformer_metadata.add()
    with pytest.raises(TensorFormatError, match=f"tensor 'w': {re.escape(message)}"):
        coded_layout(tensor, max_bytes=MAX_BYTES)


@pytest.mark.parametrize(
    ("array", "finite"),
    [
        (np.array([1.0, 2.0], dtype=np.float32), True),
        (np.array([1.0, np.nan], dtype=np.float32), False),
        (np.array([[np.inf]], dtype=np.float64), False),
        (np.array([-np.inf, 1.0], dtype=np.float16), False),
        (np.full(4, 60000.0, dtype=np.float16), True),  # the sum overflows; every value is finite
        (np.array([1 + 2j, complex(0, np.nan)], dtype=np.complex64), False),
        (np.array([2**62, 2**62], dtype=np.int64), True),
        (np.array([True, False]), True),
        (np.array(np.nan, dtype=np.float32), False),
        (np.array([1.0, np.nan], dtype=bfloat16_dtype()), False),
        (np.array([1.0, -np.inf], dtype=bfloat16_dtype()), False),
        (np.array([1.0, 2.5], dtype=bfloat16_dtype()), True),
    ],
)
def test_all_finite_finds_nan_and_infinities_only(array: np.ndarray, finite: bool) -> None:
    """NaN and infinities anywhere are found; an overflowing sum of finite values is not one."""
    assert all_finite(array) is finite
