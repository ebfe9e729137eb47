"""The aggregator's output folder: models as OpenFL `ModelProto` files, metrics as JSON lines.

Every model file is written atomically (a temporary file in the same folder, written, flushed and
fsynced, then renamed over the old one, then the folder fsynced), so a crash leaves either the old
file or the new one, never half of one. A model file is a serialized `ModelProto` of tensors
encoded with `protos.codec.encode_tensor` in sorted name order: the same model always gives the
same bytes, nothing is pickled, and OpenFL (which saves its models as `.pbuf` ModelProtos too)
reads float32 models. `read_model` validates every tensor as the servicer validates uploads.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from aggregator.errors import ModelFileError, StorageError
from protos import base_pb2
from protos.codec import TensorFormatError, decode_tensor, encode_tensor

Array = npt.NDArray[np.generic]
MODEL_TAG = "model"
LAST_MODEL = "last_model.pbuf"
BEST_MODEL = "best_model.pbuf"
METRICS = "metrics.jsonl"


def model_bytes(model: Mapping[str, Array], *, round_number: int = 0) -> bytes:
    """The serialized `ModelProto` of `model`: deterministic bytes for the same tensors and round."""
    try:
        proto = base_pb2.ModelProto(
            tensors=[
                encode_tensor(name, model[name], round_number=round_number, tags=(MODEL_TAG,))
                for name in sorted(model)
            ]
        )
    except TensorFormatError as error:
        raise StorageError(f"cannot save the model: {error}") from None
    return proto.SerializeToString(deterministic=True)


def write_model(path: Path, model: Mapping[str, Array], *, round_number: int = 0) -> None:
    """Write `model` to `path` as a `ModelProto` file, atomically."""
    write_atomic(path, model_bytes(model, round_number=round_number))


def read_model(path: Path, max_tensor_bytes: int) -> dict[str, Array]:
    """Read and check a `ModelProto` file; `ModelFileError` names the file and what is wrong."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: model file not found") from None
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read model file: {error.strerror or error}") from None
    proto = base_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError as error:
        raise ModelFileError(f"{path}: not a ModelProto file: {error}") from None
    if not proto.tensors:
        raise ModelFileError(f"{path}: not a model file: it holds no tensors")
    model: dict[str, Array] = {}
    for tensor in proto.tensors:
        if not tensor.name:
            raise ModelFileError(f"{path}: a tensor has no name")
        if tensor.name in model:
            raise ModelFileError(f"{path}: tensor {tensor.name!r} appears more than once")
        try:
            model[tensor.name] = decode_tensor(tensor, max_bytes=max_tensor_bytes)
        except TensorFormatError as error:
            raise ModelFileError(f"{path}: {error}") from None
    return model


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves the old file or the new one, whole."""
    folder = path.parent
    try:
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise StorageError(f"{path}: cannot write: {error.strerror or error}") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_folder(folder)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot write: {error.strerror or error}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
            _fsync_folder(path.parent)
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
        write_model(self.last_model, model, round_number=round_number)

    def save_best(self, model: Mapping[str, Array], round_number: int) -> None:
        """Replace `best_model.pbuf`."""
        write_model(self.best_model, model, round_number=round_number)

    def append_metrics(self, row: Mapping[str, object]) -> None:
        """Append one round's row to `metrics.jsonl`."""
        append_json_line(self.metrics, row)


def _fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _finite(value: object) -> object:
    """`value` with NaN and infinities replaced by None, so the line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
