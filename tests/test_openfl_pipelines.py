"""OpenFL 1.9's compression pipelines: OpenFL's own vectors decoded bit for bit, the rest refused by name."""

from __future__ import annotations

import gzip
import os
import re
import tracemalloc
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from foedus.compression.errors import CompressedFormatError, CompressedTooLargeError
from foedus.compression.openfl import (
    Metadata,
    Pipeline,
    UnsupportedPipelineError,
    decode_openfl_tensor,
    openfl_pipeline,
)

from openfl_vectors import GARBLED_BY_OPENFL, Vector, check_vector, load_vectors

VECTORS = load_vectors()
LOSSY = ("delta", "lossy_compressed", "trained")
LOSSLESS = ("compressed", "trained")
# OpenFL 1.9's shipped pipelines, and what each is recognised as (EdenPipeline needs PyTorch,
# which OpenFL's virtualenv has not: its messages are made by hand below, from its source).
RECOGNISED = {
    "NoCompressionPipeline": Pipeline.NO_COMPRESSION,
    "RandomShiftPipeline": Pipeline.RANDOM_SHIFT,
    "KCPipeline": Pipeline.KMEANS,
    "STCPipeline": Pipeline.SPARSE_TABLE,
    "SKCPipeline": Pipeline.SPARSE_TABLE,
}


def codes_payload(codes: Sequence[float]) -> bytes:
    """A table-coded pipeline's data: its codes as float32, gzipped as GZIPTransformer does."""
    return gzip.compress(np.asarray(codes, dtype="<f4").tobytes(), mtime=0)


def kmeans(
    table: Mapping[int, float], shape: Sequence[int] = (4,)
) -> tuple[tuple[str, ...], list[Metadata]]:
    """Tags and metadata of a KCPipeline message with `table`."""
    return LOSSY, [Metadata(int_to_float=table, int_list=shape), Metadata()]


def decode(
    tags: Sequence[str], metadata: Sequence[Metadata], data: bytes, count: int = 4
) -> np.ndarray:
    """Decode with a limit the values fit."""
    return decode_openfl_tensor(tags, metadata, data, count=count, limit=4 * count)


# -- OpenFL's own vectors -----------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=[vector.name for vector in VECTORS])
def test_vector_decodes_to_what_its_sender_meant(vector: Vector) -> None:
    """Each vector OpenFL encoded decodes to the values its pipeline sent, as OpenFL decodes them."""
    check_vector(vector)
    assert (
        decode_openfl_tensor(
            vector.tags, vector.metadata, vector.data, count=vector.count, limit=4 * vector.count
        ).tobytes()
        == vector.sent.tobytes()
    )  # the same bytes, the same bits


@pytest.mark.parametrize("vector", VECTORS, ids=[vector.name for vector in VECTORS])
def test_vector_is_recognised_as_its_pipeline(vector: Vector) -> None:
    """A lossy pipeline's delta is recognised as it; anything else it sends is NoCompression's."""
    expected = RECOGNISED[vector.pipeline] if "delta" in vector.tags else Pipeline.NO_COMPRESSION
    if vector.pipeline == "RandomShiftPipeline":  # lossless to OpenFL: it codes every tensor
        expected = Pipeline.RANDOM_SHIFT
    assert openfl_pipeline(vector.tags, vector.metadata) is expected


def test_vectors_cover_every_shipped_pipeline_but_eden() -> None:
    """The committed file has a delta of every pipeline OpenFL 1.9 ships, bar EdenPipeline."""
    with_delta = {vector.pipeline for vector in VECTORS if "delta" in vector.tags}
    assert with_delta == set(RECOGNISED)
    assert GARBLED_BY_OPENFL.issubset(vector.name for vector in VECTORS)


def test_random_shift_is_the_shifted_values_minus_the_shift() -> None:
    """RandomShift's data is value + shift, per position, in float32; the shift is subtracted."""
    values = np.array([1.5, -2.0, 0.25], np.float32)
    shift = np.array([10.0, -3.5, 19.75], np.float32)
    metadata = [
        Metadata(int_to_float=dict(enumerate(shift.tolist())), int_list=(3,)),
        Metadata(int_list=(3,)),
    ]
    decoded = decode(LOSSLESS, metadata, (values + shift).tobytes(), count=3)
    np.testing.assert_array_equal(decoded, values)


def test_table_codes_are_looked_up_not_replaced_in_turn() -> None:
    """Levels equal to later codes (1.0 for code 0, 3.0 for code 1) stay what was sent."""
    tags, metadata = kmeans({1: 3.0, 0: 1.0})
    decoded = decode(tags, metadata, codes_payload([0, 1, 0, 1]))
    np.testing.assert_array_equal(decoded, [1.0, 3.0, 1.0, 3.0])


# -- refused by name ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [  # EdenTransformer.forward above dim_threshold: seed, size, then a scale and size per slice
        [Metadata(int_to_float={0: 7.0, 1: 256.0, 2: 0.5, 3: 256.0}, int_list=(16, 16))],
        [Metadata(int_list=(16, 16))],  # at or below dim_threshold: raw float32, but unmarked
    ],
)
def test_eden_is_refused_by_name(metadata: list[Metadata]) -> None:
    """EdenPipeline's format depends on plan settings not in the message: refused, naming it."""
    with pytest.raises(UnsupportedPipelineError) as refused:
        decode(LOSSY, metadata, bytes(256 * 4), count=256)
    message = str(refused.value)
    assert message.startswith("OpenFL's EdenPipeline is refused: its bit width (n_bits)")
    assert "set compression_pipeline to NoCompressionPipeline in the collaborator's plan" in message


@pytest.mark.parametrize(
    ("tags", "metadata"),
    [
        (LOSSLESS, [Metadata(int_list=(4,))] * 3),
        (LOSSY, [Metadata(int_list=(4,))] * 4),
        (LOSSY, []),
        (LOSSLESS, []),
        (LOSSLESS, [Metadata(int_list=(4,), bool_list=(True,))]),
        (LOSSY, [Metadata(int_list=(4,), int_to_float={0: 1.0}), Metadata(int_list=(4,))]),
        (LOSSY, [Metadata(int_to_float={0: 1.0}), Metadata(int_to_float={0: 1.0}), Metadata()]),
        (LOSSLESS, [Metadata(int_list=(4,), int_to_float={0: 1.0})]),
    ],
)
def test_a_pipeline_not_shipped_is_refused(tags: tuple[str, ...], metadata: list[Metadata]) -> None:
    """A layout no shipped pipeline writes is refused as an unknown pipeline, with what to set."""
    with pytest.raises(
        UnsupportedPipelineError, match=re.escape("not one of OpenFL 1.9's shipped ones")
    ):
        decode(tags, metadata, bytes(16))


@pytest.mark.parametrize(
    "tags", [("trained",), (), ("compressed", "lossy_compressed"), ("lossy_decompressed",)]
)
def test_tags_must_say_which_path(tags: tuple[str, ...]) -> None:
    """Without exactly one of `compressed` and `lossy_compressed`, no pipeline made it."""
    with pytest.raises(CompressedFormatError, match="so no pipeline can have made it") as refused:
        decode(tags, [Metadata(int_list=(4,))], bytes(16))
    assert not isinstance(refused.value, UnsupportedPipelineError)


# -- hostile payloads ---------------------------------------------------------------------------

SHIFT = [
    Metadata(int_to_float={0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, int_list=(4,)),
    Metadata(int_list=(4,)),
]
SPARSE = [Metadata(int_list=(4,)), Metadata(int_to_float={0: -0.5, 1: 0.0, 2: 0.5}), Metadata()]


@pytest.mark.parametrize(
    ("tags", "metadata", "data", "message"),
    [
        (LOSSLESS, [Metadata(int_list=(4,))], bytes(15), "15 bytes where 4 float32 values need 16"),
        (LOSSLESS, [Metadata(int_list=(2, 3))], bytes(16), "shape (2, 3) holds 6 values where 4"),
        (LOSSLESS, [Metadata(int_list=(-4, -1))], bytes(16), "negative dimension"),
        (
            LOSSLESS,
            [Metadata(int_list=(4,))],
            np.array([0, 1, np.nan, 2], "<f4").tobytes(),
            "value nan at position 2 is NaN or infinite",
        ),
        (LOSSLESS, [SHIFT[0], Metadata(int_list=(2, 2))], bytes(16), "the shift's shape"),
        (
            LOSSLESS,
            [Metadata(int_to_float={0: 1.0, 1: 2.0}, int_list=(4,)), SHIFT[1]],
            bytes(16),
            "int_to_float has 2 entries where 4 are expected",
        ),
        (
            LOSSLESS,
            [Metadata(int_to_float={0: 1.0, 1: 2.0, 2: 3.0, 7: 4.0}, int_list=(4,)), SHIFT[1]],
            bytes(16),
            "int_to_float has no code 3",
        ),
        (
            LOSSLESS,
            [Metadata(int_to_float={0: 1.0, 1: np.inf, 2: 3.0, 3: 4.0}, int_list=(4,)), SHIFT[1]],
            bytes(16),
            "a shift in int_to_float is NaN or infinite",
        ),
        (
            LOSSLESS,
            [Metadata(int_to_float={0: -3e38, 1: 0.0, 2: 0.0, 3: 0.0}, int_list=(4,)), SHIFT[1]],
            np.array([3e38, 0, 0, 0], "<f4").tobytes(),
            "value inf at position 0",
        ),
        (LOSSY, SPARSE, codes_payload([0, 1, 3, 2]), "code 3.0 at position 2 is not a level"),
        (LOSSY, SPARSE, codes_payload([0, 1.5, 1, 2]), "code 1.5 at position 1"),
        (LOSSY, SPARSE, codes_payload([0, 1, -1, 2]), "code -1.0 at position 2"),
        (LOSSY, SPARSE, codes_payload([np.nan, 1, 1, 2]), "code nan at position 0"),
        (LOSSY, SPARSE, codes_payload([0, 1, 2]), "inflates to 12 bytes where the values need 16"),
        (LOSSY, SPARSE, codes_payload([0, 1, 2, 2])[:-5], "ends before its end (truncated)"),
        (LOSSY, SPARSE, codes_payload([0, 1, 2, 2]) + b"\0", "1 bytes after the gzip stream"),
        (LOSSY, SPARSE, codes_payload([0, 1]) + codes_payload([2, 2]), "after the gzip stream"),
        (LOSSY, SPARSE, zlib.compress(bytes(16)), "not a gzip stream"),
        (LOSSY, SPARSE, b"", "ends before its end"),
        (LOSSY, SPARSE, b"PK\x03\x04 a zip file, not gzip", "not a gzip stream"),
        (LOSSY, SPARSE, codes_payload([0, 1, 2, 2])[:10], "ends before its end"),  # header only
        (
            LOSSY,
            [SPARSE[0], Metadata(int_to_float={0: np.nan, 1: 0.0}), Metadata()],
            codes_payload([0, 1, 1, 1]),
            "a level in int_to_float is NaN or infinite",
        ),
        (
            LOSSY,
            [SPARSE[0], Metadata(int_to_float={0: 1e39, 1: 0.0}), Metadata()],
            codes_payload([0, 1, 1, 1]),
            "NaN or infinite in float32",
        ),
        (
            LOSSY,
            [SPARSE[0], Metadata(int_to_float=dict.fromkeys(range(5), 0.0)), Metadata()],
            codes_payload([0, 1, 1, 1]),
            "5 levels for 4 values",
        ),
        (
            LOSSY,
            [Metadata(int_to_float={0: 0.0, 2: 1.0}, int_list=(4,)), Metadata()],
            codes_payload([0, 1, 1, 1]),
            "int_to_float has no code 1",
        ),
    ],
)
def test_hostile_payload_is_refused(
    tags: tuple[str, ...], metadata: list[Metadata], data: bytes, message: str
) -> None:
    """Each malformed payload is refused as malformed, with a message that says what is wrong."""
    with pytest.raises(CompressedFormatError, match=re.escape(message)):
        decode(tags, metadata, data)


def test_payload_past_the_limit_is_refused_before_reading_it() -> None:
    """More values than the receiver's byte limit: RESOURCE_EXHAUSTED's error, data unread."""
    tags, metadata = kmeans({0: 1.0}, shape=(1000,))
    with pytest.raises(CompressedTooLargeError, match="1000 float32 values are 4000 bytes, over"):
        decode_openfl_tensor(tags, metadata, b"not even gzip", count=1000, limit=3999)


def test_gzip_bomb_is_refused_before_it_inflates() -> None:
    """A 64 MiB gzip bomb for 4 values is refused having inflated at most a few bytes of it."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    bomb = b"".join(deflater.compress(block) for _ in range(64)) + deflater.flush()
    assert len(bomb) < 1 << 17
    tracemalloc.start()
    try:
        with pytest.raises(CompressedTooLargeError, match="inflates past the 16 bytes"):
            decode(LOSSY, SPARSE, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse it"


def test_a_negative_count_is_the_callers_error() -> None:
    """The receiver's count comes from its own model: a negative one is a bug, not a refusal."""
    with pytest.raises(ValueError, match="count must be at least 0") as raised:
        decode_openfl_tensor(LOSSLESS, [Metadata(int_list=(4,))], bytes(16), count=-1, limit=64)
    assert not isinstance(raised.value, CompressedFormatError)


# -- fuzzed -------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=int(os.environ.get("FOEDUS_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FLOATS = st.floats(width=32) | st.floats()
TAGS = st.lists(st.sampled_from(["compressed", "lossy_compressed", "delta", "trained"]), max_size=3)


@st.composite
def entries(draw: st.DrawFn) -> Metadata:
    """A metadata entry: often as a pipeline writes one, sometimes not."""
    size = draw(st.integers(0, 6))
    keys = draw(st.sampled_from([list(range(size)), st.lists(st.integers(-3, 9), max_size=6)]))
    if not isinstance(keys, list):
        keys = draw(keys)
    return Metadata(
        int_to_float={key: draw(FLOATS) for key in keys} if draw(st.booleans()) else {},
        int_list=draw(st.lists(st.integers(-2, 6), max_size=3)),
        bool_list=draw(st.lists(st.booleans(), max_size=1)) if draw(st.integers(0, 9)) == 0 else (),
    )


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Raw float32 bytes, gzipped codes (valid or not), or anything."""
    values = draw(st.lists(st.integers(-1, 6).map(float) | st.floats(width=32), max_size=12))
    raw = np.asarray(values, dtype="<f4").tobytes()  # codes, mostly, or any float32
    kind = draw(st.sampled_from(["raw", "gzip", "cut", "any"]))
    if kind == "raw":
        return raw
    if kind == "gzip":
        return gzip.compress(raw, mtime=0)
    if kind == "cut":
        return gzip.compress(raw, mtime=0)[: draw(st.integers(0, 40))]
    return draw(st.binary(max_size=64))


Message = tuple[list[str], list[Metadata], bytes, int, int]


@st.composite
def any_messages(draw: st.DrawFn) -> Message:
    """Tags, metadata, data, count and limit drawn apart: mostly nonsense."""
    return (
        draw(TAGS),
        draw(st.lists(entries(), max_size=4)),
        draw(payloads()),
        draw(st.integers(0, 12)),
        draw(st.integers(0, 64)),
    )


@st.composite
def near_messages(draw: st.DrawFn) -> Message:
    """A message as a shipped pipeline writes it, then (often) one part of it changed."""
    shape = draw(st.lists(st.integers(0, 4), max_size=2))
    count = int(np.prod(shape))
    values = draw(st.lists(st.floats(-4, 4, width=32), min_size=count, max_size=count))
    raw = np.asarray(values, "<f4").tobytes()
    levels = draw(st.integers(min(count, 1), max(count, 1)))
    table = {code: draw(FLOATS) for code in range(levels)}
    codes = draw(st.lists(st.integers(0, max(levels - 1, 0)), min_size=count, max_size=count))
    coded = gzip.compress(np.asarray(codes, "<f4").tobytes(), mtime=0)
    pipeline = draw(st.sampled_from(["none", "shift", "kmeans", "sparse"]))
    if pipeline == "none":
        tags, metadata, data = LOSSLESS, [Metadata(int_list=shape)], raw
    elif pipeline == "shift":
        shift = Metadata(int_to_float=dict(enumerate(values)), int_list=shape)
        tags, metadata, data = LOSSLESS, [shift, Metadata(int_list=shape)], raw
    elif pipeline == "kmeans":
        tags, metadata, data = (
            LOSSY,
            [Metadata(int_to_float=table, int_list=shape), Metadata()],
            coded,
        )
    else:
        sparse = [Metadata(int_list=shape), Metadata(int_to_float=table), Metadata()]
        tags, metadata, data = LOSSY, sparse, coded
    limit = 4 * count
    change = draw(st.sampled_from(["none", "none", "data", "cut", "count", "limit", "entry"]))
    if change == "data":
        data = draw(payloads())
    elif change == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif change == "count":
        count = draw(st.integers(0, 20))
    elif change == "limit":
        limit = draw(st.integers(0, 64))
    elif change == "entry":
        metadata = list(metadata)
        metadata[draw(st.integers(0, len(metadata) - 1))] = draw(entries())
    return list(tags), metadata, data, count, limit


@FUZZ
@given(message=any_messages() | near_messages())
@example(  # a level of float64 past float32's range becomes infinite when cast
    message=(
        ["lossy_compressed"],
        [Metadata(int_to_float={0: 1e300}, int_list=[1]), Metadata()],
        gzip.compress(bytes(4), mtime=0),
        1,
        4,
    )
)
def test_any_message_decodes_or_is_refused_with_our_errors(message: Message) -> None:
    """Whatever the message, the decoder gives `count` finite float32 values or our refusal."""
    tags, metadata, data, count, limit = message
    try:
        values = decode_openfl_tensor(tags, metadata, data, count=count, limit=limit)
    except CompressedFormatError as refused:
        event(f"refused: {type(refused).__name__}")
        return
    event("decoded")
    assert values.dtype == np.float32
    assert values.shape == (count,)
    assert 4 * count <= limit
    assert np.isfinite(values).all()
