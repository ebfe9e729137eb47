"""The global model of a round, encoded once and served to every collaborator that asks for it.

Two encodings of each tensor, each made by the first request that needs it:

* a `NamedTensor`, for OpenFL's unary `GetAggregatedTensor`, kept in memory;
* the serialized `ModelChunk`s of foedus's streamed `GetAggregatedModel`, spooled to a file that
  has no name (`SpooledChunks`) and read back for each request. The aggregator then holds none of
  the model's bytes for its downloads (the page cache does, and can drop them under pressure), and a
  tensor mapped from the state's model file goes into the spool by a copy in the kernel
  (`foedus.aggregator.mapped`), so its pages never count in the aggregator's memory either. Reading
  a 2 MiB chunk back costs one `pread` per request: what gRPC needs is a `bytes` object per message,
  which a chunk held in memory gave without it, at the price of holding the whole model once more.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from foedus.aggregator.mapped import FileRange, copy_range, mapped_range, write_all
from foedus.aggregator.records import Array
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import encode_tensor, encode_tensor_meta_into, tensor_bytes
from foedus.protos.stream import CHUNK_BYTES, field_prefix
from foedus.refusals.errors import StorageError

MODEL_TAGS: Final = ("aggregated", "model")
_CHUNK_DATA_FIELD: Final = aggregator_pb2.ModelChunk.DATA_FIELD_NUMBER


class EncodedModel:
    """The encodings of one round's global model, shared by all the collaborators' requests.

    Keyed by (round, tensor name), emptied when a request for a newer round arrives, so it holds
    at most one round's model. An entry is used only for the very array it was encoded from: a
    federation that hands out a different array for the same round and name gets it re-encoded.
    Requests for a tensor being encoded wait for that encoding instead of making their own (all
    collaborators ask for the same tensors as a round starts); other tensors do not wait.
    """

    def __init__(self, *, chunk_bytes: int = CHUNK_BYTES, folder: Path | None = None) -> None:
        """Chunks carry at most `chunk_bytes` of data each and are spooled in `folder`."""
        self.chunk_bytes = chunk_bytes
        self.folder = folder
        self._lock = threading.Lock()
        self._round: int | None = None
        self._entries: dict[str, _Encoding] = {}

    def tensor(self, round_number: int, name: str, array: Array) -> base_pb2.NamedTensor:
        """`array`, the global tensor `name` of `round_number`, encoded (the same message each time).

        The message is shared: callers copy it and never change it.
        """
        entry = self._entry(round_number, name, array)
        with entry.lock:
            if entry.tensor is None:
                entry.tensor = encode_tensor(
                    name, array, round_number=round_number, tags=MODEL_TAGS
                )
            return entry.tensor

    def chunks(self, round_number: int, name: str, array: Array) -> SpooledChunks:
        """`array` as the serialized `ModelChunk`s of `GetAggregatedModel` (the same bytes each time)."""
        entry = self._entry(round_number, name, array)
        with entry.lock:
            if entry.chunks is None:
                entry.chunks = model_chunks(
                    name, array, round_number, self.chunk_bytes, folder=self.folder
                )
            return entry.chunks

    def _entry(self, round_number: int, name: str, array: Array) -> _Encoding:
        with self._lock:
            if self._round is None or round_number > self._round:
                self._round = round_number
                self._entries = {}
            entry = self._entries.get(name) if round_number == self._round else None
            if entry is None or entry.array is not array:
                entry = _Encoding(array)
                if round_number == self._round:  # a late request for an older round is not kept
                    self._entries[name] = entry
            return entry


class _Encoding:
    """One tensor's encodings, each made by the first request for it under `lock`."""

    def __init__(self, array: Array) -> None:
        self.array = array
        self.lock = threading.Lock()
        self.tensor: base_pb2.NamedTensor | None = None
        self.chunks: SpooledChunks | None = None


def model_chunks(
    name: str,
    array: Array,
    round_number: int,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    folder: Path | None = None,
) -> SpooledChunks:
    """One tensor as serialized `ModelChunk`s: its metadata and size, then its data in pieces.

    Each data chunk is written as its field's key and length before a piece of the tensor's
    bytes, which is what protobuf would serialize, without building the message first.
    """
    meta = aggregator_pb2.ModelChunk()
    data = encode_tensor_meta_into(
        meta.tensor, name, array, round_number=round_number, tags=MODEL_TAGS
    )
    size = data.nbytes
    meta.data_size = size
    spool = SpooledChunks(folder)
    spool.append(meta.SerializeToString())
    with mapped_range(array, data) as source:
        memory = tensor_bytes(data) if source is None and size else memoryview(b"")
        for start in range(0, size, chunk_bytes):
            piece = min(chunk_bytes, size - start)
            part: memoryview | FileRange = (
                memory[start : start + piece]
                if source is None
                else FileRange(source.descriptor, source.offset + start, piece)
            )
            spool.append(field_prefix(_CHUNK_DATA_FIELD, piece), part)
    return spool


class SpooledChunks:
    """Serialized messages in a file that has no name, read back anew by each iteration.

    The file is unlinked as soon as it is made, so nothing is left behind whatever happens; it
    is closed when the last reference to it goes (a request still streaming an older round's
    model keeps it open).
    """

    def __init__(self, folder: Path | None = None) -> None:
        """A new, empty spool in `folder` (the system's temporary folder when None)."""
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(dir=folder, prefix=".model-", suffix=".chunks")
        except OSError as error:
            raise StorageError(
                f"{folder or tempfile.gettempdir()}: cannot spool the model: "
                f"{error.strerror or error}"
            ) from None
        self._descriptor = descriptor
        self._closer = weakref.finalize(self, os.close, descriptor)
        self._messages: list[tuple[int, int]] = []  # (offset, size) of each message
        self._size = 0
        try:
            os.unlink(name)
        except OSError as error:
            self._closer()
            raise StorageError(f"{name}: cannot unlink: {error.strerror or error}") from None

    def append(self, *parts: bytes | memoryview | FileRange) -> None:
        """Add one message made of `parts`, in order."""
        start = self._size
        try:
            for part in parts:
                if isinstance(part, FileRange):
                    copy_range(part, self._descriptor)
                    self._size += part.size
                else:
                    self._size += write_all(self._descriptor, part)
        except OSError as error:
            raise StorageError(f"cannot spool the model: {error.strerror or error}") from None
        self._messages.append((start, self._size - start))

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[bytes]:
        """Each message, read from the file as it is asked for."""
        for offset, size in self._messages:
            try:
                message = os.pread(self._descriptor, size, offset)
            except OSError as error:
                raise StorageError(
                    f"cannot read the spooled model: {error.strerror or error}"
                ) from None
            if len(message) != size:
                raise StorageError("the spooled model is shorter than what was written to it")
            yield message
