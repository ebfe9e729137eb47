"""The aggregator's output folder: models as OpenFL `ModelProto` files, metrics as JSON lines.

Every model file is written atomically, at mode 0600 (`foedus.durable.files.replace_file`: a
temporary file in the same folder, written, fsynced, renamed over the old one, then the folder
fsynced), so a crash leaves either the old file or the new one, never half of one. A model file is a
serialized `ModelProto` of tensors encoded with `foedus.protos.codec.encode_tensor` in sorted name
order: the same model always gives the same bytes, nothing is pickled, and OpenFL (which saves its
models as `.pbuf` ModelProtos too) reads float32 models. `read_model` validates every tensor as the
servicer validates uploads. The same format, with each tensor's own tags, holds the task results
`foedus.aggregator.state` keeps.

The user-facing outputs (`last_model.pbuf`, `best_model.pbuf`, `metrics.jsonl`) are written after
a round is committed to the state, so a crash can leave them one round behind, a temporary file
beside them, or a last line of `metrics.jsonl` cut short; `OutputFolder.remove_temporaries` and
`read_metrics` clean that up, and the runtime writes what is missing again from the state.
`metrics.jsonl`'s rows are `foedus.history.rows`'s: its one writer and reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from foedus.aggregator.digest import file_digest, new_digest
from foedus.aggregator.failpoints import failpoint
from foedus.aggregator.fedavg import SliceSink
from foedus.aggregator.mapped import FileRange, copy_range, mapped_range
from foedus.aggregator.records import ResultTensor
from foedus.aggregator.upload import file_array, read_tensors_file
from foedus.durable.files import is_temporary, replace_file
from foedus.history.rows import METRICS, MetricsRow, append_row, read_rows
from foedus.protos import base_pb2
from foedus.protos.codec import (
    TensorFormatError,
    TensorFrame,
    encode_tensor,
    tensor_bytes,
    tensor_field_frame,
)
from foedus.protos.stream import StreamError
from foedus.refusals.errors import ModelFileError, StorageError

Array = npt.NDArray[np.generic]
MODEL_TAG = "model"
LAST_MODEL = "last_model.pbuf"
BEST_MODEL = "best_model.pbuf"
NamedArray = tuple[str, Array, frozenset[str]]  # a tensor's name, values and tags


def model_bytes(model: Mapping[str, Array], *, round_number: int = 0) -> bytes:
    """The serialized `ModelProto` of `model`: deterministic bytes for the same tensors and round."""
    return tensors_bytes(
        ((name, array, frozenset((MODEL_TAG,))) for name, array in model.items()),
        round_number=round_number,
    )


def tensors_bytes(tensors: Iterable[NamedArray], *, round_number: int = 0) -> bytes:
    """Tagged tensors as a serialized `ModelProto`, in name order: deterministic bytes."""
    try:
        proto = base_pb2.ModelProto(
            tensors=[
                encode_tensor(name, array, round_number=round_number, tags=sorted(tags))
                for name, array, tags in sorted(tensors, key=lambda tensor: tensor[0])
            ]
        )
    except TensorFormatError as error:
        raise StorageError(f"cannot save the tensors: {error}") from None
    return proto.SerializeToString(deterministic=True)


def write_model(
    path: Path,
    model: Mapping[str, Array],
    *,
    round_number: int = 0,
    before_rename: Callable[[], None] | None = None,
    hashed: bool = True,
) -> str:
    """Write `model` to `path` as a `ModelProto` file, atomically; the digest of its bytes
    ("" when not `hashed`)."""
    return write_tensors(
        path,
        ((name, array, frozenset((MODEL_TAG,))) for name, array in model.items()),
        round_number=round_number,
        before_rename=before_rename,
        hashed=hashed,
    )


def write_tensors(
    path: Path,
    tensors: Iterable[NamedArray],
    *,
    round_number: int = 0,
    before_rename: Callable[[], None] | None = None,
    hashed: bool = True,
) -> str:
    """Write the bytes `tensors_bytes` gives to `path`, atomically; the digest of those bytes (`foedus.aggregator.digest`)
    ("" when not `hashed`: the outputs, which the state never names, need none).

    Each tensor's values go from its array to the file as they are, never through a serialized copy
    of the whole model: memory stays at the arrays the caller holds. The values of an array mapped
    from a file are copied from that file in the kernel (`foedus.aggregator.mapped`) and hashed from
    where they were written: read through its mapping they would count in our memory.
    """
    digest = new_digest()
    update = digest.update if hashed else None

    def write(file: BinaryIO) -> None:
        for name, array, tags in sorted(tensors, key=lambda tensor: tensor[0]):
            frame = _frame(name, array, tags, round_number)
            file.write(frame.head)
            if update is not None:
                update(frame.head)
            with mapped_range(array, frame.data) as source:
                if source is not None:
                    file.flush()
                    _copy_hashed(source, file.fileno(), update)
                elif frame.data.nbytes:
                    body = tensor_bytes(frame.data)
                    file.write(body)
                    if update is not None:
                        update(body)
            file.write(frame.tail)
            if update is not None:
                update(frame.tail)

    _replace(path, write, before_rename)
    return digest.hexdigest() if hashed else ""


@dataclass(frozen=True)
class ModelFile:
    """A model file `write_model_slices` wrote: the digest of its bytes, and where each
    tensor's values lie in it."""

    path: Path
    digest: str
    tensors: Mapping[str, tuple[int, np.dtype[np.generic], tuple[int, ...]]]  # offset, dtype, shape

    def mapped(self) -> dict[str, Array]:
        """Its tensors, read-only on the file as `read_model` gives them, the file neither read
        nor parsed again: this process has just written it, and knows where everything is."""
        return {
            name: file_array(self.path, offset, dtype, shape)
            for name, (offset, dtype, shape) in self.tensors.items()
        }


def write_model_slices(
    path: Path,
    layout: Mapping[str, Array],
    fill: Callable[[SliceSink], None],
    *,
    round_number: int = 0,
    before_rename: Callable[[], None] | None = None,
) -> ModelFile:
    """`write_model` of a model whose values are not in memory; the file written.

    `layout` gives each tensor's name, shape and dtype (its values are not read); `fill` hands
    every slice of every tensor, in any order, to the sink it is given, which writes it where it
    belongs in the file (`fedavg.average_sources_into` is such a fill). The file is the one
    `write_model` writes of the same values, byte for byte, and is written atomically.
    """
    digest = new_digest()
    frames = {
        name: _frame(name, layout[name], (MODEL_TAG,), round_number) for name in sorted(layout)
    }
    offsets: dict[str, int] = {}

    def write(file: BinaryIO) -> None:
        file.flush()
        descriptor = file.fileno()
        position = 0
        for name, frame in frames.items():
            _pwrite_all(descriptor, frame.head, position)
            offsets[name] = position + len(frame.head)
            position = offsets[name] + frame.data.nbytes
            _pwrite_all(descriptor, frame.tail, position)
            position += len(frame.tail)
        os.ftruncate(descriptor, position)  # the last tensor's values may end the file

        def sink(name: str, start: int, values: Array) -> None:
            data = np.ascontiguousarray(values, dtype=frames[name].data.dtype)
            _pwrite_all(descriptor, tensor_bytes(data), offsets[name] + start * data.itemsize)

        fill(sink)
        for block in _blocks(descriptor, 0, position):
            digest.update(block)

    _replace(path, write, before_rename)
    return ModelFile(
        path,
        digest.hexdigest(),
        {
            name: (offsets[name], frame.data.dtype, tuple(frame.data.shape))
            for name, frame in frames.items()
        },
    )


def _frame(name: str, array: Array, tags: Iterable[str], round_number: int) -> TensorFrame:
    """One tensor as a `ModelProto.tensors` field around its values."""
    try:
        return tensor_field_frame(
            _TENSORS_FIELD, name, array, round_number=round_number, tags=sorted(tags)
        )
    except TensorFormatError as error:
        raise StorageError(f"cannot save the tensors: {error}") from None


def _serialized_parts(
    tensors: Iterable[NamedArray], round_number: int
) -> Iterator[bytes | memoryview]:
    """The bytes of `tensors_bytes`, in pieces: each tensor's values as they lie in its array."""
    for name, array, tags in sorted(tensors, key=lambda tensor: tensor[0]):
        yield from _frame(name, array, tags, round_number).parts()


def _copy_hashed(
    source: FileRange, target: int, hash_block: Callable[[bytes], object] | None
) -> None:
    """Append `source` to `target`, hashing the bytes as they lie in `target` (just written:
    in the page cache, not in our memory); only copied when `hash_block` is None."""
    start = os.lseek(target, 0, os.SEEK_CUR)
    copy_range(source, target)
    if hash_block is None:
        return
    for block in _blocks(target, start, start + source.size):
        hash_block(block)


def _blocks(descriptor: int, start: int, stop: int) -> Iterator[bytes]:
    """The bytes [start, stop) of an open file, a block at a time."""
    position = start
    while position < stop:
        block = os.pread(descriptor, min(_HASH_BLOCK, stop - position), position)
        if not block:
            raise OSError(0, "the file is shorter than what was written to it")
        position += len(block)
        yield block


def _pwrite_all(descriptor: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(descriptor, view[done:], offset + done)


_TENSORS_FIELD = base_pb2.ModelProto.TENSORS_FIELD_NUMBER
_HASH_BLOCK = 1024 * 1024


def read_model(path: Path, max_tensor_bytes: int) -> dict[str, Array]:
    """Read and check a `ModelProto` file; `ModelFileError` names the file and what is wrong."""
    return {tensor.name: tensor.array for tensor in read_model_tensors(path, max_tensor_bytes)}


def read_model_tensors(
    path: Path, max_tensor_bytes: int, *, empty: bool = False
) -> tuple[ResultTensor, ...]:
    """The checked tensors of a `ModelProto` file, with their tags; `ModelFileError` if bad.

    Read a block at a time, its tensors mapped from the file (small ones read): reading a model
    whole would hold its bytes, their parse and the arrays at once, three times the model.
    A model file holds at least one tensor; a result file (`empty`) may hold none, as a store
    keeps whatever result it is given (the federation's checks decide what is accepted).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        _, tensors = read_tensors_file(
            path, max_tensor_bytes=max_tensor_bytes, tensors_field=_TENSORS_FIELD
        )
    except (StreamError, TensorFormatError) as error:
        raise ModelFileError(f"{path}: not a ModelProto file: {error}") from None
    except StorageError as error:  # it could not be read
        raise ModelFileError(str(error)) from None
    if not tensors and not empty:
        raise ModelFileError(f"{path}: not a model file: it holds no tensors")
    seen: set[str] = set()
    for tensor in tensors:
        if not tensor.name:
            raise ModelFileError(f"{path}: a tensor has no name")
        if tensor.name in seen:
            raise ModelFileError(f"{path}: tensor {tensor.name!r} appears more than once")
        seen.add(tensor.name)
    return tensors


def _replace(
    path: Path, write: Callable[[BinaryIO], object], before_rename: Callable[[], None] | None
) -> None:
    """`foedus.durable.files.replace_file` at mode 0600, its `OSError` a `StorageError` naming `path`."""
    try:
        replace_file(path, write, mode=0o600, before_rename=before_rename)
    except OSError as error:
        raise StorageError(f"{path}: cannot write: {error.strerror or error}") from None


class OutputFolder:
    """The aggregator's output folder: `last_model.pbuf`, `best_model.pbuf`, `metrics.jsonl`."""

    def __init__(self, root: Path) -> None:
        """Use `root`, creating it if needed (`StorageError` when that fails)."""
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(
                f"{self.root}: cannot create the output folder: {error.strerror or error}"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"{self.root}: the output folder is not writable")

    @property
    def last_model(self) -> Path:
        """The global model after the latest closed round."""
        return self.root / LAST_MODEL

    @property
    def best_model(self) -> Path:
        """The global model with the best value of the plan's `best_model` metric so far."""
        return self.root / BEST_MODEL

    @property
    def metrics(self) -> Path:
        """One JSON line per closed round."""
        return self.root / METRICS

    def save_last(self, model: Mapping[str, Array], round_number: int) -> None:
        """Replace `last_model.pbuf`."""
        _save(self.last_model, model, round_number)

    def save_best(self, model: Mapping[str, Array], round_number: int) -> None:
        """Replace `best_model.pbuf`."""
        _save(self.best_model, model, round_number)

    def restore_model(self, path: Path, model: Mapping[str, Array], round_number: int) -> bool:
        """Make `path` hold `model` (after a restart); True if it had to be written again.

        Compared by digest (`foedus.aggregator.digest`), the file read and the model serialized a
        piece at a time: holding both whole, as bytes, would take twice the model's size.
        """
        wanted = new_digest()
        tagged = ((name, array, frozenset((MODEL_TAG,))) for name, array in model.items())
        for part in _serialized_parts(tagged, round_number):
            wanted.update(part)
        try:
            if file_digest(path) == wanted.hexdigest():
                return False
        except OSError:  # missing or unreadable: written again
            pass
        write_model(path, model, round_number=round_number, hashed=False)
        return True

    def append_metrics(self, row: MetricsRow) -> None:
        """Append one round's row to `metrics.jsonl` (`foedus.history.rows.append_row`)."""
        try:
            append_row(self.metrics, row)
        except OSError as error:
            raise StorageError(
                f"{self.metrics}: cannot append: {error.strerror or error}"
            ) from None

    def read_metrics(self) -> list[MetricsRow]:
        """The rows of `metrics.jsonl`; a last line cut short by a crash is removed first."""
        try:
            return read_rows(self.metrics, repair=True)
        except OSError as error:
            raise StorageError(f"{self.metrics}: cannot read: {error.strerror or error}") from None

    def remove_temporaries(self) -> None:
        """Remove temporary files of the models that a crash left in the folder."""
        for path in self.root.iterdir():
            if is_temporary(path, LAST_MODEL) or is_temporary(path, BEST_MODEL):
                path.unlink(missing_ok=True)


def _save(path: Path, model: Mapping[str, Array], round_number: int) -> None:
    """Replace a user-facing model file (the `while_saving` failpoint just before the rename)."""
    write_model(
        path,
        model,
        round_number=round_number,
        before_rename=lambda: failpoint("while_saving"),
        hashed=False,
    )
