"""Reading a serialized TaskResults as it arrives: events that rebuild it exactly, or a clear error."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.results_reader import (
    Event,
    Head,
    ResultsFormatError,
    ResultsReader,
    TensorData,
    TensorEnd,
    TensorStart,
)
from foedus.protos.stream import StreamError

MIB = 1024 * 1024
INT32 = st.integers(-(2**31), 2**31 - 1)


# -- helpers ------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """`value` as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    """A field's key."""
    return varint(field << 3 | wire_type)


def delimited(field: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return key(field, 2) + varint(len(payload)) + payload


def cut(payload: bytes, at: Iterable[int]) -> list[bytes]:
    """`payload` cut at the positions `at` (any order, repeats give empty chunks)."""
    points = [0, *sorted(at), len(payload)]
    return [payload[start:end] for start, end in itertools.pairwise(points)]


def read(chunks: Iterable[bytes | bytearray | memoryview], **limits: int) -> list[Event]:
    """Every event of feeding `chunks` to a new reader, then finishing it."""
    reader = ResultsReader(**limits)
    events: list[Event] = []
    fed = 0
    for chunk in chunks:
        events += reader.feed(chunk)
        fed += len(chunk)
        assert reader.offset == fed
    return events + reader.finish()


@dataclass
class Rebuilt:
    """What a stream's events say the TaskResults was."""

    head: Head
    tensors: list[base_pb2.NamedTensor]
    starts: list[TensorStart | None]
    ends: list[TensorEnd]


def rebuild(events: Sequence[Event]) -> Rebuilt:
    """Rebuild the tensors, checking the order: Head, then per tensor TensorStart, TensorData*, TensorEnd."""
    assert events, "no events: not even a Head"
    head = events[0]
    assert isinstance(head, Head)
    rebuilt = Rebuilt(head, [], [], [])
    start: TensorStart | None = None
    pieces: list[bytes] = []
    for event in events[1:]:
        if isinstance(event, TensorStart):
            assert start is None, f"{event} inside tensor {start}"
            assert event.index == len(rebuilt.tensors)
            assert not event.meta.data_bytes
            start, pieces = event, []
        elif isinstance(event, TensorData):
            assert start is not None, "data before a TensorStart"
            assert event.index == start.index
            assert len(event.piece) > 0
            pieces.append(bytes(event.piece))
        elif isinstance(event, TensorEnd):
            assert event.index == len(rebuilt.tensors)
            assert not event.meta.data_bytes
            if start is None:
                assert (event.data_offset, event.data_size) == (None, 0)
            else:
                assert (event.data_offset, event.data_size) == (start.data_offset, start.data_size)
                assert sum(map(len, pieces)) == start.data_size
            tensor = base_pb2.NamedTensor()
            tensor.CopyFrom(event.meta)
            tensor.data_bytes = b"".join(pieces)
            rebuilt.tensors.append(tensor)
            rebuilt.starts.append(start)
            rebuilt.ends.append(event)
            start, pieces = None, []
        else:
            raise AssertionError(f"a second Head: {event}")
    assert start is None, "the stream ended inside a tensor"
    return rebuilt


def assert_rebuilds(payload: bytes, events: Sequence[Event]) -> None:
    """The events carry exactly the TaskResults that `payload` parses to, data at its offsets."""
    message = aggregator_pb2.TaskResults()
    message.ParseFromString(payload)
    rebuilt = rebuild(events)
    assert rebuilt.head == Head(
        message.header, message.round_number, message.task_name, message.data_size
    )
    assert list(rebuilt.tensors) == list(message.tensors)
    for original, start, end in zip(message.tensors, rebuilt.starts, rebuilt.ends, strict=True):
        if end.data_offset is not None:
            at = end.data_offset
            assert payload[at : at + end.data_size] == original.data_bytes
        else:
            assert original.data_bytes == b""
        if start is not None:  # what a serializer writes before data_bytes: fields 1 to 6
            before = base_pb2.NamedTensor()
            before.CopyFrom(original)
            before.ClearField("data_bytes")
            before.ClearField("foedus_dtype")
            assert start.meta == before


def read_error(payload: bytes, **limits: int) -> ResultsFormatError:
    """The error reading `payload` in one chunk raises, at feed() or finish()."""
    with pytest.raises(ResultsFormatError) as caught:
        read([payload], **limits)
    return caught.value


def random_bytes(size: int) -> bytes:
    """`size` deterministic random bytes: hypothesis's own binary() is mostly short."""
    return np.random.default_rng(size).bytes(size)


# -- round trips --------------------------------------------------------------------------------

TEXT = st.text(max_size=12)  # any code point but surrogates: non-ASCII and NUL too


@st.composite
def named_tensors(draw: st.DrawFn) -> base_pb2.NamedTensor:
    """A NamedTensor with any fields, data_bytes of 0 to 5000 bytes or absent."""
    metadata = draw(
        st.lists(
            st.builds(
                base_pb2.MetadataProto,
                int_to_float=st.dictionaries(INT32, st.floats(width=32, allow_nan=False)),
                int_list=st.lists(INT32 | st.integers(0, 8), max_size=6),
                bool_list=st.lists(st.booleans(), max_size=3),
            ),
            max_size=2,
        )
    )
    return base_pb2.NamedTensor(
        name=draw(TEXT),
        round_number=draw(INT32),
        lossless=draw(st.booleans()),
        report=draw(st.booleans()),
        tags=draw(st.lists(TEXT, max_size=4)),
        transformer_metadata=metadata,
        data_bytes=draw(st.binary(max_size=5000) | st.integers(0, 5000).map(random_bytes)),
        foedus_dtype=draw(st.sampled_from(["", "<f8", "<i8", "|u1"]) | TEXT),
    )


TASK_RESULTS = st.builds(
    aggregator_pb2.TaskResults,
    header=st.builds(
        aggregator_pb2.MessageHeader,
        sender=TEXT,
        receiver=TEXT,
        federation_uuid=TEXT,
        single_col_cert_common_name=TEXT,
    )
    | st.none(),
    round_number=INT32,
    task_name=TEXT,
    data_size=INT32,
    tensors=st.lists(named_tensors(), max_size=5),
)


@st.composite
def cuts(draw: st.DrawFn, length: int) -> list[int]:
    """Random cut points in a payload of `length` bytes, with a run of 1-byte chunks somewhere."""
    points = draw(st.lists(st.integers(0, length), max_size=30))
    if draw(st.booleans()):
        start = draw(st.integers(0, length))
        points += range(start, min(length, start + 300))
    return points


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=TASK_RESULTS, data=st.data())
def test_events_rebuild_any_task_results_in_any_chunking(
    message: aggregator_pb2.TaskResults, data: st.DataObject
) -> None:
    """Any TaskResults, cut anywhere, gives events that rebuild it exactly."""
    payload = message.SerializeToString()
    kind = data.draw(st.sampled_from([bytes, bytearray, memoryview]))
    chunks = [kind(chunk) for chunk in cut(payload, data.draw(cuts(len(payload))))]
    events = read(chunks)
    assert_rebuilds(payload, events)
    assert len(rebuild(events).tensors) == len(message.tensors)


def small_results() -> list[aggregator_pb2.TaskResults]:
    """A small TaskResults and the messages made of the first 0, 1, 2, ... of its fields."""
    fields: list[tuple[str, object]] = [
        ("header", aggregator_pb2.MessageHeader(sender="ålice", federation_uuid="fed")),
        ("round_number", 300),
        ("task_name", "train"),
        ("data_size", 70000),
        ("tensor", base_pb2.NamedTensor(name="w", data_bytes=bytes(range(40)), foedus_dtype="<f8")),
        ("tensor", base_pb2.NamedTensor(name="b", tags=["x", "y"], lossless=True)),
        ("tensor", base_pb2.NamedTensor(data_bytes=b"\x01" * 200)),
    ]
    prefixes = [aggregator_pb2.TaskResults()]
    for name, value in fields:
        message = aggregator_pb2.TaskResults()
        message.CopyFrom(prefixes[-1])
        if name == "tensor":
            assert isinstance(value, base_pb2.NamedTensor)
            message.tensors.append(value)
        elif name == "header":
            assert isinstance(value, aggregator_pb2.MessageHeader)
            message.header.CopyFrom(value)
        else:
            setattr(message, name, value)
        prefixes.append(message)
    return prefixes


def test_every_truncation_is_refused_unless_at_a_field_boundary() -> None:
    """A cut between two TaskResults fields is the shorter message; any other cut is refused."""
    prefixes = small_results()
    payload = prefixes[-1].SerializeToString()
    boundaries = {len(prefix.SerializeToString()) for prefix in prefixes}
    for prefix in prefixes:
        assert payload.startswith(prefix.SerializeToString())
    for at in range(len(payload) + 1):
        short = payload[:at]
        for chunks in ([short], cut(short, range(at))):  # one chunk, and 1-byte chunks
            if at in boundaries:
                assert_rebuilds(short, read(chunks))
            else:
                with pytest.raises(ResultsFormatError, match="stream ends inside"):
                    read(chunks)


def test_truncated_data_says_how_much_arrived() -> None:
    """Cut inside data_bytes, the error says which tensor and how many of its bytes came."""
    message = aggregator_pb2.TaskResults(
        tensors=[base_pb2.NamedTensor(name=str(i)) for i in range(3)]
        + [base_pb2.NamedTensor(name="big", data_bytes=b"\0" * 4096)]
    )
    payload = message.SerializeToString()
    data_end = payload.index(b"\0" * 4096) + 1000
    with pytest.raises(ResultsFormatError, match="tensor 3's data_bytes: 1000 of 4096 bytes"):
        read(cut(payload[:data_end], [10, 20, 500]))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (key(2, 0), "inside the value of field 2 at byte 1 of TaskResults (the stream is 1 bytes)"),
        (key(2, 0) + b"\x80", "inside the value of field 2 at byte 1 of TaskResults"),
        (key(5, 2), "inside the length of tensor 0 at byte 1 of TaskResults"),
        (key(5, 2) + b"\x02", "inside tensor 0; 0 of the tensor's 2 bytes arrived"),
        (
            delimited(5, delimited(1, b"name"))[:5],
            "inside field 1 of tensor 0 (at byte 2): 1 of 4 bytes arrived; 3 of the tensor's 6",
        ),
        (delimited(5, b"\x10")[:3], "inside the value of field 2 at byte 3 of tensor 0"),
    ],
)
def test_truncation_says_where(payload: bytes, message: str) -> None:
    """A stream cut inside a field says which field of which message, and how much came."""
    assert message in str(read_error(payload))


def test_one_byte_chunks() -> None:
    """Keys, varints and lengths split across 1-byte chunks, with multi-byte lengths."""
    message = small_results()[-1]
    message.tensors.add(name="é" * 100, data_bytes=b"z" * 20000, round_number=-5)
    payload = message.SerializeToString()
    events = read(payload[at : at + 1] for at in range(len(payload)))
    assert_rebuilds(payload, events)
    assert sum(isinstance(event, TensorData) for event in events) == 40 + 200 + 20000


def test_empty_stream_is_an_empty_task_results() -> None:
    """No bytes is a valid, empty TaskResults: finish() gives its Head; the caller sees offset 0."""
    reader = ResultsReader()
    assert reader.feed(b"") == []
    assert reader.finish() == [Head(aggregator_pb2.MessageHeader(), 0, "", 0)]
    assert reader.offset == 0


def test_head_comes_before_the_first_tensor_key_is_passed() -> None:
    """Head is emitted as soon as the first tensor's key is read, before its length arrives."""
    payload = aggregator_pb2.TaskResults(
        task_name="train", tensors=[base_pb2.NamedTensor(name="w")]
    ).SerializeToString()
    reader = ResultsReader()
    tensor_key = payload.index(key(5, 2))
    assert reader.feed(payload[:tensor_key]) == []
    assert reader.feed(payload[tensor_key : tensor_key + 1]) == [
        Head(aggregator_pb2.MessageHeader(), 0, "train", 0)
    ]
    (end,) = reader.feed(payload[tensor_key + 1 :])
    assert isinstance(end, TensorEnd)
    assert end.meta.name == "w"
    assert reader.finish() == []


def test_empty_and_explicit_zero_length_data() -> None:
    """An empty tensor gives only TensorEnd; a data_bytes of length 0 gives TensorStart, no data."""
    payload = (
        delimited(5, b"")
        + delimited(5, delimited(1, b"a") + delimited(7, b"") + delimited(1000, b"<f8"))
        + delimited(5, b"")
    )
    events = read([payload])
    assert [type(event) for event in events] == [Head, TensorEnd, TensorStart, TensorEnd, TensorEnd]
    start, end = events[2], events[3]
    assert isinstance(start, TensorStart)
    assert isinstance(end, TensorEnd)
    assert (start.index, start.data_size, start.meta.name) == (1, 0, "a")
    assert start.data_offset == payload.index(delimited(7, b"")) + 2
    assert (end.data_offset, end.data_size, end.meta.foedus_dtype) == (start.data_offset, 0, "<f8")


def test_unknown_fields_are_kept() -> None:
    """Unknown fields of every wire type are kept in the meta and in the head, not refused."""
    unknown = (
        key(50, 0) + varint(2**63) + key(51, 1) + b"8bytes!!" + key(52, 5) + b"4byt"
    ) + delimited(53, b"blob")
    payload = delimited(3, b"train") + unknown + delimited(5, delimited(1, b"w") + unknown)
    (head, end) = read(cut(payload, range(len(payload))))
    assert isinstance(head, Head)
    assert head.task_name == "train"
    assert isinstance(end, TensorEnd)
    assert end.meta.name == "w"
    assert end.meta.SerializeToString().endswith(unknown)


def test_memoryview_of_any_format_is_read_as_bytes() -> None:
    """A chunk that is a typed memoryview (a float array's) is read as its bytes."""
    data = np.arange(8, dtype=np.float64)
    prefix = key(5, 2) + varint(data.nbytes + 2) + key(7, 2) + varint(data.nbytes)
    reader = ResultsReader()
    events = reader.feed(prefix) + reader.feed(data.data) + reader.finish()
    pieces = [event.piece for event in events if isinstance(event, TensorData)]
    assert b"".join(pieces) == data.tobytes()
    assert reader.offset == len(prefix) + data.nbytes


# -- zero copy ----------------------------------------------------------------------------------


def test_data_chunk_comes_out_without_a_copy() -> None:
    """A 2 MiB chunk of data_bytes comes out as one slice sharing the chunk's memory."""
    data = np.random.default_rng(0).bytes(2 * MIB)
    payload = aggregator_pb2.TaskResults(
        task_name="train", tensors=[base_pb2.NamedTensor(name="w", data_bytes=data)]
    ).SerializeToString()
    data_at = payload.index(data)
    reader = ResultsReader()
    _head, start = reader.feed(payload[:data_at])
    assert isinstance(start, TensorStart)
    assert start.data_offset == data_at
    chunk = bytearray(payload[data_at:])
    piece, end = reader.feed(chunk)
    assert isinstance(piece, TensorData)
    assert len(piece.piece) == 2 * MIB
    assert piece.piece.obj is chunk
    assert np.shares_memory(np.frombuffer(piece.piece, np.uint8), np.frombuffer(chunk, np.uint8))
    assert isinstance(end, TensorEnd)  # the tensor ends with the chunk: no call later
    assert reader.finish() == []


def test_whole_upload_in_one_chunk_slices_it() -> None:
    """Fed as one chunk, the data is a slice of it at data_offset, with TensorEnd in the same call."""
    data = b"\x07" * MIB
    payload = aggregator_pb2.TaskResults(
        tensors=[base_pb2.NamedTensor(name="w", data_bytes=data, foedus_dtype="<i8")]
    ).SerializeToString()
    events = ResultsReader().feed(payload)
    assert [type(event) for event in events] == [Head, TensorStart, TensorData, TensorEnd]
    start, piece, end = events[1:]
    assert isinstance(start, TensorStart)
    assert isinstance(piece, TensorData)
    assert isinstance(end, TensorEnd)
    assert piece.piece.obj is payload
    assert piece.piece == data
    assert end.meta.foedus_dtype == "<i8"


# -- errors -------------------------------------------------------------------------------------

TENSOR = delimited(1, b"w") + delimited(7, b"data")

ERRORS = [
    pytest.param(
        delimited(5, TENSOR) + key(2, 0) + varint(3),
        "TaskResults fields are out of order: field 2 at byte 11 comes after tensor 0",
        id="out-of-order",
    ),
    pytest.param(key(1, 3), "field 1 at byte 0: wire type 3 (start group)", id="group-top"),
    pytest.param(
        delimited(5, key(6, 4)), "tensor 0, field 6 at byte 2: wire type 4 (end group)", id="group"
    ),
    pytest.param(key(2, 6) + b"\0", "wire type 6 (undefined)", id="wire-type-6"),
    pytest.param(b"\x00", "field 0 at byte 0: field number 0", id="field-0"),
    pytest.param(delimited(5, key(0, 2) + b"\0"), "tensor 0, field 0 at byte 2", id="field-0-in"),
    pytest.param(
        key(2, 0) + b"\xff" * 10 + b"\x01",
        "value of field 2 at byte 1 is a varint longer than 10 bytes",
        id="11-byte-varint",
    ),
    pytest.param(b"\x80" * 11, "field key at byte 0 is a varint longer", id="11-byte-key"),
    pytest.param(
        delimited(5, delimited(1, b"w") + key(6, 2) + varint(100) + b"xy"),
        "tensor 0, field 6 at byte 5: its 100 bytes run past the tensor's end at byte 9",
        id="length-past-tensor",
    ),
    pytest.param(
        delimited(5, key(7, 2) + varint(5) + b"xy"),
        "tensor 0, field 7 (data_bytes) at byte 2: its 5 bytes run past the tensor's end",
        id="data-past-tensor",
    ),
    pytest.param(
        delimited(5, key(2, 1) + b"1234"), "its 8 bytes run past the tensor's end", id="fixed64"
    ),
    pytest.param(
        delimited(5, key(2, 0) + b"\x80") + delimited(5, b""),
        "tensor 0: the value of field 2 at byte 3 runs past the tensor's end at byte 4",
        id="varint-past-tensor",
    ),
    pytest.param(
        delimited(5, key(1000, 2)[:1]) + delimited(5, b""),
        "tensor 0: the field key at byte 2 runs past the tensor's end at byte 3",
        id="key-past-tensor",
    ),
    pytest.param(
        delimited(5, TENSOR + delimited(7, b"more")),
        "tensor 0, field 7 at byte 11: a second data_bytes; the first began at byte 7",
        id="duplicate-data",
    ),
    pytest.param(
        delimited(5, key(7, 0) + varint(1)),
        "data_bytes must have wire type 2 (length-delimited), not 0",
        id="data-wire-type-0",
    ),
    pytest.param(
        key(5, 0) + varint(1), "tensors must have wire type 2 (length-delimited), not 0", id="t-wt"
    ),
    pytest.param(
        delimited(5, delimited(1, b"\xff\xfe") + delimited(7, b"x")),
        "tensor 0 (from byte 2): its fields other than data_bytes (4 bytes) do not parse",
        id="name-not-utf8",
    ),
    pytest.param(
        delimited(5, delimited(1, b"ok")) + delimited(5, delimited(1000, b"\xc3")),
        "tensor 1 (from byte 8): its fields",
        id="dtype-not-utf8",
    ),
    pytest.param(
        delimited(3, b"\xff") + delimited(5, b""),
        "the TaskResults fields before the tensors (3 bytes) do not parse",
        id="task-name-not-utf8",
    ),
    pytest.param(key(1 << 29, 0) + b"\0", "field numbers stop at 536870911", id="field-number"),
]


@pytest.mark.parametrize(("payload", "message"), ERRORS)
def test_bad_bytes_are_refused_with_where_and_why(payload: bytes, message: str) -> None:
    """Each malformed stream is refused, whole or in 1-byte chunks, with where and why."""
    assert message in str(read_error(payload))
    with pytest.raises(ResultsFormatError) as caught:
        read(cut(payload, range(len(payload))))
    assert message in str(caught.value)
    assert isinstance(caught.value, StreamError)


def test_length_past_the_tensor_is_refused_when_the_length_arrives() -> None:
    """A field too long for its tensor is refused at the feed that completes its length."""
    reader = ResultsReader()
    reader.feed(key(5, 2) + varint(10) + key(1, 2))
    with pytest.raises(ResultsFormatError, match="its 1000 bytes run past the tensor's end"):
        reader.feed(varint(1000))


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        pytest.param(
            delimited(3, b"x" * 50) + key(3, 2) + varint(51),
            "TaskResults, field 3 at byte 52: the TaskResults fields before the tensors would "
            "take 105 bytes, over the limit of 100 bytes",
            id="head",
        ),
        pytest.param(
            key(5, 2) + varint(10**6) + delimited(1, b"w" * 90) + key(5, 2) + varint(5000),
            "tensor 0, field 5 at byte 96: the fields of tensor 0 other than data_bytes would "
            "take 5095 bytes, over the limit of 100 bytes",
            id="tensor",
        ),
        pytest.param(
            key(5, 2) + varint(10**6) + delimited(1, b"w" * 98) + key(2, 0),
            "tensor 0, field 2 at byte 104: the fields of tensor 0 other than data_bytes would "
            "take 101 bytes",
            id="key",
        ),
    ],
)
def test_meta_over_the_limit_is_refused_before_it_is_kept(prefix: bytes, message: str) -> None:
    """The limit is checked on a field's length prefix, before any of its bytes arrive."""
    reader = ResultsReader(max_meta_bytes=100)
    with pytest.raises(ResultsFormatError) as caught:
        reader.feed(prefix)
    assert message in str(caught.value)


def test_meta_at_the_limit_is_read() -> None:
    """Exactly max_meta_bytes of fields, in the head and in a tensor, is fine."""
    payload = delimited(3, b"x" * 98) + delimited(5, delimited(1, b"w" * 98) + delimited(7, b"d"))
    head, start, _, end = read([payload], max_meta_bytes=100)
    assert isinstance(head, Head)
    assert isinstance(start, TensorStart)
    assert isinstance(end, TensorEnd)
    assert (head.task_name, end.meta.name) == ("x" * 98, "w" * 98)


def test_too_many_tensors() -> None:
    """One tensor more than max_tensors is refused when its key arrives."""
    assert len(read([delimited(5, b"") * 3], max_tensors=3)) == 4
    error = read_error(delimited(5, b"") * 4, max_tensors=3)
    assert "more than the limit of 3 tensors: tensor 3 begins at byte 6" in str(error)


def test_reader_is_spent_after_an_error() -> None:
    """After a ResultsFormatError every call raises it again; after finish() feeding is a ValueError."""
    reader = ResultsReader()
    with pytest.raises(ResultsFormatError, match="field number 0"):
        reader.feed(b"\0")
    with pytest.raises(ResultsFormatError, match=r"failed earlier.*field number 0"):
        reader.feed(b"")
    with pytest.raises(ResultsFormatError, match="failed earlier"):
        reader.finish()

    cut_short = ResultsReader()
    cut_short.feed(key(5, 2))
    with pytest.raises(ResultsFormatError, match="inside the length of tensor 0"):
        cut_short.finish()
    with pytest.raises(ResultsFormatError, match="failed earlier"):
        cut_short.feed(b"")

    done = ResultsReader()
    done.finish()
    with pytest.raises(ValueError, match=r"feed\(\) after finish\(\)") as caught:
        done.feed(b"")
    assert not isinstance(caught.value, ResultsFormatError)
    with pytest.raises(ValueError, match=r"finish\(\) after finish\(\)"):
        done.finish()


@pytest.mark.parametrize("limits", [{"max_meta_bytes": -1}, {"max_tensors": -1}])
def test_negative_limits_are_a_programming_error(limits: dict[str, int]) -> None:
    """A negative limit is the caller's mistake."""
    with pytest.raises(ValueError, match="must not be negative"):
        ResultsReader(**limits)
