"""The aggregator's output folder: models as OpenFL `ModelProto` files, metrics as JSON lines.

Every model file is written atomically (a temporary file in the same folder, written, flushed and
fsynced, then renamed over the old one, then the folder fsynced), so a crash leaves either the old
file or the new one, never half of one. A model file is a serialized `ModelProto` of tensors
encoded with `protos.codec.encode_tensor` in sorted name order: the same model always gives the
same bytes, nothing is pickled, and OpenFL (which saves its models as `.pbuf` ModelProtos too)
reads float32 models. `read_model` validates every tensor as the servicer validates uploads.
The same format, with each tensor's own tags, holds the task results `aggregator.state` keeps.

The user-facing outputs (`last_model.pbuf`, `best_model.pbuf`, `metrics.jsonl`) are written after
a round is committed to the state, so a crash can leave them one round behind, a temporary file
beside them, or a last line of `metrics.jsonl` cut short; `OutputFolder.remove_temporaries` and
`read_metrics` clean that up, and the runtime writes what is missing again from the state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from aggregator.digest import file_digest, new_digest
from aggregator.failpoints import failpoint
from aggregator.fedavg import SliceSink
from aggregator.mapped import FileRange, copy_range, mapped_range
from aggregator.records import ResultTensor
from aggregator.upload import file_array, read_tensors_file
from durable.files import fsync_folder
from protos import base_pb2
from protos.codec import (
    TensorFormatError,
    TensorFrame,
    encode_tensor,
    tensor_bytes,
    tensor_field_frame,
)
from protos.stream import StreamError
from refusals.errors import ModelFileError, StorageError

Array = npt.NDArray[np.generic]
MODEL_TAG = "model"
LAST_MODEL = "last_model.pbuf"
BEST_MODEL = "best_model.pbuf"
METRICS = "metrics.jsonl"
TEMPORARY_SUFFIX = ".tmp"

logger = logging.getLogger(__name__)
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
    """Write the bytes `tensors_bytes` gives to `path`, atomically; the digest of those bytes (`aggregator.digest`)
    ("" when not `hashed`: the outputs, which the state never names, need none).

    Each tensor's values go from its array to the file as they are, never through a serialized
    copy of the whole model: memory stays at the arrays the caller holds. The values of an array
    mapped from a file are copied from that file in the kernel (`aggregator.mapped`) and hashed
    from where they were written: read through its mapping they would count in our memory.
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

    _write_atomic_with(path, write, before_rename=before_rename)
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

    _write_atomic_with(path, write, before_rename=before_rename)
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


def read_model_tensors(path: Path, max_tensor_bytes: int) -> tuple[ResultTensor, ...]:
    """The checked tensors of a `ModelProto` file, with their tags; `ModelFileError` if bad.

    Read a block at a time, its tensors mapped from the file (small ones read): reading a model
    whole would hold its bytes, their parse and the arrays at once, three times the model.
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
    if not tensors:
        raise ModelFileError(f"{path}: not a model file: it holds no tensors")
    seen: set[str] = set()
    for tensor in tensors:
        if not tensor.name:
            raise ModelFileError(f"{path}: a tensor has no name")
        if tensor.name in seen:
            raise ModelFileError(f"{path}: tensor {tensor.name!r} appears more than once")
        seen.add(tensor.name)
    return tensors


def write_atomic(
    path: Path, data: bytes, *, before_rename: Callable[[], None] | None = None
) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, whole.

    `before_rename` runs once the new bytes are durable in the temporary file (a failpoint).
    """
    _write_atomic_with(path, lambda file: file.write(data), before_rename=before_rename)


def _write_atomic_with(
    path: Path,
    write: Callable[[BinaryIO], object],
    *,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Replace `path` with what `write` writes to a temporary file; see `write_atomic`."""
    folder = path.parent
    try:
        descriptor, temporary = tempfile.mkstemp(
            dir=folder, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX
        )
    except OSError as error:
        raise StorageError(f"{path}: cannot write: {error.strerror or error}") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(temporary, path)
        fsync_folder(folder)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write: {error.strerror or error}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def is_temporary(path: Path, of: str | None = None) -> bool:
    """Whether `path` is a temporary file `write_atomic` left behind (for the file named `of`)."""
    prefix = "." if of is None else f".{of}."
    return path.name.startswith(prefix) and path.name.endswith(TEMPORARY_SUFFIX)


def append_json_line(path: Path, row: Mapping[str, object]) -> None:
    """Append `row` as one JSON line (non-finite numbers as null), flushed and fsynced."""
    line = json.dumps(_finite(row), sort_keys=True, allow_nan=False)
    created = not path.exists()
    try:
        with path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())
        if created:
            fsync_folder(path.parent)
    except OSError as error:
        raise StorageError(f"{path}: cannot append: {error.strerror or error}") from None


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
        write_model(
            self.last_model,
            model,
            round_number=round_number,
            before_rename=lambda: failpoint("while_saving"),
            hashed=False,
        )

    def save_best(self, model: Mapping[str, Array], round_number: int) -> None:
        """Replace `best_model.pbuf`."""
        write_model(
            self.best_model,
            model,
            round_number=round_number,
            before_rename=lambda: failpoint("while_saving"),
            hashed=False,
        )

    def restore_model(self, path: Path, model: Mapping[str, Array], round_number: int) -> bool:
        """Make `path` hold `model` (after a restart); True if it had to be written again.

        Compared by digest (`aggregator.digest`), the file read and the model serialized a piece at a time: holding
        both whole, as bytes, would take twice the model's size.
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

    def append_metrics(self, row: Mapping[str, object]) -> None:
        """Append one round's row to `metrics.jsonl`."""
        append_json_line(self.metrics, row)

    def read_metrics(self) -> list[dict[str, object]]:
        """The rows of `metrics.jsonl`; a last line cut short by a crash is removed first."""
        try:
            data = self.metrics.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as error:
            raise StorageError(f"{self.metrics}: cannot read: {error.strerror or error}") from None
        if data and not data.endswith(b"\n"):
            whole = data.rfind(b"\n") + 1
            logger.warning("%s: removing a last line cut short by a crash", self.metrics)
            try:
                with self.metrics.open("r+b") as file:
                    file.truncate(whole)
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as error:
                raise StorageError(
                    f"{self.metrics}: cannot repair: {error.strerror or error}"
                ) from None
            data = data[:whole]
        rows: list[dict[str, object]] = []
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
            except ValueError:
                logger.warning("%s: line %d is not JSON; left as it is", self.metrics, number)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def remove_temporaries(self) -> None:
        """Remove temporary files of the models that a crash left in the folder."""
        for path in self.root.iterdir():
            if is_temporary(path, LAST_MODEL) or is_temporary(path, BEST_MODEL):
                path.unlink(missing_ok=True)


def _finite(value: object) -> object:
    """`value` with NaN and infinities replaced by None, so the line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
