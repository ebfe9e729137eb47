"""One upload of task results, written to disk as it arrives and checked on the way.

An update is as large as the model, and many collaborators upload at once: held in memory, the
uploads in flight would cost O(collaborators x model). Here each chunk goes to a spool file in
the state's folder as it arrives (the file is the serialized `TaskResults` as sent, byte for
byte), while `foedus.protos.results_reader.ResultsReader` follows the message's structure:

* the fields before the tensors (header, round, task, data size) are handed to `on_head` as soon
  as they are read, so a caller that is not who it says, or a result for a closed round, is
  refused before the bulk of its bytes is written;
* each model tensor's values are checked for NaN and infinities as they pass (in the dtype of
  the global model's tensor of that name; a tensor of another dtype is refused later anyway);
  other tensors (metrics) are small and kept in memory, up to `MAX_SMALL_TENSOR_BYTES`;
* a tensor coded in the plan's `compression.upload` code (its code comes after its data) is
  checked as it ends, and once the whole upload is in, `foedus.aggregator.transcode` writes the
  raw `TaskResults` it stands for (deltas decoded and added back to the round's global model)
  into a new file, which replaces the spool: everything after sees a raw upload; so are an
  OpenFL collaborator's tensors in one of OpenFL's own compression pipelines, and its deltas;
* at the end every tensor's metadata is checked as `foedus.protos.codec.decode_tensor` checks it, and
  the model tensors become read-only arrays mapped from the file: no copy of the data is made.

`read_tensors_file` reads such a file back (the store keeps it as the result's file) the same
way, and the state's `ModelProto` model files too: a block at a time, the tensors mapped, never
the whole file in memory. Nothing here knows gRPC: the servicer
hands in the chunks' bytes.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np

from foedus.aggregator.digest import new_digest
from foedus.aggregator.records import Array, ResultTensor, UploadFile
from foedus.aggregator.transcode import (
    Base,
    OpenflLayout,
    Placed,
    Spooled,
    check_coded,
    check_openfl,
    is_openfl_coded,
    no_base,
    transcode,
)
from foedus.plans.schema import CodeSettings
from foedus.protos import base_pb2
from foedus.protos.codec import (
    CodedLayout,
    TensorFormatError,
    TensorTooLargeError,
    all_finite,
    tensor_layout,
)
from foedus.protos.dtypes import is_float
from foedus.protos.results_reader import (
    TENSORS_FIELD,
    Event,
    Head,
    ResultsFormatError,
    ResultsReader,
    TensorData,
    TensorEnd,
    TensorStart,
)
from foedus.protos.stream import StreamError
from foedus.refusals.errors import InvalidRequestError, StorageError

# A tensor not in the global model (a metric) is kept in memory; metrics are scalars.
MAX_SMALL_TENSOR_BYTES: Final = 64 * 1024
SPOOL_PREFIX: Final = ".upload-"
SPOOL_SUFFIX: Final = ".tmp"
RAW: Final = CodeSettings()  # compression.upload none: every tensor raw
_READ_BYTES: Final = 2 * 1024 * 1024  # how much of a stored upload is read at a time
# An upload's writeback to disk is started every this many bytes (see `_Spool`).
WRITEBACK_BYTES: Final = 8 * 1024 * 1024
# Linux only: start writeback of a file range without waiting (elsewhere fsync does it all).
_sync_file_range = getattr(os, "sync_file_range", None)
_WRITE_BEGIN: Final = getattr(os, "SYNC_FILE_RANGE_WRITE", 2)


@dataclass(frozen=True)
class ReceivedUpload:
    """An upload that arrived whole and well-formed, its tensors mapped from its file."""

    head: Head
    tensors: tuple[ResultTensor, ...]
    file: UploadFile


def receive_upload(
    chunks: Iterable[bytes | memoryview],
    folder: Path,
    *,
    on_head: Callable[[Head], object],
    model_dtype: Callable[[str], np.dtype[np.generic] | None],
    max_tensor_bytes: int,
    expected_bytes: int | None = None,
    base: Base = no_base,
    upload_code: CodeSettings = RAW,
    raw_base: Base = no_base,
) -> ReceivedUpload:
    """Write `chunks` to a new file in `folder` as they arrive, checking them on the way.

    Tensors may come coded in `upload_code` (the plan's `compression.upload`), as deltas from
    `base` (the round's global model as the sites received it): the file is then the raw
    upload they stand for. An OpenFL collaborator's tensors in one of OpenFL's compression
    pipelines are made raw the same way, its deltas added back to `raw_base` (the global model as
    OpenFL's collaborators receive it: raw). The caller removes `ReceivedUpload.file.path` when done with it
    (unless a store moved it); on any error the files are removed here. Raises `StreamError`
    for bytes that are not a `TaskResults`, `TensorFormatError` (or another
    `InvalidRequestError`) for a tensor that cannot be trusted, whatever `on_head` raises, and
    `StorageError` when a file cannot be written.
    """
    spool = _Spool(folder)
    raw: _Spool | None = None
    try:
        with spool:
            tensors = _Tensors(model_dtype, max_tensor_bytes, upload_code)
            reader = ResultsReader()
            head: Head | None = None
            for chunk in chunks:
                spool.write(chunk)
                for event in _read(reader.feed, chunk):
                    if isinstance(event, Head):
                        on_head(event)
                        head = event
                    else:
                        tensors.on(event)
            if reader.offset == 0:
                raise StreamError("empty stream: no bytes were sent")
            # Before the reader's own check: a cut the transport hid is best told as one.
            if expected_bytes is not None and reader.offset != expected_bytes:
                raise StreamError(
                    f"upload cut short: {reader.offset} of the {expected_bytes} declared bytes "
                    "arrived; nothing of it was kept"
                )
            for event in _read(lambda _: reader.finish(), b""):
                if isinstance(event, Head):
                    on_head(event)
                    head = event
        assert head is not None  # finish() gives the head if no tensor did
        if tensors.coded:
            raw = _Spool(folder)
            with raw:
                placed = transcode(
                    spool.path,
                    head,
                    tensors.spooled(),
                    raw,
                    base=base,
                    upload=upload_code,
                    raw_base=raw_base,
                )
            tensors.place(placed)
            spool.path.unlink(missing_ok=True)
            spool = raw
        return ReceivedUpload(head, tensors.arrays(spool.path), spool.file())
    except BaseException:
        spool.path.unlink(missing_ok=True)
        if raw is not None:
            raw.path.unlink(missing_ok=True)
        raise


def read_tensors_file(
    path: Path, *, max_tensor_bytes: int, tensors_field: int = TENSORS_FIELD
) -> tuple[Head, tuple[ResultTensor, ...]]:
    """The head and tensors of a file holding a `TaskResults` (a kept upload) or, with
    `tensors_field=1`, a `ModelProto`: read a block at a time, the tensors mapped, never whole."""
    tensors = _Tensors(None, max_tensor_bytes)
    reader = ResultsReader(tensors_field=tensors_field)
    heads: list[Head] = []

    def take(events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Head):
                heads.append(event)
            else:
                tensors.on(event)

    try:
        with path.open("rb") as file:
            while block := file.read(_READ_BYTES):
                take(reader.feed(block))
        take(reader.finish())
    except OSError as error:
        raise StorageError(f"{path}: cannot read: {error.strerror or error}") from None
    return heads[0], tensors.arrays(path)


def _read(
    step: Callable[[bytes | memoryview], list[Event]], chunk: bytes | memoryview
) -> list[Event]:
    """The reader's events for `chunk`, its format errors told as the upload's."""
    try:
        return step(chunk)
    except ResultsFormatError as error:
        raise ResultsFormatError(f"the upload is not a TaskResults: {error}") from None


class _Spool:
    """The file an upload goes to: written as it arrives, hashed on the way."""

    def __init__(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(
                dir=folder, prefix=SPOOL_PREFIX, suffix=SPOOL_SUFFIX
            )
        except OSError as error:
            raise StorageError(
                f"{folder}: cannot store an upload: {error.strerror or error}"
            ) from None
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(descriptor, "wb")
        self._digest = new_digest()
        self._size = 0
        self._flushing = 0  # bytes whose writeback has been started

    def write(self, chunk: bytes | memoryview) -> None:
        try:
            self._file.write(chunk)
            self._size += len(chunk)
            if self._size - self._flushing >= WRITEBACK_BYTES:
                self._start_writeback()
        except OSError as error:
            raise StorageError(f"{self.path}: cannot write: {error.strerror or error}") from None
        self._digest.update(chunk)

    def _start_writeback(self) -> None:
        """Have the kernel start writing what arrived so far to disk, without waiting for it.

        The store's fsync before the upload is accepted then finds most of it written: the disk
        works while the rest of the upload arrives, instead of after it.
        """
        if _sync_file_range is None:
            return
        self._file.flush()
        _sync_file_range(
            self._file.fileno(), self._flushing, self._size - self._flushing, _WRITE_BEGIN
        )
        self._flushing = self._size

    @property
    def size(self) -> int:
        """The bytes written so far."""
        return self._size

    def file(self) -> UploadFile:
        return UploadFile(self.path, self._size, self._digest.hexdigest())

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._file.close()  # flushed, so the bytes can be mapped; durability is the store's
        except OSError as error:
            raise StorageError(f"{self.path}: cannot write: {error.strerror or error}") from None


@dataclass
class _Tensor:
    """One tensor as it is read: where its data lies, and what was learnt of its values."""

    meta: base_pb2.NamedTensor
    data_offset: int | None = None
    data_size: int = 0
    small: bytearray | None = None  # the data of a tensor kept in memory
    scan: _FiniteScan | None = None  # the finiteness check of a model tensor's values
    layout: CodedLayout | OpenflLayout | None = None  # a coded tensor's, once it ended
    finite: bool | None = None  # a decoded tensor's values all finite (None: not known)


class _Tensors:
    """The tensors of an upload, followed through the reader's events.

    With `model_dtype`, tensors arriving now: model tensors are checked for NaN/Inf on the way,
    others (metrics) kept in memory, coded ones checked against `upload_code` as they end.
    Without, tensors of a file read back: only where each lies.
    """

    def __init__(
        self,
        model_dtype: Callable[[str], np.dtype[np.generic] | None] | None,
        max_tensor_bytes: int,
        upload_code: CodeSettings = RAW,
    ) -> None:
        self._model_dtype = model_dtype
        self._max_tensor_bytes = max_tensor_bytes
        self._upload_code = upload_code
        self._done: list[_Tensor] = []
        self._current: _Tensor | None = None
        self._coded: set[str] = set()  # the names of the tensors that came coded

    def on(self, event: TensorStart | TensorData | TensorEnd) -> None:
        if isinstance(event, TensorStart):
            self._current = self._start(event)
        elif isinstance(event, TensorData):
            current = self._current
            assert current is not None  # the reader gives TensorStart first
            if current.small is not None:
                current.small += event.piece
            elif current.scan is not None:
                current.scan.feed(event.piece)
        else:
            tensor = self._current or _Tensor(event.meta)
            tensor.meta = event.meta  # now with the fields after the data (the dtype, the code)
            openfl = is_openfl_coded(event.meta)
            if (event.meta.foedus_code or openfl) and self._model_dtype is not None:
                # Each decodes to a model tensor's size: twice, and a few bytes could fill the disk.
                if event.meta.name in self._coded:
                    raise InvalidRequestError(
                        f"results name the same tensor more than once ({event.meta.name!r}, coded)"
                    )
                self._coded.add(event.meta.name)
                in_model = self._model_dtype(event.meta.name) is not None
                tensor.layout = (
                    check_openfl(
                        event.meta,
                        in_model=in_model,
                        max_tensor_bytes=self._max_tensor_bytes,
                        max_small_bytes=MAX_SMALL_TENSOR_BYTES,
                    )
                    if openfl
                    else check_coded(
                        event.meta,
                        self._upload_code,
                        in_model=in_model,
                        max_tensor_bytes=self._max_tensor_bytes,
                    )
                )
                tensor.scan = None  # it scanned a payload's bytes, not values
                tensor.small = None  # a metric's payload: its values are in the raw file
            self._done.append(tensor)
            self._current = None

    def _start(self, event: TensorStart) -> _Tensor:
        name = event.meta.name
        if event.data_size > self._max_tensor_bytes:
            raise TensorTooLargeError(
                f"tensor {name!r}: {event.data_size} bytes, over the limit of "
                f"{self._max_tensor_bytes} bytes"
            )
        tensor = _Tensor(event.meta, event.data_offset, event.data_size)
        if self._model_dtype is None:  # a file read back: nothing to check on the way
            return tensor
        dtype = self._model_dtype(name)
        if dtype is None:
            if event.data_size > MAX_SMALL_TENSOR_BYTES:
                raise InvalidRequestError(
                    f"tensor {name!r} is not in the global model, and at {event.data_size} "
                    f"bytes too large to be a metric"
                )
            tensor.small = bytearray()
        elif is_float(dtype):
            tensor.scan = _FiniteScan(dtype)
        return tensor

    @property
    def coded(self) -> bool:
        """Whether a tensor came coded (then the upload is transcoded)."""
        return bool(self._coded)

    def spooled(self) -> list[Spooled]:
        """Every tensor as it lies in the spool, for `transcode`."""
        return [Spooled(t.meta, t.data_offset, t.data_size, t.layout) for t in self._done]

    def place(self, placed: list[Placed]) -> None:
        """Where `transcode` put each tensor (in order): raw values, in the new file."""
        for tensor, where in zip(self._done, placed, strict=True):
            tensor.meta, tensor.data_offset, tensor.data_size = (
                where.meta,
                where.data_offset,
                where.data_size,
            )
            if tensor.layout is not None:
                tensor.finite = where.finite
                tensor.layout = None
        self._coded.clear()

    def arrays(self, path: Path) -> tuple[ResultTensor, ...]:
        """Every tensor, checked; model tensors mapped read-only from `path`."""
        return tuple(self._array(tensor, path) for tensor in self._done)

    def _array(self, tensor: _Tensor, path: Path) -> ResultTensor:
        meta = tensor.meta
        dtype, shape, expected = tensor_layout(meta, max_bytes=self._max_tensor_bytes)
        if tensor.data_size != expected:
            raise TensorFormatError(
                f"tensor {meta.name!r}: shape {shape} of {dtype} needs {expected} bytes, got "
                f"{tensor.data_size}"
            )
        finite = tensor.finite
        if tensor.scan is not None and tensor.scan.dtype == dtype:
            finite = tensor.scan.finite()
        array: Array
        if tensor.small is not None:
            array = np.frombuffer(bytes(tensor.small), dtype=dtype).reshape(shape)
        elif tensor.data_offset is None:
            array = file_array(path, 0, dtype, shape)  # no values: nothing is read
        else:
            # A small tensor of a file read back (a metric) is read, not mapped.
            array = file_array(
                path, tensor.data_offset, dtype, shape, read_small=self._model_dtype is None
            )
        return ResultTensor(meta.name, frozenset(meta.tags), array, finite)


def file_array(
    path: Path,
    offset: int,
    dtype: np.dtype[np.generic],
    shape: tuple[int, ...],
    *,
    read_small: bool = True,
) -> Array:
    """The read-only array of `shape` and `dtype` whose values lie at `offset` in the file at
    `path`: mapped; read instead when it has no values (numpy cannot map 0 bytes) or, with
    `read_small`, when it is small (a mapping each would cost more than the bytes)."""
    count = math.prod(shape)
    size = count * dtype.itemsize
    array: Array
    if size == 0:
        array = np.empty(shape, dtype=dtype)
    elif read_small and size <= MAX_SMALL_TENSOR_BYTES:
        array = np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)
    else:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    array.flags.writeable = False
    return array


class _FiniteScan:
    """Whether a float tensor's values are all finite, learnt from its bytes piece by piece."""

    def __init__(self, dtype: np.dtype[np.generic]) -> None:
        self.dtype = dtype
        self._carry = b""  # the start of a value cut by the end of a piece
        self._finite = True

    def feed(self, piece: memoryview) -> None:
        if not self._finite:
            return
        if self._carry:
            take = self.dtype.itemsize - len(self._carry)
            self._carry += piece[:take].tobytes()
            piece = piece[take:]
            if len(self._carry) == self.dtype.itemsize:
                self._finite = all_finite(np.frombuffer(self._carry, dtype=self.dtype))
                self._carry = b""
        whole = len(piece) - len(piece) % self.dtype.itemsize
        if whole:
            self._finite = self._finite and all_finite(
                np.frombuffer(piece[:whole], dtype=self.dtype)
            )
        if whole < len(piece):
            self._carry = piece[whole:].tobytes()

    def finite(self) -> bool:
        return self._finite
