"""Reading a serialized `TaskResults` as its chunks arrive, without holding its tensors' data.

An upload of `SendLocalTaskResults` can be hundreds of megabytes, nearly all of it the tensors'
`data_bytes`. Joining it and calling `ParseFromString` holds several copies of it at once.
`ResultsReader` is a push parser of the protobuf wire format that knows the shape of a
`TaskResults`: fed the chunks in order, it returns events, and each tensor's `data_bytes` comes
out as memoryview slices of the chunks themselves (zero-copy), so the caller can write them to a
file as they arrive. Everything else (the header fields, each tensor's name, tags, shape and
dtype) is small: it is kept as raw wire bytes, within `max_meta_bytes`, and parsed with the
generated classes.

foedus reads the fields in the order every protobuf serializer writes them (by number): the
TaskResults fields other than `tensors` come first, and one of them after a tensor is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.stream import StreamError

MAX_VARINT_BYTES = 10
MAX_FIELD_NUMBER = (1 << 29) - 1
TENSORS_FIELD = 5  # TaskResults.tensors
DATA_FIELD = 7  # NamedTensor.data_bytes

_ONE_BYTE = [bytes((byte,)) for byte in range(0x80)]
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_M = TypeVar("_M", bound=Message)  # the message `_parsed` reads
_UNSUPPORTED_WIRE_TYPES = {3: "start group", 4: "end group", 6: "undefined", 7: "undefined"}

# What the reader is in the middle of.
_KEY = 0  # a field's key, or between two fields
_VALUE = 1  # a varint value of a kept field
_LENGTH = 2  # the length prefix of a kept field
_TENSOR_LENGTH = 3  # the length prefix of a tensor (TaskResults field 5)
_DATA_LENGTH = 4  # the length prefix of a tensor's data_bytes
_COPY = 5  # the fixed-size or length-delimited value of a kept field
_DATA = 6  # a tensor's data_bytes, handed out as slices


class ResultsFormatError(StreamError):
    """The bytes are not a TaskResults foedus can read as it arrives; the message says where and why."""


@dataclass(frozen=True)
class Head:
    """TaskResults fields other than the tensors: emitted once, before the first tensor's events (or by finish() when there are no tensors)."""

    header: aggregator_pb2.MessageHeader
    round_number: int
    task_name: str
    data_size: int


@dataclass(frozen=True)
class TensorStart:
    """A tensor's data_bytes begins; `meta` holds the NamedTensor fields read before it (data_bytes empty)."""

    index: int  # 0-based position of the tensor in TaskResults.tensors
    meta: base_pb2.NamedTensor
    data_offset: int  # absolute offset, in the whole stream, of data_bytes' first byte
    data_size: int  # the length prefix of data_bytes


@dataclass(frozen=True)
class TensorData:
    """The next piece of the current tensor's data_bytes: a zero-copy slice of the chunk just fed, valid only until the next feed()."""

    index: int
    piece: memoryview


@dataclass(frozen=True)
class TensorEnd:
    """A tensor is complete; `meta` holds all its fields except data_bytes (fields after data_bytes, like foedus_dtype, included)."""

    index: int
    meta: base_pb2.NamedTensor
    data_offset: int | None  # None when the tensor had no data_bytes field
    data_size: int  # 0 when it had none


Event = Head | TensorStart | TensorData | TensorEnd


class ResultsReader:
    """A push parser of one serialized `TaskResults`: `feed()` each chunk in order, then `finish()`.

    Each call returns the events its bytes completed: `Head` once, then for each tensor
    `TensorStart`, its `TensorData` pieces and `TensorEnd` (a tensor without data_bytes gives
    only `TensorEnd`). An empty stream is a valid, empty TaskResults; `offset` tells the caller
    how many bytes arrived.

    With `tensors_field=1` it reads a `ModelProto` (whose only field is its tensors) the same
    way; its `Head` is then empty.

    After a `ResultsFormatError` the reader is spent: every later `feed()` or `finish()` raises
    `ResultsFormatError` again, quoting the first. `feed()` or `finish()` after `finish()` is a
    `ValueError`, a mistake of the caller's.
    """

    def __init__(
        self,
        *,
        max_meta_bytes: int = 1 << 20,
        max_tensors: int = 1 << 16,
        tensors_field: int = TENSORS_FIELD,
    ) -> None:
        if max_meta_bytes < 0 or max_tensors < 0:
            raise ValueError(
                f"limits must not be negative, got max_meta_bytes={max_meta_bytes}, "
                f"max_tensors={max_tensors}"
            )
        self._max_meta_bytes = max_meta_bytes
        self._max_tensors = max_tensors
        self._tensors_field = tensors_field
        # The message's name in errors: a `ModelProto` file is read with its tensors' field (1).
        self._message = "TaskResults" if tensors_field == TENSORS_FIELD else "ModelProto"
        self._offset = 0  # bytes fed before the chunk being read
        self._state = _KEY
        self._varint = bytearray()  # a key or varint cut by the end of a chunk
        self._varint_offset = 0  # where that key or varint began
        self._field = 0  # the number of the field being read
        self._field_offset = 0  # where its key began
        self._size = 0  # the size of a _COPY or _DATA value
        self._remaining = 0  # how much of it is still to come
        self._head = bytearray()  # TaskResults fields other than tensors, as on the wire
        self._head_sent = False
        self._tensors = 0  # tensors begun
        self._tensor_offset = 0  # where the current tensor's fields begin
        self._tensor_end: int | None = None  # where they end; None outside a tensor
        self._meta = bytearray()  # the current tensor's fields other than data_bytes
        self._kept = self._head  # where fields are kept: the head, or the tensor's meta
        self._data_offset: int | None = None
        self._data_size = 0
        self._failure: str | None = None
        self._finished = False

    @property
    def offset(self) -> int:
        """How many bytes were fed so far."""
        return self._offset

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Event]:
        """Read the next chunk; `TensorData` pieces are slices of it, valid until the next feed()."""
        self._check_usable("feed")
        view = memoryview(chunk)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        try:
            return self._read(view)
        except ResultsFormatError as error:
            self._failure = str(error)
            raise

    def finish(self) -> list[Event]:
        """End the stream: refuse it if it stops inside a field or a tensor, else give `Head` if not sent."""
        self._check_usable("finish")
        self._finished = True
        try:
            problem = self._unfinished()
            if problem is not None:
                raise ResultsFormatError(
                    f"stream ends inside {problem} (the stream is {self._offset} bytes)"
                )
            return [] if self._head_sent else [self._parse_head()]
        except ResultsFormatError as error:
            self._failure = str(error)
            raise

    def _check_usable(self, call: str) -> None:
        if self._failure is not None:
            raise ResultsFormatError(
                f"the reader failed earlier and reads no more: {self._failure}"
            )
        if self._finished:
            raise ValueError(f"{call}() after finish(): the stream has already ended")

    def _read(self, view: memoryview) -> list[Event]:
        """Read a chunk: per byte only over keys and varints, by slices over values."""
        events: list[Event] = []
        base = self._offset
        size = len(view)
        pos = 0
        while True:
            state = self._state
            if state == _KEY and base + pos == self._tensor_end and not self._varint:
                events.append(self._end_tensor())
                continue
            if pos == size:
                break
            if state == _DATA:  # length checked against the tensor's end when read
                take = min(self._remaining, size - pos)
                events.append(TensorData(self._tensors - 1, view[pos : pos + take]))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _KEY
            elif state == _COPY:
                take = min(self._remaining, size - pos)
                self._kept.extend(view[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _KEY
            else:
                if state == _KEY and not self._varint:
                    self._field_offset = base + pos
                raw, pos = self._take_varint(view, pos, base)
                if raw is None:
                    continue
                at = base + pos
                if state == _KEY:
                    self._on_key(raw, at, events)
                elif state == _VALUE:
                    self._keep(raw)
                    self._state = _KEY
                elif state == _LENGTH:
                    self._keep(raw)
                    self._start_copy(_decode(raw), at)
                elif state == _TENSOR_LENGTH:
                    self._start_tensor(_decode(raw), at)
                else:  # _DATA_LENGTH
                    self._start_data(_decode(raw), at, events)
        self._offset = base + size
        return events

    def _take_varint(self, view: memoryview, pos: int, base: int) -> tuple[bytes | None, int]:
        """Read on a key or varint from `pos`: its raw bytes once complete, else None."""
        end = len(view)
        if self._tensor_end is not None:
            end = min(end, self._tensor_end - base)
        pending = self._varint
        if not pending:
            self._varint_offset = base + pos
            if pos < end and view[pos] < 0x80:  # most keys and lengths: one byte
                return _ONE_BYTE[view[pos]], pos + 1
        while pos < end:
            byte = view[pos]
            pos += 1
            pending.append(byte)
            if byte < 0x80:
                raw = bytes(pending)
                pending.clear()
                return raw, pos
            if len(pending) == MAX_VARINT_BYTES:
                raise ResultsFormatError(
                    f"{self._where()}: the {self._reading()} at byte {self._varint_offset} is a "
                    f"varint longer than {MAX_VARINT_BYTES} bytes"
                )
        if self._tensor_end is not None and base + pos == self._tensor_end:
            raise ResultsFormatError(
                f"{self._where()}: the {self._reading()} at byte {self._varint_offset} runs past "
                f"the tensor's end at byte {self._tensor_end}"
            )
        return None, pos

    def _on_key(self, raw: bytes, at: int, events: list[Event]) -> None:
        """Check a field's key and decide how to read its value; `at` is just after the key."""
        key = _decode(raw)
        field, wire_type = key >> 3, key & 7
        self._field = field
        if field == 0:
            raise ResultsFormatError(f"{self._at_field()}: field number 0 is not valid protobuf")
        if field > MAX_FIELD_NUMBER:
            raise ResultsFormatError(
                f"{self._at_field()}: field numbers stop at {MAX_FIELD_NUMBER} in protobuf"
            )
        if wire_type in _UNSUPPORTED_WIRE_TYPES:
            raise ResultsFormatError(
                f"{self._at_field()}: wire type {wire_type} "
                f"({_UNSUPPORTED_WIRE_TYPES[wire_type]}) is not supported; foedus reads wire "
                "types 0, 1, 2 and 5"
            )
        if self._tensor_end is None:
            if field == self._tensors_field:
                if wire_type != _LENGTH_DELIMITED:
                    raise ResultsFormatError(
                        f"{self._at_field()}: tensors must have wire type 2 (length-delimited), "
                        f"not {wire_type}"
                    )
                if not self._head_sent:
                    events.append(self._parse_head())
                    self._head_sent = True
                if self._tensors >= self._max_tensors:
                    raise ResultsFormatError(
                        f"{self._message} has more than the limit of {self._max_tensors} tensors: "
                        f"tensor {self._tensors} begins at byte {self._field_offset}"
                    )
                self._state = _TENSOR_LENGTH
                return
            if self._head_sent:
                raise ResultsFormatError(
                    f"{self._message} fields are out of order: field {field} at byte "
                    f"{self._field_offset} comes after tensor {self._tensors - 1}; foedus reads "
                    "them in field-number order, the order every protobuf serializer writes"
                )
        elif field == DATA_FIELD:
            if wire_type != _LENGTH_DELIMITED:
                raise ResultsFormatError(
                    f"{self._at_field()}: data_bytes must have wire type 2 (length-delimited), "
                    f"not {wire_type}"
                )
            if self._data_offset is not None:
                raise ResultsFormatError(
                    f"{self._at_field()}: a second data_bytes; the first began at byte "
                    f"{self._data_offset}"
                )
            self._state = _DATA_LENGTH
            return
        self._keep(raw)
        if wire_type == _VARINT:
            self._state = _VALUE
        elif wire_type == _LENGTH_DELIMITED:
            self._state = _LENGTH
        else:
            self._start_copy(8 if wire_type == _FIXED64 else 4, at)

    def _start_copy(self, size: int, at: int) -> None:
        """Keep the next `size` bytes, from byte `at`, as the value of the current field."""
        if self._tensor_end is not None and at + size > self._tensor_end:
            raise ResultsFormatError(
                f"{self._at_field()}: its {size} bytes run past the tensor's end at byte "
                f"{self._tensor_end}"
            )
        self._check_room(size)
        self._size = self._remaining = size
        self._state = _COPY if size else _KEY

    def _start_tensor(self, size: int, at: int) -> None:
        """Begin a tensor of `size` bytes from byte `at`."""
        self._tensors += 1
        self._tensor_offset = at
        self._tensor_end = at + size
        self._meta = self._kept = bytearray()
        self._data_offset = None
        self._data_size = 0
        self._state = _KEY

    def _start_data(self, size: int, at: int, events: list[Event]) -> None:
        """Begin the current tensor's data_bytes, `size` bytes from byte `at`."""
        assert self._tensor_end is not None
        if at + size > self._tensor_end:
            raise ResultsFormatError(
                f"{self._where()}, field {DATA_FIELD} (data_bytes) at byte "
                f"{self._field_offset}: its {size} bytes run past the tensor's end at byte "
                f"{self._tensor_end}"
            )
        self._data_offset = at
        self._data_size = size
        events.append(TensorStart(self._tensors - 1, self._parse_meta(), at, size))
        self._size = self._remaining = size
        self._state = _DATA if size else _KEY

    def _end_tensor(self) -> TensorEnd:
        """The current tensor's last byte was read."""
        event = TensorEnd(self._tensors - 1, self._parse_meta(), self._data_offset, self._data_size)
        self._tensor_end = None
        self._kept = self._head
        return event

    def _check_room(self, size: int) -> None:
        """Refuse a field that would take the kept bytes past `max_meta_bytes`, before keeping it."""
        kept = len(self._kept)
        if kept + size > self._max_meta_bytes:
            if self._tensor_end is None:
                what = f"{self._message} fields before the tensors"
            else:
                what = f"fields of tensor {self._tensors - 1} other than data_bytes"
            raise ResultsFormatError(
                f"{self._at_field()}: the {what} would take {kept + size} bytes, over the limit "
                f"of {self._max_meta_bytes} bytes"
            )

    def _keep(self, raw: bytes) -> None:
        """Keep a key or varint of the current field, within `max_meta_bytes`."""
        self._check_room(len(raw))
        self._kept.extend(raw)

    def _parse_head(self) -> Head:
        results = _parsed(
            aggregator_pb2.TaskResults(),
            self._head,
            f"the {self._message} fields before the tensors",
        )
        return Head(results.header, results.round_number, results.task_name, results.data_size)

    def _parse_meta(self) -> base_pb2.NamedTensor:
        return _parsed(
            base_pb2.NamedTensor(),
            self._meta,
            f"tensor {self._tensors - 1} (from byte {self._tensor_offset}): its fields "
            "other than data_bytes",
            as_=" as a NamedTensor",
        )

    def _at_field(self) -> str:
        """Where the field being read is, for an error message."""
        return f"{self._where()}, field {self._field} at byte {self._field_offset}"

    def _where(self) -> str:
        """Which message is being read, for an error message."""
        return self._message if self._tensor_end is None else f"tensor {self._tensors - 1}"

    def _reading(self) -> str:
        """What the varint being read is, for an error message."""
        if self._state == _KEY:
            return "field key"
        if self._state == _VALUE:
            return f"value of field {self._field}"
        if self._state == _TENSOR_LENGTH:
            return f"length of tensor {self._tensors}"
        return f"length of field {self._field}"

    def _unfinished(self) -> str | None:
        """What the stream ends inside, or None if it ends between two TaskResults fields."""
        state = self._state
        if self._varint or state in (_VALUE, _LENGTH, _TENSOR_LENGTH, _DATA_LENGTH):
            at = self._varint_offset if self._varint else self._offset
            problem = f"the {self._reading()} at byte {at} of {self._where()}"
        elif state == _DATA:
            problem = (
                f"tensor {self._tensors - 1}'s data_bytes: {self._size - self._remaining} of "
                f"{self._size} bytes arrived"
            )
        elif state == _COPY:
            problem = (
                f"field {self._field} of {self._where()} (at byte {self._field_offset}): "
                f"{self._size - self._remaining} of {self._size} bytes arrived"
            )
        elif self._tensor_end is not None:
            problem = f"tensor {self._tensors - 1}"
        else:
            return None
        if self._tensor_end is not None:
            problem += (
                f"; {self._offset - self._tensor_offset} of the tensor's "
                f"{self._tensor_end - self._tensor_offset} bytes arrived"
            )
        return problem


def _decode(raw: bytes) -> int:
    """The value of a complete varint's bytes."""
    if len(raw) == 1:
        return raw[0]
    value = 0
    for shift, byte in enumerate(raw):
        value |= (byte & 0x7F) << (7 * shift)
    return value


def _parsed(message: _M, data: bytearray, what: str, *, as_: str = "") -> _M:
    """`message` read from `data`; `ResultsFormatError` saying `what` ({len} bytes) does not parse."""
    try:
        message.ParseFromString(bytes(data))
    except DecodeError as error:
        raise ResultsFormatError(f"{what} ({len(data)} bytes) do not parse{as_}: {error}") from None
    return message
