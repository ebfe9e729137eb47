"""Streams of chunks on the wire: cutting payloads into them, and reading them in place.

`SendLocalTaskResults` is a client stream: OpenFL serializes one whole `TaskResults`, cuts the
bytes into chunks of at most 2 MiB and sends each as `DataStream(size=len(chunk), npbytes=chunk)`
(`chunk_bytes`). foedus frames the same chunks around slices of the arrays instead
(`framed_chunks`), and the aggregator reads each chunk's payload in place (`parse_chunk`);
`chunk_payloads` checks each chunk's declared size and stops as soon as the total passes the
receiver's cap, so a hostile sender cannot make it read more. `GetAggregatedModel`'s data
chunks are read in place the same way (`parse_model_chunk`). Protobuf copies a large bytes
field into a message and again out of it on every read; the in-place readers fall back to it
for anything not framed as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from foedus.protos import aggregator_pb2, base_pb2
from foedus.refusals.errors import InvalidRequestError, LimitExceededError

CHUNK_BYTES = 2 * 1024 * 1024
# foedus clients declare their upload's size in this call metadata key (OpenFL's don't).
UPLOAD_BYTES_METADATA = "foedus-upload-bytes"
_LENGTH_DELIMITED = 2  # the wire type of bytes, strings and messages
_SIZE_KEY = bytes([base_pb2.DataStream.SIZE_FIELD_NUMBER << 3])  # a varint field's key
_NPBYTES_FIELD = base_pb2.DataStream.NPBYTES_FIELD_NUMBER
_NPBYTES_KEY = _NPBYTES_FIELD << 3 | _LENGTH_DELIMITED
_MODEL_DATA_KEY = aggregator_pb2.ModelChunk.DATA_FIELD_NUMBER << 3 | _LENGTH_DELIMITED


class StreamError(InvalidRequestError, ValueError):
    """A `DataStream` cannot be joined into the message it should carry."""


class StreamTooLargeError(StreamError, LimitExceededError):
    """A stream carries more bytes than the receiver accepts."""


def field_prefix(field_number: int, length: int) -> bytes:
    """The key and length that start a length-delimited field of `length` bytes.

    With it a message is written around bytes that stay where they are (an array's buffer, a
    cached chunk): the same bytes protobuf would serialize, without copying the payload into a
    message first.
    """
    return varint(field_number << 3 | _LENGTH_DELIMITED) + varint(length)


def varint(value: int) -> bytes:
    """`value` (not negative) as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError(f"varints here are not negative, got {value}")
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_bytes(payload: bytes, chunk_size: int = CHUNK_BYTES) -> Iterator[base_pb2.DataStream]:
    """Cut `payload` into `DataStream` chunks of at most `chunk_size` bytes, as OpenFL does."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    view = memoryview(payload)
    for start in range(0, len(view), chunk_size):
        piece = view[start : start + chunk_size]
        yield base_pb2.DataStream(size=len(piece), npbytes=piece.tobytes())


class MadeBytes(Protocol):
    """Bytes of a stream made as they are sent, the same bytes every time (a resend sends them
    again): a clipped update's values (`foedus.privacy.clipping.ClippedValues`), computed a chunk
    at a time into the chunks rather than into a second copy of the model first."""

    def __len__(self) -> int:
        """How many bytes there are."""
        ...

    def bytes_at(self, start: int, stop: int) -> bytes | memoryview:
        """Bytes [start, stop): valid until the caller has copied them."""
        ...


# One piece of a framed stream: bytes that are there, or bytes made as they are sent.
Part = bytes | memoryview | MadeBytes


def framed_chunks(parts: Sequence[Part], chunk_size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The serialized `DataStream` chunks of the bytes `parts` make end to end, as `chunk_bytes` cuts them.

    Each chunk is framed around slices of the parts (one copy of the payload, not the three of
    building and serializing a `DataStream`); a caller sends them with a pass-through serializer.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    pending: list[bytes | memoryview] = []
    filled = 0
    for part in parts:
        read = _reader(part)
        done, size = 0, len(part)
        while done < size:
            taken = min(chunk_size - filled, size - done)
            pending.append(read(done, done + taken))
            done += taken
            filled += taken
            if filled == chunk_size:
                yield _framed(pending, filled)
                pending, filled = [], 0
    if filled:
        yield _framed(pending, filled)


def joined(parts: Iterable[Part]) -> bytes:
    """The bytes `parts` make end to end, as one object (what the chunks carry, unframed)."""
    return b"".join(_reader(part)(0, len(part)) for part in parts)


def _reader(part: Part) -> Callable[[int, int], bytes | memoryview]:
    """Bytes [start, stop) of `part`: a view of the bytes that are there, or the bytes made."""
    if isinstance(part, bytes | memoryview):
        view = memoryview(part).cast("B")
        return lambda start, stop: view[start:stop]
    return part.bytes_at


def _framed(pieces: list[bytes | memoryview], size: int) -> bytes:
    """A serialized `DataStream(size=size, npbytes=b"".join(pieces))`."""
    return b"".join((_SIZE_KEY, varint(size), field_prefix(_NPBYTES_FIELD, size), *pieces))


class Chunk(Protocol):
    """What a receiver reads of a `DataStream` chunk: a `DataStream`, or a `FramedChunk`."""

    @property
    def size(self) -> int: ...

    @property
    def npbytes(self) -> bytes | memoryview: ...


@dataclass(frozen=True, slots=True)
class FramedChunk:
    """A `DataStream` chunk read in place: `npbytes` is a view of the message's own bytes."""

    size: int
    npbytes: memoryview


def parse_chunk(message: bytes) -> Chunk:
    """A serialized `DataStream`, read without copying its payload when it is framed as usual.

    Every serializer writes `size` (1) then `npbytes` (2), as `framed_chunks` does; such a
    message is read in place (protobuf would copy the payload twice: into the message, and out
    of it on every read of `npbytes`). Anything else is left to protobuf.
    """
    view = memoryview(message)
    if view[:1] == _SIZE_KEY:
        size, at = _read_varint(view, 1)
        payload = _last_field(view, at, _NPBYTES_KEY)
        if payload is not None:
            return FramedChunk(size, payload)
    return base_pb2.DataStream.FromString(message)


def parse_model_chunk(message: bytes) -> aggregator_pb2.ModelChunk | memoryview:
    """A serialized `ModelChunk`: its data in place (a view) when it carries only data, as foedus
    frames data chunks; otherwise the parsed message."""
    data = _last_field(memoryview(message), 0, _MODEL_DATA_KEY)
    return aggregator_pb2.ModelChunk.FromString(message) if data is None else data


def _last_field(view: memoryview, at: int, key: int) -> memoryview | None:
    """The value of the length-delimited field with `key` at `at`, if it runs exactly to the end.

    None for anything else (another field, a length that does not fit, `at` < 0 for a varint
    before it that did not read): the caller leaves such a message to protobuf.
    """
    if not 0 <= at < len(view) or view[at] != key:
        return None
    length, start = _read_varint(view, at + 1)
    if start < 0 or length != len(view) - start:
        return None
    return view[start:]


def _read_varint(view: memoryview, at: int) -> tuple[int, int]:
    """The varint at `at` and where it ends; (0, -1) when it is cut short or too long."""
    value = shift = 0
    for index in range(at, min(at + 10, len(view))):
        byte = view[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    return 0, -1


def chunk_payloads(chunks: Iterable[Chunk], *, max_bytes: int) -> Iterator[bytes | memoryview]:
    """The bytes of a stream's chunks, checking each chunk's declared size and the running total."""
    total = 0
    for index, chunk in enumerate(chunks):
        data = chunk.npbytes  # read once: every read of a bytes field is a fresh copy
        if chunk.size != len(data):
            raise StreamError(f"chunk {index} declares {chunk.size} bytes but carries {len(data)}")
        total += len(data)
        if total > max_bytes:
            raise StreamTooLargeError(
                f"stream passed the limit of {max_bytes} bytes at chunk {index}"
            )
        yield data


def task_results_to_chunks(
    results: aggregator_pb2.TaskResults, chunk_size: int = CHUNK_BYTES
) -> Iterator[base_pb2.DataStream]:
    """Serialize `results` and cut it into chunks for `SendLocalTaskResults`."""
    return chunk_bytes(results.SerializeToString(), chunk_size)


def declared_upload_bytes(
    metadata: Iterable[tuple[str, str | bytes]], *, max_bytes: int
) -> int | None:
    """The size a foedus client declared for its upload (None from OpenFL clients, which don't)."""
    values = [value for key, value in metadata if key == UPLOAD_BYTES_METADATA]
    if not values:
        return None
    text = values[-1].decode() if isinstance(values[-1], bytes) else values[-1]
    if not text.isdigit():
        raise StreamError(f"metadata {UPLOAD_BYTES_METADATA} must be a byte count, got {text!r}")
    declared = int(text)
    if declared > max_bytes:
        raise StreamTooLargeError(
            f"the upload declares {declared} bytes, over the limit of {max_bytes} bytes"
        )
    return declared
