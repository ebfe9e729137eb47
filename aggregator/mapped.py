"""Arrays mapped from files, and copying their bytes without reading them through the mapping.

The aggregator holds models and updates as `np.memmap`s of the files they are stored in. Pages
read through a mapping count in the process's resident memory until it is unmapped, so where a
mapped tensor's bytes go to another file (a model file saved, the model's chunks spooled) they
are copied from file to file in the kernel (`os.copy_file_range`), or through a small buffer
where the kernel cannot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

COPY_BYTES: Final = 1024 * 1024  # what is copied at a time where the kernel cannot copy files
# Linux only: a copy between files that never leaves the kernel.
_copy_file_range = getattr(os, "copy_file_range", None)


@dataclass(frozen=True)
class FileRange:
    """`size` bytes of the open file `descriptor` from `offset`."""

    descriptor: int
    offset: int
    size: int


@contextmanager
def mapped_range(
    array: npt.NDArray[np.generic],
    data: npt.NDArray[np.generic],
    *,
    opened: Mapping[str, int] | None = None,
) -> Iterator[FileRange | None]:
    """Where the bytes of `data` lie when `array` is them, mapped from a file: that file open for
    the block (or kept open in `opened`, by path, from before it was tidied away); None when they
    are not, or the file is gone (read them through the mapping then).

    `data` is `array` as it is encoded (`foedus.protos.codec.tensor_field_frame`): the same bytes
    when it has the same dtype and `array` is C-ordered.
    """
    if not (
        isinstance(array, np.memmap)
        and array.filename is not None
        and array.dtype == data.dtype
        and array.flags.c_contiguous
        and data.nbytes
    ):
        yield None
        return
    kept = None if opened is None else opened.get(os.fspath(array.filename))
    if kept is not None:
        yield FileRange(kept, int(array.offset), data.nbytes)
        return
    try:
        descriptor = os.open(array.filename, os.O_RDONLY)
    except OSError:  # gone (a round's file tidied away, say): the mapping still holds it
        yield None
        return
    try:
        yield FileRange(descriptor, int(array.offset), data.nbytes)
    finally:
        os.close(descriptor)


def open_files(arrays: Iterable[npt.NDArray[np.generic]]) -> dict[str, int]:
    """The files `arrays` are mapped from, each opened once for reading, by path: what can be
    read after the files are tidied away (the caller closes them); files already gone left out."""
    opened: dict[str, int] = {}
    for array in arrays:
        filename = array.filename if isinstance(array, np.memmap) else None
        path = None if filename is None else os.fspath(filename)
        if path is not None and path not in opened:
            try:
                opened[path] = os.open(path, os.O_RDONLY)
            except OSError:  # gone already: read through the mapping
                continue
    return opened


def write_all(descriptor: int, data: bytes | memoryview) -> int:
    """Write all of `data` at the file's position; the bytes written."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(descriptor, view[done:])
    return done


def copy_range(source: FileRange, target: int) -> None:
    """Append `source` to the file `target` (at its position): in the kernel where it can."""
    done = 0
    while _copy_file_range is not None and done < source.size:
        try:
            copied = _copy_file_range(
                source.descriptor, target, source.size - done, source.offset + done
            )
        except OSError:  # not between these files (another file system, an old kernel)
            break
        if copied == 0:
            raise OSError(0, "the file ends before the range to copy does")
        done += copied
    while done < source.size:
        block = os.pread(
            source.descriptor, min(COPY_BYTES, source.size - done), source.offset + done
        )
        if not block:
            raise OSError(0, "the file ends before the range to copy does")
        done += write_all(target, block)
