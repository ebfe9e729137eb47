"""Model files (`last_model.pbuf`, `best_model.pbuf`, an `aggregator.initial_model`) as numpy arrays.

A foedus model file is an OpenFL `ModelProto`. Reading and writing one belongs to
`foedus.aggregator.storage` (the one reader and the one writer of the format: every tensor checked
as an upload is, written atomically); this module is its small public face for people who want their
model out (or a model of their own in), with nothing to know about protobuf:

    from foedus import model
    arrays = model.load("best_model.pbuf")    # {name: numpy array}, writable, in the file's order
    model.save("initial.pbuf", arrays)        # a file `aggregator.initial_model` accepts

The reader stays in the aggregator rather than moving below it: it reads a file a block at a time
and maps large tensors from it (`foedus.aggregator.upload`, `foedus.aggregator.mapped`), machinery
the aggregator's state shares, and none of it imports gRPC. bfloat16 tensors come back as
`ml_dtypes.bfloat16` arrays, every other dtype as numpy's own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from foedus.aggregator.storage import read_model, write_model
from foedus.plans.schema import Limits
from foedus.refusals.errors import ModelFileError, StorageError

__all__ = ["MAX_TENSOR_BYTES", "Array", "ModelFileError", "StorageError", "load", "save"]

Array = npt.NDArray[np.generic]
# The largest tensor read unless the caller says otherwise: what an aggregator accepts by default.
MAX_TENSOR_BYTES: Final = Limits().max_tensor_bytes


def load(
    path: str | os.PathLike[str],
    *,
    copy: bool = True,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
) -> dict[str, Array]:
    """The tensors of the model file at `path`, by name in the file's order, as writable arrays.

    `copy=False` gives read-only arrays mapped from the file instead (large tensors are not
    read into memory until used): for looking, not training. A file that is missing, is not a
    model file, is cut short, or holds a tensor over `max_tensor_bytes` raises `ModelFileError`,
    whose one line names the file and what is wrong.
    """
    tensors = read_model(Path(path), max_tensor_bytes)
    if not copy:
        return tensors
    return {name: np.array(array, copy=True) for name, array in tensors.items()}


def save(path: str | os.PathLike[str], arrays: Mapping[str, npt.ArrayLike]) -> None:
    """Write `arrays` to `path` as a model file, atomically: a crash leaves the old file or the
    new one. Any dtype foedus sends (floats, bfloat16, integers, bool); `StorageError`, naming
    the file, for an empty model, a tensor without a name or of another dtype, or a failed write.
    """
    target = Path(path)
    if not arrays:
        raise StorageError(f"{target}: a model needs at least one tensor")
    model: dict[str, Array] = {}
    for name, values in arrays.items():
        if not isinstance(name, str) or not name:
            raise StorageError(f"{target}: tensor names must be non-empty strings, got {name!r}")
        model[name] = np.asarray(values)
    try:
        write_model(target, model, hashed=False)
    except StorageError as error:
        message = str(error)
        if message.startswith(f"{target}:"):
            raise
        raise StorageError(f"{target}: {message}") from None
