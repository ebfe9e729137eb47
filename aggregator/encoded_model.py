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

Under the plan's `compression.download` code the streamed chunks carry each tensor in the code
it travels in (`foedus.compression.codes.carried_code`; `GetAggregatedTensor`, OpenFL's,
stays raw): the metadata chunk is the coded tensor's (`foedus.protos.codec.coded_layout` reads
it) with `data_size` the payload's bytes, and the data chunks the payload in pieces, a lossless
chunk (1 MiB raw) to a message. The payload is made a piece at a time, read from the state's
model file where the tensor is mapped from one, and spooled as it is made; what must come first
but is known last (the metadata's `data_size`, int8's scales) is written last and put first in
the spool's order. So encoding a tensor of any size holds a few MB (and int8's scales, 1/256 of
the tensor's bytes, until they are spooled).

Under the `lossless` download code a site that holds the previous round's tensors sends up
that model's digest (`GetAggregatedModelRequest.foedus_held_model`, the digest `model_digest`
gave and the stream's first chunk named): the tensors then travel as the XOR of their bits with the held
model's (`foedus_delta`), which a federation whose updates move few values (top-k uploads: at
most the union of the sites' indices changes) makes mostly zeros, and Blosc2 nearly nothing. The
previous round's model is kept as the arrays the federation handed out, their files kept open
(read by descriptor once the state has tidied them away, never through the mappings), and
nothing of it is written: a restarted aggregator, or a site that missed a round, has the whole
model sent, as before.

Under a lossy download code a site trains on the decoded model, so the base its upload delta is
taken from is `round_trip` of the global model, not the model: `EncodedModel.base` computes it
once a round per tensor and keeps it, a float32 copy of each float32 tensor the round long (the
model's float32 bytes once more, in memory); other codes' base is the global tensor itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import numpy as np

from foedus.aggregator.digest import BLOCK_BYTES, new_digest
from foedus.aggregator.mapped import FileRange, copy_range, mapped_range, open_files, write_all
from foedus.aggregator.records import Array
from foedus.compression.codes import Code, carried_code
from foedus.compression.download import LossyEncoder, round_trip
from foedus.compression.lossless import chunk_sizes, compress_chunk
from foedus.compression.quantize import INT8_BLOCK
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import (
    coded_tensor_frame,
    encode_tensor,
    encode_tensor_meta_into,
    tensor_bytes,
)
from foedus.protos.stream import CHUNK_BYTES, field_prefix
from foedus.refusals.errors import StorageError

logger = logging.getLogger(__name__)

MODEL_TAGS: Final = ("aggregated", "model")
# GetAggregatedTensor's tags, as OpenFL's aggregator answers a request for the model (with
# `compressed`): its collaborator keeps the tensor under ("model",), where `use_delta_updates`
# looks for the base of the delta it sends.
OPENFL_MODEL_TAGS: Final = ("model",)
_CHUNK_DATA_FIELD: Final = aggregator_pb2.ModelChunk.DATA_FIELD_NUMBER
_CHUNK_TENSOR_FIELD: Final = aggregator_pb2.ModelChunk.TENSOR_FIELD_NUMBER
# The bytes a value takes in the body of a lossy payload.
_BODY_BYTES: Final = {Code.BFLOAT16: 2, Code.INT8: 1}


class EncodedModel:
    """The encodings of one round's global model, shared by all the collaborators' requests.

    Keyed by (round, tensor name), emptied when a request for a newer round arrives, so it holds
    at most one round's model. An entry is used only for the very array it was encoded from: a
    federation that hands out a different array for the same round and name gets it re-encoded.
    Requests for a tensor being encoded wait for that encoding instead of making their own (all
    collaborators ask for the same tensors as a round starts); other tensors do not wait.
    """

    def __init__(
        self,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        folder: Path | None = None,
        download: Code = Code.NONE,
    ) -> None:
        """Chunks carry at most `chunk_bytes` of data each, the tensors in the plan's `download`
        code, and are spooled in `folder`."""
        self.chunk_bytes = chunk_bytes
        self.folder = folder
        self.download = download
        self._lock = threading.Lock()
        self._round: int | None = None
        self._entries: dict[str, _Encoding] = {}
        # The digest of the newest round's model and of the one before, with its arrays: what a
        # site may hold whole (`lossless` downloads only).
        self._digest: _Digested | None = None
        self._previous: _Digested | None = None
        self._digesting = threading.Lock()

    def model_digest(self, round_number: int, whole: Callable[[], Mapping[str, Array]]) -> str:
        """A digest of round `round_number`'s whole global model, which `whole` gives, asked for
        and digested once a round (empty but under the `lossless` download code: no other
        code's site holds the model as sent); the model before it is kept, for the sites that
        hold it (`chunks`'s `held`)."""
        if self.download is not Code.LOSSLESS:
            return ""
        with self._digesting:  # the round's first requests wait for one digest, not make theirs
            with self._lock:
                current = self._digest
            if current is not None and current.round_number >= round_number:
                # This round's, or a late request for an older round: its model is not kept.
                return current.digest if current.round_number == round_number else ""
            model = dict(whole())
            made = _Digested(round_number, model_digest(model), model, model.values())
            with self._lock:
                self._previous, self._digest = current, made
            return made.digest

    def tensor(self, round_number: int, name: str, array: Array) -> base_pb2.NamedTensor:
        """`array`, the global tensor `name` of `round_number`, encoded (the same message each time).

        The message is shared: callers copy it and never change it.
        """
        entry = self._entry(round_number, name, array)
        with entry.lock:
            if entry.tensor is None:
                entry.tensor = encode_tensor(
                    name, array, round_number=round_number, tags=OPENFL_MODEL_TAGS
                )
            return entry.tensor

    def chunks(
        self, round_number: int, name: str, array: Array, *, held: str = ""
    ) -> SpooledChunks:
        """`array` as the serialized `ModelChunk`s of `GetAggregatedModel` (the same bytes each
        time); `held`: the digest of the model the site holds whole, against whose tensor `name`
        it is sent as a lossless XOR when that is the previous round's model."""
        entry = self._entry(round_number, name, array)
        previous = self._held_tensor(round_number, name, array, held)
        if previous is not None:
            base, model = previous
            with entry.lock:
                if entry.delta_chunks is None:
                    entry.delta_chunks = delta_model_chunks(
                        name,
                        array,
                        base,
                        round_number,
                        self.chunk_bytes,
                        folder=self.folder,
                        base_files=model.files,
                    )
                return entry.delta_chunks
        with entry.lock:
            if entry.chunks is None:
                code = carried_code(self.download, array.dtype, np.ndim(array))
                if code is Code.NONE:
                    entry.chunks = model_chunks(
                        name, array, round_number, self.chunk_bytes, folder=self.folder
                    )
                else:
                    entry.chunks = coded_model_chunks(
                        name, array, round_number, code, self.chunk_bytes, folder=self.folder
                    )
            return entry.chunks

    def base(self, round_number: int, name: str, array: Array) -> Array:
        """What a site decodes of `array`, the global tensor `name` of `round_number`, which the
        delta of its upload is taken from: `round_trip` under a lossy download code, computed
        once and kept for the round (shared: callers never change it); `array` itself else."""
        if not carried_code(self.download, array.dtype, np.ndim(array)).lossy:
            return array
        entry = self._entry(round_number, name, array)
        with entry.lock:
            if entry.base is None:
                entry.base = round_trip(self.download, array, name=name)
                entry.base.flags.writeable = False
            return entry.base

    def _held_tensor(
        self, round_number: int, name: str, array: Array, held: str
    ) -> tuple[Array, _Digested] | None:
        """The previous round's tensor `name`, and that model, when the site holds it (`held` is
        its digest) and round `round_number`'s tensor follows it in dtype and shape; None else."""
        if not held:
            return None
        with self._lock:
            current, previous = self._digest, self._previous
        if current is None or previous is None or current.round_number != round_number:
            return None
        if held != previous.digest or previous.round_number >= round_number:
            return None
        base = previous.model.get(name)
        if base is None or np.dtype(base.dtype) != np.dtype(array.dtype):
            return None
        return (base, previous) if np.shape(base) == np.shape(array) else None

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
        self.delta_chunks: SpooledChunks | None = None  # XOR with the previous round's tensor
        self.base: Array | None = None


class _Digested:
    """A round's whole global model and its digest (`model_digest`), with its files kept open:
    read as the previous round's once they are tidied away, its bytes never come through the
    mappings (whose pages would count in the aggregator's memory)."""

    def __init__(
        self, round_number: int, digest: str, model: dict[str, Array], arrays: Iterable[Array]
    ) -> None:
        self.round_number = round_number
        self.digest = digest
        self.model = model
        self.files = open_files(arrays)
        weakref.finalize(self, _close_all, list(self.files.values()))


def _close_all(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        os.close(descriptor)


def model_digest(model: Mapping[str, Array]) -> str:
    """BLAKE3 of every tensor's name, dtype, shape and bytes, in name order: what names a whole
    model a site holds (two models with the same digest are the same bits)."""
    digest = new_digest()
    for name in sorted(model):
        array = model[name]
        data = encode_tensor_meta_into(base_pb2.NamedTensor(), name, array)
        digest.update(f"{len(name)}:{name}:{data.dtype.str}:{list(data.shape)}:".encode())
        with _raw_reader(array, data) as read:
            for start in range(0, data.nbytes, BLOCK_BYTES):
                digest.update(read(start, min(BLOCK_BYTES, data.nbytes - start)))
    return digest.hexdigest()


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


def coded_model_chunks(
    name: str,
    array: Array,
    round_number: int,
    code: Code,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    folder: Path | None = None,
) -> SpooledChunks:
    """One tensor as the serialized `ModelChunk`s of its payload in `code` (see the module):
    its coded metadata and the payload's size, then the payload in pieces. A tensor the lossy
    code cannot carry (a NaN, an infinity, a value past its range) goes raw (`model_chunks`)."""
    data = encode_tensor_meta_into(base_pb2.NamedTensor(), name, array)  # little-endian, C order
    spool = SpooledChunks(folder)
    with _raw_reader(array, data) as read:
        if code is Code.LOSSLESS:
            size = _spool_lossless(spool, data, read, chunk_bytes)
        else:
            try:
                encoder = LossyEncoder(code, name=name)
                size = _spool_lossy(spool, encoder, data.size, read, chunk_bytes)
            except ValueError as error:  # a value the code cannot carry: send the values
                logger.warning(
                    "tensor %r of round %d travels raw, not %s: %s", name, round_number, code, error
                )
                return model_chunks(name, array, round_number, chunk_bytes, folder=folder)
    _insert_coded_meta(spool, name, data, round_number, code, delta=False, size=size)
    return spool


def _insert_coded_meta(
    spool: SpooledChunks,
    name: str,
    data: Array,
    round_number: int,
    code: Code,
    *,
    delta: bool,
    size: int,
) -> None:
    """Put first in `spool` the chunk of a coded tensor's metadata (what `coded_tensor_frame`
    writes, as the chunk's tensor field, no payload in it) and its payload's `size`."""
    frame = coded_tensor_frame(
        _CHUNK_TENSOR_FIELD,
        name,
        b"",
        dtype=data.dtype,
        shape=data.shape,
        code=code,
        delta=delta,
        round_number=round_number,
        tags=MODEL_TAGS,
    )
    meta = aggregator_pb2.ModelChunk.FromString(frame.head + frame.tail)
    meta.data_size = size
    spool.insert(0, meta.SerializeToString())


def delta_model_chunks(
    name: str,
    array: Array,
    base: Array,
    round_number: int,
    chunk_bytes: int = CHUNK_BYTES,
    *,
    folder: Path | None = None,
    base_files: Mapping[str, int] | None = None,
) -> SpooledChunks:
    """One tensor as the serialized `ModelChunk`s of the `lossless` payload of its bits XOR
    `base`'s (the same dtype and shape: the tensor the site holds), `foedus_delta` set;
    `base_files`: the files `base` may be mapped from, kept open (`open_files`)."""
    data = encode_tensor_meta_into(base_pb2.NamedTensor(), name, array)  # little-endian, C order
    held = encode_tensor_meta_into(base_pb2.NamedTensor(), name, base)
    spool = SpooledChunks(folder)
    with (
        _raw_reader(array, data) as read,
        _raw_reader(base, held, opened=base_files) as read_held,
    ):

        def read_xor(start: int, size: int) -> memoryview:
            new = np.frombuffer(read(start, size), dtype=np.uint8)
            old = np.frombuffer(read_held(start, size), dtype=np.uint8)
            return np.bitwise_xor(new, old).data

        size = _spool_lossless(spool, data, read_xor, chunk_bytes)
    _insert_coded_meta(spool, name, data, round_number, Code.LOSSLESS, delta=True, size=size)
    return spool


def _spool_lossless(
    spool: SpooledChunks,
    data: Array,
    read: Callable[[int, int], bytes | memoryview],
    chunk_bytes: int,
) -> int:
    """The tensor's lossless chunks, each in data messages of its own; their bytes."""
    itemsize, start, size = data.dtype.itemsize, 0, 0
    for raw in chunk_sizes(data.nbytes, itemsize):
        frame = compress_chunk(read(start, raw), itemsize)
        _append_data(spool, frame, chunk_bytes)
        start += raw
        size += len(frame)
    return size


def _spool_lossy(
    spool: SpooledChunks,
    encoder: LossyEncoder,
    count: int,
    read: Callable[[int, int], bytes | memoryview],
    chunk_bytes: int,
) -> int:
    """A float32 tensor's bfloat16 or int8 payload: the body a slice at a time (a data message
    a slice), then the head (int8's scales) put before it; the payload's bytes."""
    step = max(1, chunk_bytes // _BODY_BYTES[encoder.code] // INT8_BLOCK) * INT8_BLOCK
    size = 0
    for start in range(0, count, step):
        values = np.frombuffer(read(4 * start, 4 * min(step, count - start)), dtype=np.float32)
        size += _append_data(spool, encoder.encode(values), chunk_bytes)
    head = encoder.head()
    pieces = range(0, len(head), chunk_bytes)
    for index, start in enumerate(pieces):
        piece = head[start : start + chunk_bytes]
        spool.insert(index, field_prefix(_CHUNK_DATA_FIELD, len(piece)), piece)
    return size + len(head)


def _append_data(spool: SpooledChunks, payload: bytes, chunk_bytes: int) -> int:
    """`payload` as data messages of at most `chunk_bytes` each; its bytes."""
    view = memoryview(payload)
    for start in range(0, len(view), chunk_bytes):
        piece = view[start : start + chunk_bytes]
        spool.append(field_prefix(_CHUNK_DATA_FIELD, len(piece)), piece)
    return len(view)


@contextmanager
def _raw_reader(
    array: Array, data: Array, *, opened: Mapping[str, int] | None = None
) -> Iterator[Callable[[int, int], bytes | memoryview]]:
    """`read(start, size)`: bytes of `data` (`array` encoded), read from the file `array` is
    mapped from where it is one (its pages then never count in the aggregator's memory), kept
    open in `opened` or opened now."""
    with mapped_range(array, data, opened=opened) as source:
        if source is None:
            memory = tensor_bytes(data) if data.nbytes else memoryview(b"")
            yield lambda start, size: memory[start : start + size]
        else:
            yield lambda start, size: _read_range(
                FileRange(source.descriptor, source.offset + start, size)
            )


def _read_range(source: FileRange) -> bytes:
    """The bytes of `source`, all of them."""
    try:
        data = os.pread(source.descriptor, source.size, source.offset)
    except OSError as error:
        raise StorageError(f"cannot read the model: {error.strerror or error}") from None
    if len(data) != source.size:
        raise StorageError("the model's file is shorter than its tensors")
    return data


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
        self._messages.append(self._write(parts))

    def insert(self, index: int, *parts: bytes | memoryview | FileRange) -> None:
        """Add one message made of `parts`, read back at `index` in the messages' order
        (written at the file's end as every message: what is known last can come first)."""
        self._messages.insert(index, self._write(parts))

    def _write(self, parts: tuple[bytes | memoryview | FileRange, ...]) -> tuple[int, int]:
        """Write `parts` at the file's end; where they are, (offset, size)."""
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
        return start, self._size - start

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
