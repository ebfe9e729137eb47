"""The global model streamed in the plan's `compression.download` code (issue #24), both sides.

The aggregator spools each tensor's payload a piece at a time (`coded_model_chunks`), the client
decodes it as the chunks arrive (`foedus.collaborator.decoding`), and under a lossy code the
aggregator's base for the sites' deltas is exactly what they decoded (`round_trip`). A real
server and the real client download a model in each code; what a hostile aggregator could
stream is refused by the client, naming the tensor; OpenFL's `GetAggregatedTensor` stays raw.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_encoded_model import mapped_from
from test_model_stream import client_for, header_chunk, large_model

from foedus.aggregator.encoded_model import EncodedModel, coded_model_chunks, model_chunks
from foedus.aggregator.records import Array
from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.errors import ResponseValidationError
from foedus.compression.codes import LOSSY_MIN_DIMENSIONS, Code, carried_code
from foedus.compression.download import SLICE_VALUES, LossyEncoder, round_trip
from foedus.compression.lossless import chunk_sizes, decompress_chunk
from foedus.compression.quantize import (
    INT8_BLOCK,
    INT8_HEADER_BYTES,
    bfloat16_decode,
    bfloat16_encode,
    int8_decode,
    int8_encode,
)
from foedus.pki.layout import CertsLayout
from foedus.plans import Plan
from foedus.plans.protections import lossy_download
from foedus.plans.schema import (
    CodeSettings,
    CompressionSettings,
    DifferentialPrivacySettings,
    SecureAggregationSettings,
)
from foedus.protos import aggregator_pb2
from foedus.protos.codec import coded_layout

from servers import make_federation, make_plan, running_aggregator
from test_plans import _document, _problems, _with

MIB = 1024 * 1024
DOWNLOAD_CODES = [code for code in Code if code.for_download and code is not Code.NONE]
LOSSY_DOWNLOADS = [Code.BFLOAT16, Code.INT8]
RNG = np.random.default_rng(24)
WEIGHT = RNG.standard_normal((3, 700)).astype(np.float32)  # 8 int8 blocks and a part of one


def coded_plan(plan: Plan, code: Code) -> Plan:
    """`plan` with `code` for the download (the loader refuses codes until the wire is whole)."""
    return dataclasses.replace(plan, compression=CompressionSettings(download=CodeSettings(code)))


def messages(name: str, array: Array, code: Code, chunk_bytes: int = 1000) -> list[bytes]:
    """`array`'s serialized model chunks in `code`, in small pieces."""
    return list(coded_model_chunks(name, array, 0, code, chunk_bytes))


def parsed(chunks: list[bytes]) -> tuple[aggregator_pb2.ModelChunk, bytes]:
    """The metadata chunk and the payload the other chunks carry, joined."""
    meta, *data = (aggregator_pb2.ModelChunk.FromString(chunk) for chunk in chunks)
    return meta, b"".join(chunk.data for chunk in data)


@pytest.fixture
def receiver(certs: CertsLayout) -> AggregatorGRPCClient:
    """A real client of the test plan, fed streams without a socket (it never connects)."""
    return client_for(certs, 1)


def assemble(receiver: AggregatorGRPCClient, chunks: list[aggregator_pb2.ModelChunk]) -> Array:
    """The tensor 'weight' the client assembles of a stream (after the aggregator's header)."""
    return receiver._assemble_model(iter([header_chunk(), *chunks]), ["weight"], 0)["weight"]


# -- the payload, a piece at a time ------------------------------------------------------------


@pytest.mark.parametrize("code", LOSSY_DOWNLOADS)
def test_a_payload_encoded_in_slices_is_the_whole_tensor_s(code: Code) -> None:
    """Slices of whole int8 blocks make the very payload the whole tensor makes at once, so the
    spool in bounded memory sends what `round_trip` decodes; only the last slice may be ragged."""
    values = WEIGHT.reshape(-1)
    encoder = LossyEncoder(code, name="weight")
    body = b"".join(
        encoder.encode(values[start : start + 2 * INT8_BLOCK])
        for start in range(0, values.size, 2 * INT8_BLOCK)
    )
    whole = bfloat16_encode(values) if code is Code.BFLOAT16 else int8_encode(values)
    assert encoder.head() + body == whole
    ragged = LossyEncoder(code)
    ragged.encode(values[:100])
    with pytest.raises(ValueError, match="last slice"):
        ragged.encode(values[100:])
    empty = LossyEncoder(code)
    assert empty.head() == (b"" if code is Code.BFLOAT16 else int8_encode(values[:0]))


def bfloat16_encode_decoded(array: Array) -> bytes:
    """The bytes of decode(encode(array)) under bfloat16: what a site decodes."""
    values = array.reshape(-1)
    return bfloat16_decode(bfloat16_encode(values), values.size).tobytes()


def test_round_trip_is_what_decoding_the_whole_payload_gives() -> None:
    """decode(encode(x)) bit for bit, over several of its own slices; the array itself where
    nothing is lost (lossless, none, other dtypes) or where the code cannot carry a value."""
    values = RNG.standard_normal(SLICE_VALUES + 3 * INT8_BLOCK + 5).astype(np.float32)
    tensor = values.reshape(1, -1)
    int8 = round_trip(Code.INT8, tensor)
    assert int8.shape == tensor.shape and int8.dtype == np.float32
    assert int8.tobytes() == int8_decode(int8_encode(values), values.size).tobytes()
    bf16 = round_trip(Code.BFLOAT16, tensor)
    assert bf16.shape == tensor.shape and bf16.dtype == np.float32
    assert bf16.tobytes() == bfloat16_encode_decoded(tensor)
    assert not np.array_equal(int8, tensor) and not np.array_equal(bf16, tensor)
    for code in (Code.NONE, Code.LOSSLESS):
        assert round_trip(code, tensor) is tensor
    steps = np.arange(5, dtype=np.float64)
    assert round_trip(Code.INT8, steps) is steps
    diverged = np.array([[1.0, np.nan]], dtype=np.float32)  # 2-D: a vector travels raw anyway
    for code in LOSSY_DOWNLOADS:
        assert round_trip(code, diverged) is diverged
    past = np.array([[1.0], [-3.4e38]], dtype=np.float32)  # rounds past bfloat16's largest
    assert round_trip(Code.BFLOAT16, past) is past
    assert round_trip(Code.BFLOAT16, past / 2).tobytes() == bfloat16_encode_decoded(past / 2)
    assert [carried_code(Code.INT8, np.dtype(t), 2) for t in ("<f4", "<f8", "<i8")] == [
        Code.INT8,
        Code.NONE,
        Code.NONE,
    ]
    assert carried_code(Code.LOSSLESS, np.dtype("<i8"), 1) is Code.LOSSLESS
    vector = LOSSY_MIN_DIMENSIONS - 1  # a bias, a normalisation layer's statistics: raw
    assert carried_code(Code.INT8, np.dtype("<f4"), vector) is Code.NONE
    assert carried_code(Code.LOSSLESS, np.dtype("<f4"), vector) is Code.LOSSLESS


@pytest.mark.parametrize("code", DOWNLOAD_CODES)
def test_the_spool_carries_the_coded_tensor_and_its_payload(code: Code, tmp_path: Path) -> None:
    """Metadata first (the coded layout, the payload's size), then the payload in pieces of at
    most the chunk size; the same bytes whether the tensor is in memory or mapped from a file."""
    chunks = messages("weight", WEIGHT, code)
    assert chunks == messages("weight", mapped_from(tmp_path, WEIGHT), code)
    meta, payload = parsed(chunks)
    layout = coded_layout(meta.tensor, max_bytes=MIB)
    assert (layout.code, layout.delta, layout.shape) == (code, False, WEIGHT.shape)
    assert meta.tensor.round_number == 0 and meta.data_size == len(payload)
    assert all(len(chunk) <= 1000 + 8 for chunk in chunks[1:])
    values = WEIGHT.reshape(-1)
    if code is Code.LOSSLESS:
        assert decompress_all(payload, WEIGHT.tobytes()) == WEIGHT.tobytes()
    elif code is Code.INT8:
        assert payload == int8_encode(values)
    else:
        assert payload == bfloat16_encode(values)


def decompress_all(payload: bytes, raw: bytes) -> bytes:
    """The raw bytes of a lossless payload of `raw`'s size, chunk by chunk."""
    out, at = b"", 0
    for size in chunk_sizes(len(raw), 4):
        length = struct.unpack_from("<i", payload, at + 12)[0]  # the chunk's compressed bytes
        out += decompress_chunk(payload[at : at + length], expected_bytes=size, itemsize=4)
        at += length
    assert at == len(payload)
    return out


def test_a_tensor_the_lossy_code_cannot_carry_goes_raw(caplog: pytest.LogCaptureFixture) -> None:
    """A NaN (a plan may allow it) in a tensor under int8: sent raw, as `round_trip` says the
    site gets it, with a warning naming the tensor."""
    diverged = np.array([1.0, np.inf, 2.0], dtype=np.float32)
    assert messages("w", diverged, Code.INT8) == list(model_chunks("w", diverged, 0, 1000))
    assert "tensor 'w' of round 0 travels raw, not int8" in caplog.text


def test_the_base_is_round_trip_computed_once_a_round() -> None:
    """Under a lossy download the aggregator's base for a delta is the decoded model, kept for
    the round; without one it is the global tensor itself."""
    encoded = EncodedModel(download=Code.INT8)
    base = encoded.base(3, "weight", WEIGHT)
    assert base.tobytes() == round_trip(Code.INT8, WEIGHT).tobytes()
    assert encoded.base(3, "weight", WEIGHT) is base and not base.flags.writeable
    steps = np.arange(3)
    assert encoded.base(3, "steps", steps) is steps
    assert encoded.base(4, "weight", WEIGHT) is not base  # a new round's
    assert EncodedModel(download=Code.LOSSLESS).base(3, "weight", WEIGHT) is WEIGHT


# -- a real server, the real client --------------------------------------------------------------


@pytest.mark.parametrize("code", DOWNLOAD_CODES)
def test_the_client_downloads_the_model_in_each_code(certs: CertsLayout, code: Code) -> None:
    """Over real mutual TLS: lossless gives the same bytes, bfloat16 and int8 exactly the values
    `round_trip` gives (the aggregator's base), other dtypes raw; the stream's tensors carry the
    code; `GetAggregatedTensor` (OpenFL's) stays raw."""
    plan = coded_plan(make_plan(certs, limits={"max_message_bytes": MIB}), code)
    model = large_model()
    with (
        running_aggregator(plan, make_federation(plan, model)) as server,
        client_for(certs, server.port) as client,
    ):
        fetched = client.get_aggregated_model([], 0)
        assert sorted(fetched) == sorted(model)
        for name, array in model.items():
            expected = round_trip(code, array)
            got = fetched[name]
            assert (got.dtype, got.shape, got.tobytes()) == (
                expected.dtype,
                expected.shape,
                expected.tobytes(),
            ), name
            assert not got.flags.writeable
            served = server.servicer.federation.global_tensor(name, 0)
            encoded = server.servicer._encoded
            assert encoded.base(0, name, served).tobytes() == expected.tobytes()
            meta = aggregator_pb2.ModelChunk.FromString(next(iter(encoded.chunks(0, name, served))))
            assert (meta.tensor.foedus_code or "none") == carried_code(
                code, array.dtype, array.ndim
            )
        raw = client.get_aggregated_tensor("dense/weight", 0)
        assert raw.tobytes() == model["dense/weight"].tobytes()
    if code.lossy:
        assert not np.array_equal(fetched["large"], model["large"])


# -- a hostile aggregator's streams --------------------------------------------------------------


def chunks_of(
    code: Code, array: Array = WEIGHT, chunk_bytes: int = 1000
) -> list[aggregator_pb2.ModelChunk]:
    """The honest stream of `array` in `code`, as messages."""
    return [
        aggregator_pb2.ModelChunk.FromString(c)
        for c in messages("weight", array, code, chunk_bytes)
    ]


def data(payload: bytes, size: int = 1000) -> list[aggregator_pb2.ModelChunk]:
    """`payload` as data chunks of `size` bytes."""
    return [
        aggregator_pb2.ModelChunk(data=payload[start : start + size])
        for start in range(0, len(payload), size)
    ]


def with_payload(
    code: Code, change: Callable[[bytearray], bytes | bytearray], **meta: object
) -> list[aggregator_pb2.ModelChunk]:
    """The honest stream of `WEIGHT` in `code`, its payload changed, its metadata's fields set."""
    first, *rest = chunks_of(code)
    payload = bytearray(b"".join(chunk.data for chunk in rest))
    head = aggregator_pb2.ModelChunk()
    head.CopyFrom(first)
    for field, value in meta.items():
        if field == "data_size":
            head.data_size = value  # type: ignore[assignment]
        else:
            setattr(head.tensor, field, value)
    changed = bytes(change(payload))
    if "data_size" not in meta:
        head.data_size = len(changed)
    return [head, *data(changed)]


@pytest.mark.parametrize("code", DOWNLOAD_CODES)
@pytest.mark.parametrize("size", [1, 3, 7, 4096])
def test_any_cut_of_an_honest_stream_decodes_the_same(
    receiver: AggregatorGRPCClient, code: Code, size: int
) -> None:
    """The payload cut anywhere (a byte at a time, mid-value, mid-chunk) decodes to the same
    tensor, read-only."""
    first, *rest = chunks_of(code)
    payload = b"".join(chunk.data for chunk in rest)
    tensor = assemble(receiver, [first, *data(payload, size)])
    assert tensor.tobytes() == round_trip(code, WEIGHT).tobytes()
    assert not tensor.flags.writeable


@pytest.mark.parametrize("code", DOWNLOAD_CODES)
@pytest.mark.parametrize(
    "array",
    [np.zeros((0, 5), np.float32), np.array(2.5, np.float32), np.zeros(300, np.float32)],
    ids=["empty", "scalar", "zeros"],
)
def test_empty_scalar_and_zero_tensors_travel_in_each_code(
    receiver: AggregatorGRPCClient, code: Code, array: Array
) -> None:
    """The edges of every code: no values (an int8 payload is then its header alone), a
    0-d tensor, a block of zeros (int8's scale 0)."""
    first, *rest = chunks_of(code, array)
    tensor = assemble(receiver, [first, *rest])
    assert (tensor.shape, tensor.tobytes()) == (array.shape, round_trip(code, array).tobytes())


def _lossless_inflating(payload: bytearray) -> bytearray:
    """The first chunk's header declares one more raw byte than its place holds."""
    struct.pack_into("<i", payload, 4, struct.unpack_from("<i", payload, 4)[0] + 4)
    return payload


def _int8_nan_scale(payload: bytearray) -> bytearray:
    struct.pack_into("<f", payload, INT8_HEADER_BYTES, float("nan"))
    return payload


def _int8_minus_128(payload: bytearray) -> bytearray:
    payload[-1] = 0x80
    return payload


def _bfloat16_nan(payload: bytearray) -> bytearray:
    payload[0:2] = b"\xc0\x7f"
    return payload


@pytest.mark.parametrize(
    ("chunks", "fragment"),
    [
        (with_payload(Code.LOSSLESS, lambda p: p + b"x"), "past its 1 chunks"),
        (with_payload(Code.LOSSLESS, lambda p: p[:-1]), "ended after 0 of"),
        (with_payload(Code.LOSSLESS, lambda p: p, data_size=10**9), "more than its 1 lossless"),
        (with_payload(Code.LOSSLESS, _lossless_inflating), "refused before it is inflated"),
        (with_payload(Code.INT8, lambda p: p + b"x"), "int8 payload of tensor 'weight'"),
        (with_payload(Code.INT8, lambda p: p[:-1]), "int8 payload of tensor 'weight'"),
        (with_payload(Code.INT8, lambda p: p[:5]), "shorter than its 8-byte header"),
        (with_payload(Code.INT8, _int8_nan_scale), "scale of block 0"),
        (with_payload(Code.INT8, _int8_minus_128), "-128"),
        (with_payload(Code.BFLOAT16, lambda p: p + b"xy"), "bfloat16's 2100 values are 4200"),
        (with_payload(Code.BFLOAT16, lambda p: p)[:-1], "sent 4000 of the 4200 bytes of 'weight'"),
        (with_payload(Code.BFLOAT16, _bfloat16_nan), "NaN or an infinity"),
        (with_payload(Code.INT8, lambda p: p, foedus_delta=True), "'weight' is a delta"),
        (with_payload(Code.INT8, lambda p: p, foedus_code="topk"), "for uploads only"),
        (with_payload(Code.INT8, lambda p: p, foedus_code="gzip"), "unknown code 'gzip'"),
        (with_payload(Code.INT8, lambda p: p, foedus_dtype="<f8"), "int8 codes float32"),
        (
            with_payload(Code.LOSSLESS, lambda p: p, data_size=4),
            "more data for 'weight' than the 4 bytes",
        ),
        (with_payload(Code.INT8, lambda p: p)[:-1], "of the 2144 bytes of 'weight'"),
    ],
)
def test_the_client_refuses_a_bad_coded_stream(
    receiver: AggregatorGRPCClient, chunks: list[aggregator_pb2.ModelChunk], fragment: str
) -> None:
    """Too long, too short, inflating past its place, values no encoder makes, a delta, a code
    or a dtype a download never has: `ResponseValidationError` naming the tensor, before more
    is allocated than the tensor's own array."""
    with pytest.raises(ResponseValidationError, match=fragment) as refused:
        assemble(receiver, chunks)
    assert "weight" in str(refused.value)


def test_the_client_bounds_a_coded_tensor_by_its_decoded_size(certs: CertsLayout) -> None:
    """A coded tensor over max_tensor_bytes decoded is refused before any allocation, whatever
    its payload's size."""
    client = client_for(certs, 1, max_tensor_bytes=1024)
    stream = [header_chunk(), *chunks_of(Code.INT8)]
    with pytest.raises(ResponseValidationError, match="over the limit of 1024 bytes"):
        client._assemble_model(iter(stream), [], 0)


# -- the plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", LOSSY_DOWNLOADS)
def test_a_lossy_download_is_refused_beside_privacy_and_secure_aggregation(code: Code) -> None:
    """Their clipping and masks are computed against the global model while the sites would
    train on the decoded one: refused at start, one line naming the key; lossless passes."""
    private = _with(
        _document(),
        ("differential_privacy.enabled", True),
        ("differential_privacy.clip", 1.0),
        ("differential_privacy.noise_multiplier", 1.0),
        ("compression.download", code.value),
    )
    assert _problems(private) == [
        f"compression.download: {code} with differential_privacy.enabled is not possible yet: "
        "their clipping and masks are computed against the global model, and the sites would "
        "train on the decoded one; choose lossless or none"
    ]
    both = lossy_download(
        CompressionSettings(download=CodeSettings(code)),
        DifferentialPrivacySettings(enabled=True),
        SecureAggregationSettings(enabled=True),
    )
    assert len(both) == 1
    assert both[0].startswith(
        f"compression.download: {code} with differential_privacy.enabled and "
        "secure_aggregation.enabled is not possible yet"
    )
    for download in (Code.NONE, Code.LOSSLESS):
        chosen = CompressionSettings(download=CodeSettings(download))
        on = DifferentialPrivacySettings(enabled=True), SecureAggregationSettings(enabled=True)
        assert lossy_download(chosen, *on) == []
    alone = CompressionSettings(download=CodeSettings(code))
    assert lossy_download(alone, DifferentialPrivacySettings(), SecureAggregationSettings()) == []
