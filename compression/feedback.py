"""Error feedback for lossy uploads: what a code left out of one round's update is sent in the next.

A site sends encode(delta + residual) and keeps residual' = (delta + residual) - decode(sent)
(Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error feedback fixes SignSGD"), so
over the rounds the aggregator receives the sum of the deltas but for the last residual: a
lossy code delays part of an update, it does not lose it.

The residuals are the site's durable state (`ResidualStore`): saved before the upload leaves
the site, one file a round, so a site killed with -9 and restarted that trains round r again
reads the same residuals as the first time (the newest saved before r) and sends the very same
bytes. A file is never pickle: a header (its round, the tensors' names and shapes as JSON), the
float32 values little-endian, and a BLAKE3 digest of the whole, checked on load (files of
version 1, BLAKE2b's, are still read: BLAKE2b hashed at 0.6 GB/s here, BLAKE3 at 3-4, as
`foedus.aggregator.digest` measured, and a site saves and loads its model's size every round).
A store keeps what it saved last, so the next round's load takes it from memory; a restarted
site reads the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import numpy as np
import numpy.typing as npt

from foedus.compression.vectors import Float32Array
from foedus.durable.files import is_temporary, make_folders, numbered_files, replace_file

RESIDUALS_MODE = 0o600  # a site's residuals tell of its update, as the update does
MAGIC = b"foedus residuals v2\n"  # what `save` writes: a BLAKE3 digest
MAGIC_V1 = b"foedus residuals v1\n"  # read still: a BLAKE2b digest
_LENGTH = struct.Struct("<I")  # the JSON header's bytes
_DIGEST_BYTES = 32


def _blake3(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def _blake2b(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_BYTES).digest()


_DIGESTS = {MAGIC: _blake3, MAGIC_V1: _blake2b}
_MAX_HEADER = 1 << 26  # 64 MB of names and shapes: far past any model's
_NAME = re.compile(r"residuals-([0-9]{1,18})\.f32")


class ResidualsFileError(ValueError):
    """A residuals file that cannot be trusted (torn, corrupt, another's); the message names it."""


def compensated(delta: Float32Array, residual: Float32Array | None) -> Float32Array:
    """What a lossy code is given for a tensor: this round's delta plus the residual the site kept
    (None for none yet: the delta itself); `ValueError` when their shapes or dtypes differ."""
    _check_float32(delta, "delta")
    if residual is None:
        return delta
    _check_float32(residual, "residual")
    if residual.shape != delta.shape:
        raise ValueError(
            f"a residual of shape {residual.shape} for a delta of shape {delta.shape}: a tensor's "
            "shape never changes in a federation"
        )
    total: Float32Array = np.add(delta, residual, dtype=np.float32)
    return total


def residual_after(compensated: Float32Array, decoded: Float32Array) -> Float32Array:
    """What the code left out, kept for the next round: `compensated` - decode(encode(it))."""
    _check_float32(compensated, "compensated delta")
    _check_float32(decoded, "decoded delta")
    if decoded.shape != compensated.shape:
        raise ValueError(f"decoded shape {decoded.shape} is not {compensated.shape}")
    left: Float32Array = np.subtract(compensated, decoded, dtype=np.float32)
    return left


def _check_float32(array: npt.NDArray[np.generic], what: str) -> None:
    """`ValueError` unless `array` is a float32 array (error feedback is float32 throughout)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        got = array.dtype if isinstance(array, np.ndarray) else type(array)
        raise ValueError(f"error feedback works on float32 arrays; the {what} is {got}")


class ResidualStore:
    """A site's residuals, a file a round in `folder` (`residuals-ROUND.f32`), the newest two kept."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # The round and residuals saved last by this store: the next load's, without a read.
        self._saved: tuple[int, dict[str, Float32Array]] | None = None

    def path(self, round_number: int) -> Path:
        """The file of round `round_number`'s residuals."""
        return self.folder / f"residuals-{round_number}.f32"

    def rounds(self) -> list[int]:
        """The rounds whose residuals are on disk, oldest first."""
        try:
            return numbered_files(self.folder, _NAME)
        except OSError as error:
            raise ResidualsFileError(
                f"{self.folder}: cannot list this site's residuals: {error.strerror or error}"
            ) from None

    def load(self, round_number: int) -> dict[str, Float32Array]:
        """The residuals saved for the newest round before `round_number` (nothing when none);
        `ResidualsFileError` naming the file when it is torn, corrupt or not one of ours."""
        _check_round(round_number)
        before = [number for number in self.rounds() if number < round_number]
        if not before:
            return {}
        saved = self._saved
        if saved is not None and saved[0] == before[-1]:
            return dict(saved[1])
        return read_residuals(self.path(before[-1]), before[-1])

    def save(self, round_number: int, residuals: Mapping[str, Float32Array]) -> None:
        """Keep `residuals` as round `round_number`'s, atomically and durably, before the upload
        they follow is sent; then remove every other round's file but the newest before it (a
        round trained again after a restart needs it; a later round's is superseded). The
        arrays are kept, not copied, for the next load: callers never change them."""
        _check_round(round_number)
        header: dict[str, Any] = {"round": round_number, "dtype": "<f4", "tensors": []}
        arrays: list[Float32Array] = []
        for name, residual in residuals.items():
            if not isinstance(name, str):
                raise ValueError(f"residuals are keyed by tensor name; got {name!r}")
            _check_float32(residual, f"residual of {name!r}")
            header["tensors"].append([name, list(residual.shape)])
            arrays.append(np.ascontiguousarray(residual, dtype="<f4"))
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")

        def write(file: BinaryIO) -> None:
            digest = blake3.blake3()
            for part in (MAGIC, _LENGTH.pack(len(encoded)), encoded):
                digest.update(part)
                file.write(part)
            for array in arrays:
                data = array.reshape(-1).view(np.uint8).data  # flat bytes, also of (0, 3)
                digest.update(data)
                file.write(data)
            file.write(digest.digest())

        make_folders(self.folder)
        self._saved = None  # until the file is in place
        replace_file(self.path(round_number), write, mode=RESIDUALS_MODE)
        self._saved = (
            round_number,
            {
                name: array.reshape(np.shape(residual))
                for (name, residual), array in zip(residuals.items(), arrays, strict=True)
            },
        )
        self._prune(round_number)

    def _prune(self, round_number: int) -> None:
        """Remove the files `save` no longer needs, and temporaries a crash left (a removal
        that comes back after a crash is harmless: `load` reads the newest before its round)."""
        before = [number for number in self.rounds() if number < round_number]
        keep = {self.path(round_number).name, *(self.path(n).name for n in before[-1:])}
        for entry in self.folder.iterdir():
            ours = _NAME.fullmatch(entry.name) or (
                is_temporary(entry) and _NAME.fullmatch(entry.name[1:].rsplit(".", 2)[0])
            )
            if ours and entry.name not in keep:
                entry.unlink(missing_ok=True)


def _check_round(round_number: int) -> None:
    """`ValueError` unless a round number (an integer >= 0)."""
    if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
        raise ValueError(f"a round number is an integer >= 0; got {round_number!r}")


def read_residuals(path: Path, round_number: int) -> dict[str, Float32Array]:
    """The residuals in `path`, which must be round `round_number`'s; `ResidualsFileError`
    naming the file for anything but a whole, intact file of that round."""
    try:
        with path.open("rb") as file:
            data = bytearray(file.read())
    except OSError as error:
        raise ResidualsFileError(
            f"{path}: cannot read this site's residuals: {error.strerror or error}"
        ) from None

    def refuse(reason: str) -> ResidualsFileError:
        return ResidualsFileError(
            f"{path}: not an intact residuals file ({reason}); it is this site's error feedback: "
            "restore it, or remove the folder's residuals to start the feedback again from zero"
        )

    floor = len(MAGIC) + _LENGTH.size + _DIGEST_BYTES
    digest = _DIGESTS.get(bytes(data[: len(MAGIC)]))
    if len(data) < floor or digest is None:
        raise refuse(f"{len(data)} bytes, not starting with {MAGIC!r} (or {MAGIC_V1!r})")
    body = memoryview(data)[: len(data) - _DIGEST_BYTES]
    if digest(body) != data[len(body) :]:
        raise refuse("its digest does not match: torn or altered")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if length > min(_MAX_HEADER, len(body) - start):
        raise refuse(f"a header of {length} bytes")
    try:
        header = json.loads(bytes(body[start : start + length]).decode("utf-8"))
        tensors = _tensors(header, round_number)
    except (ValueError, KeyError, TypeError) as error:
        raise refuse(f"its header: {error}") from None
    offset = start + length
    expected = offset + 4 * sum(math.prod(shape) for _, shape in tensors)
    if expected != len(body):
        raise refuse(f"{len(body)} bytes before its digest where its header says {expected}")
    residuals: dict[str, Float32Array] = {}
    for name, shape in tensors:
        size = math.prod(shape)
        values = np.frombuffer(body, dtype="<f4", count=size, offset=offset)
        residuals[name] = values.astype(np.float32, copy=False).reshape(shape)
        offset += 4 * size
    return residuals


def _tensors(header: Any, round_number: int) -> list[tuple[str, tuple[int, ...]]]:
    """The (name, shape) pairs of a residuals file's header; ValueError or TypeError otherwise."""
    if not isinstance(header, dict) or set(header) != {"round", "dtype", "tensors"}:
        raise ValueError("not a residuals header")
    number = header["round"]
    if type(number) is not int or number != round_number or header["dtype"] != "<f4":
        raise ValueError(f"round {number!r} of {header['dtype']!r} in round {round_number}'s file")
    tensors: list[tuple[str, tuple[int, ...]]] = []
    for entry in header["tensors"]:
        name, shape = entry
        if not isinstance(name, str) or not all(
            type(size) is int and 0 <= size < 1 << 40 for size in shape
        ):
            raise TypeError(f"tensor {name!r} of shape {shape!r}")
        tensors.append((name, tuple(shape)))
    if len({name for name, _ in tensors}) != len(tensors):
        raise ValueError("a tensor named twice")
    return tensors
