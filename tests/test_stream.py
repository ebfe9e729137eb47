"""Cutting a serialized TaskResults into DataStream chunks and joining it back within a cap."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import encode_tensor
from foedus.protos.stream import (
    CHUNK_BYTES,
    StreamError,
    StreamTooLargeError,
    chunk_bytes,
    chunk_payloads,
    framed_chunks,
    joined,
    parse_chunk,
    parse_model_chunk,
)

MIB = 1024 * 1024


def _payload(size: int) -> bytes:
    """`size` deterministic, non-repeating-looking bytes."""
    return np.random.default_rng(size).bytes(size)


def _task_results(*, tensor_elements: int = 1000) -> aggregator_pb2.TaskResults:
    """A TaskResults like a collaborator's `train` result, with a float32 and a float64 tensor."""
    return aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(
            sender="alice", receiver="aggregator", federation_uuid="fed-1"
        ),
        round_number=3,
        task_name="train",
        data_size=640,
        tensors=[
            encode_tensor(
                "dense.weight",
                np.arange(tensor_elements, dtype=np.float32),
                round_number=3,
                tags=["trained"],
            ),
            encode_tensor("dense.bias", np.linspace(-1, 1, 7), round_number=3, tags=["trained"]),
        ],
    )


class _CountingStream:
    """An iterator over chunks that counts how many the consumer pulled."""

    def __init__(self, chunks: list[base_pb2.DataStream]) -> None:
        self.chunks = chunks
        self.pulled = 0

    def __iter__(self) -> Iterator[base_pb2.DataStream]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


def test_default_chunk_size_is_2_mib() -> None:
    """OpenFL's chunk size: 2 MiB."""
    assert CHUNK_BYTES == 2 * MIB


def test_five_mib_payload_cuts_into_2_2_1_mib() -> None:
    """A 5 MiB payload becomes three chunks of 2, 2 and 1 MiB, each declaring its own size."""
    payload = _payload(5 * MIB)
    chunks = list(chunk_bytes(payload))
    assert [len(chunk.npbytes) for chunk in chunks] == [2 * MIB, 2 * MIB, MIB]
    assert all(chunk.size == len(chunk.npbytes) for chunk in chunks)
    assert b"".join(chunk.npbytes for chunk in chunks) == payload


@pytest.mark.parametrize(
    ("length", "chunk_size", "sizes"),
    [
        (10, 3, [3, 3, 3, 1]),
        (9, 3, [3, 3, 3]),
        (1, 5, [1]),
        (5, 5, [5]),
        (6, 5, [5, 1]),
        (4, 1, [1, 1, 1, 1]),
        (0, 5, []),
    ],
)
def test_custom_chunk_size(length: int, chunk_size: int, sizes: list[int]) -> None:
    """A custom chunk size cuts at that size, the last chunk holding the rest."""
    payload = _payload(length)
    chunks = list(chunk_bytes(payload, chunk_size))
    assert [chunk.size for chunk in chunks] == sizes
    assert [len(chunk.npbytes) for chunk in chunks] == sizes
    assert b"".join(chunk.npbytes for chunk in chunks) == payload


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_chunk_size_must_be_positive(chunk_size: int) -> None:
    """A chunk size of zero or less is a ValueError, not an endless or empty stream."""
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        list(chunk_bytes(b"abc", chunk_size))


@pytest.mark.parametrize(("length", "chunk_size"), [(1, 1), (100, 7), (5 * MIB + 3, CHUNK_BYTES)])
def test_payloads_reassemble_exactly(length: int, chunk_size: int) -> None:
    """The chunks' payloads give back the payload byte for byte, even at exactly the cap."""
    payload = _payload(length)
    assert b"".join(chunk_payloads(chunk_bytes(payload, chunk_size), max_bytes=length)) == payload


def test_thousand_tiny_chunks_join() -> None:
    """A stream of 1,000 one-byte chunks gives the 1,000-byte payload."""
    payload = _payload(1000)
    stream = _CountingStream(list(chunk_bytes(payload, 1)))
    assert b"".join(chunk_payloads(stream, max_bytes=1000)) == payload
    assert stream.pulled == 1000


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        pytest.param(
            [base_pb2.DataStream(size=4, npbytes=b"abc")],
            "chunk 0 declares 4 bytes but carries 3",
            id="declares-more",
        ),
        pytest.param(
            [base_pb2.DataStream(size=2, npbytes=b"abc")],
            "chunk 0 declares 2 bytes but carries 3",
            id="declares-less",
        ),
        pytest.param(
            [base_pb2.DataStream(size=3, npbytes=b"abc"), base_pb2.DataStream(npbytes=b"de")],
            "chunk 1 declares 0 bytes but carries 2",
            id="second-chunk-size-missing",
        ),
    ],
)
def test_chunk_size_mismatch_is_an_error(chunks: list[base_pb2.DataStream], message: str) -> None:
    """A chunk whose `size` differs from its byte count is a StreamError naming the chunk."""
    with pytest.raises(StreamError, match=message) as caught:
        list(chunk_payloads(chunks, max_bytes=MIB))
    assert caught.type is StreamError


@pytest.mark.parametrize(
    ("max_bytes", "passing_chunk"), [(9, 0), (10, 1), (25, 2), (29, 2), (30, 3), (99, 9)]
)
def test_cap_stops_reading_at_the_chunk_that_passes_it(max_bytes: int, passing_chunk: int) -> None:
    """Over `max_bytes` is StreamTooLargeError, raised without pulling another chunk."""
    stream = _CountingStream(list(chunk_bytes(_payload(100), 10)))
    with pytest.raises(
        StreamTooLargeError, match=f"limit of {max_bytes} bytes at chunk {passing_chunk}$"
    ):
        list(chunk_payloads(stream, max_bytes=max_bytes))
    assert stream.pulled == passing_chunk + 1


@pytest.mark.parametrize("chunk_size", [1, 3, 1000, 4096])
def test_framed_chunks_are_the_chunks_chunk_bytes_serializes(chunk_size: int) -> None:
    """Framing the parts in place gives the very bytes of DataStream messages, cut the same way."""
    payload = bytes(range(256)) * 10
    parts = [payload[:1], memoryview(payload)[1:999], b"", payload[999:]]
    framed = list(framed_chunks(parts, chunk_size))
    assert framed == [chunk.SerializeToString() for chunk in chunk_bytes(payload, chunk_size)]
    parsed = map(base_pb2.DataStream.FromString, framed)
    assert b"".join(chunk_payloads(parsed, max_bytes=MIB)) == payload


class _Made:
    """Bytes made as they are asked for (`MadeBytes`), counting what was made."""

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self.made = 0

    def __len__(self) -> int:
        return len(self._payload)

    def bytes_at(self, start: int, stop: int) -> bytes:
        self.made += stop - start
        return self._payload[start:stop]


@pytest.mark.parametrize("chunk_size", [1, 3, 1000, 4096])
def test_framed_chunks_frame_made_bytes_as_they_frame_bytes(chunk_size: int) -> None:
    """A part whose bytes are made as they are sent is framed as its bytes would be, each byte
    made once per framing (a resend frames, and makes, them again)."""
    payload = bytes(range(256)) * 10
    made = _Made(payload[5:2000])
    parts = [payload[:5], made, memoryview(payload)[2000:]]
    framed = list(framed_chunks(parts, chunk_size))
    assert framed == [chunk.SerializeToString() for chunk in chunk_bytes(payload, chunk_size)]
    assert made.made == len(made)
    assert list(framed_chunks(parts, chunk_size)) == framed
    assert made.made == 2 * len(made)
    assert joined(parts) == payload


@pytest.mark.parametrize(
    "message",
    [
        base_pb2.DataStream(size=5, npbytes=b"hello").SerializeToString(),
        base_pb2.DataStream(size=3, npbytes=b"hello").SerializeToString(),  # a lying size
        base_pb2.DataStream(size=300, npbytes=bytes(300)).SerializeToString(),
        base_pb2.DataStream(npbytes=b"no size").SerializeToString(),
        base_pb2.DataStream(size=4).SerializeToString(),
        b"\x12\x02hi\x08\x02",  # fields in the other order
        b"\x08\x02\x12\x02hi\x12\x01!",  # npbytes twice: the last wins
        b"\x08\x02\x12\x05hi",  # a length past the end: protobuf's error
        b"",
    ],
)
def test_parse_chunk_reads_what_protobuf_reads(message: bytes) -> None:
    """In place when framed as usual, by protobuf otherwise: the same size and payload either way."""
    try:
        expected = base_pb2.DataStream.FromString(message)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_chunk(message)
        return
    chunk = parse_chunk(message)
    assert (chunk.size, bytes(chunk.npbytes)) == (expected.size, expected.npbytes)


def test_parse_chunk_does_not_copy_the_payload() -> None:
    message = base_pb2.DataStream(size=MIB, npbytes=bytes(MIB)).SerializeToString()
    chunk = parse_chunk(message)
    assert isinstance(chunk.npbytes, memoryview) and chunk.npbytes.obj is message


def test_parse_model_chunk_reads_data_chunks_in_place() -> None:
    """A data-only ModelChunk comes as a view of its data; any other as the parsed message."""
    data = aggregator_pb2.ModelChunk(data=bytes(range(200))).SerializeToString()
    view = parse_model_chunk(data)
    assert isinstance(view, memoryview) and view.obj is data and bytes(view) == bytes(range(200))
    for other in (
        aggregator_pb2.ModelChunk(data_size=3, data=b"abc"),
        aggregator_pb2.ModelChunk(header=aggregator_pb2.MessageHeader(sender="a")),
        aggregator_pb2.ModelChunk(),
    ):
        assert parse_model_chunk(other.SerializeToString()) == other
