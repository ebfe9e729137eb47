"""Masks: AES-256-CTR keystreams read as ring elements, and the masked vector's layout.

PRG(key) is the AES-256-CTR keystream under a 32-byte key, counter block 0 first (nonce 0: each
key masks one vector once), read as little-endian unsigned elements of the ring. Element i of
the stream is bytes [i * width, (i + 1) * width), so any slice is computed alone: the counter
starts at the slice's first block. The stream is made by `cryptography` in blocks of a few MB
into one preallocated buffer (OpenSSL's AES-NI runs at GB/s), never element by element.

The masked vector is the model's tensors in sorted name order, each flattened in C order, then
the weight element: `VectorLayout` gives each tensor's [start, stop) in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from foedus.secure.context import WEIGHT_TENSOR
from foedus.secure.ring import RingArray

_BLOCK = 16  # AES's block, the counter's step
_CHUNK = 4 << 20  # bytes of keystream per call into OpenSSL
_ZEROS = bytes(_CHUNK)  # encrypted, zeros are the keystream itself
# Bytes of each key's keystream per step when several masks are added at once (`add_masks`):
# the target's window and the keystream stay in the processor's cache.
_FUSED = 1 << 20


def _check(key: bytes, start: int, stop: int) -> None:
    if len(key) != 32:
        raise ValueError("a mask key is 32 bytes (AES-256)")
    if not 0 <= start <= stop:
        raise ValueError(f"a keystream slice is 0 <= start <= stop, not [{start}, {stop})")


def _pieces(key: bytes, start: int, stop: int, ring: np.dtype[Any]) -> Iterator[RingArray]:
    """Elements [start, stop) of PRG(key) in consecutive pieces of about 4 MB, each a view of one
    buffer that the next piece overwrites (use a piece before asking for the next)."""
    width = ring.itemsize
    first_block, skip = divmod(start * width, _BLOCK)
    remaining = stop * width - first_block * _BLOCK
    encryptor = Cipher(
        algorithms.AES(key), modes.CTR(first_block.to_bytes(_BLOCK, "big"))
    ).encryptor()
    # update_into wants room for a block more than it writes.
    buffer = np.empty(min(remaining, _CHUNK) + _BLOCK, dtype=np.uint8)
    out = memoryview(buffer)  # type: ignore[arg-type]
    zeros = memoryview(_ZEROS)
    while remaining > 0:
        count = min(_CHUNK, remaining)
        encryptor.update_into(zeros[:count], out)
        yield buffer[skip:count].view(ring)
        remaining -= count
        skip = 0


def keystream(key: bytes, start: int, stop: int, dtype: npt.DTypeLike) -> RingArray:
    """Elements [start, stop) of PRG(key) as `dtype` (unsigned); a start mid-block works."""
    _check(key, start, stop)
    ring = np.dtype(dtype).newbyteorder("<")
    stream = np.empty(stop - start, dtype=ring)
    offset = 0
    for piece in _pieces(key, start, stop, ring):
        stream[offset : offset + piece.size] = piece
        offset += piece.size
    return stream


def add_mask(target: RingArray, key: bytes, start: int, *, subtract: bool = False) -> None:
    """Add (or subtract) PRG(key)'s elements [start, start + target.size) to `target`, in place,
    a few MB of keystream at a time (numpy wraps modulo 2^bits: the ring's addition).

    `target` is flat (1-d) and its dtype is the ring's.
    """
    _check(key, start, start + target.size)
    operation = np.subtract if subtract else np.add
    offset = 0
    for piece in _pieces(key, start, start + target.size, target.dtype):
        window = target[offset : offset + piece.size]
        operation(window, piece, out=window)
        offset += piece.size


def add_masks(target: RingArray, masks: Sequence[tuple[bytes, bool]], start: int) -> None:
    """`add_mask` of every (key, subtract) of `masks` at once, the same elements in the end: a
    MB of `target` at a time under every key in turn, so `target` is read and written once while
    it is in the processor's cache, not once per mask from memory.
    """
    stop = start + target.size
    for key, _ in masks:
        _check(key, start, stop)
    width = target.dtype.itemsize
    first_block, skip = divmod(start * width, _BLOCK)
    counter = first_block.to_bytes(_BLOCK, "big")
    streams = [
        (Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor(), subtract)
        for key, subtract in masks
    ]
    remaining = stop * width - first_block * _BLOCK
    # update_into wants room for a block more than it writes.
    buffer = np.empty(min(remaining, _FUSED) + _BLOCK, dtype=np.uint8)
    out = memoryview(buffer)  # type: ignore[arg-type]
    zeros = memoryview(_ZEROS)
    offset = 0
    while remaining > 0:
        count = min(_FUSED, remaining)
        size = (count - skip) // width  # skip and count are whole elements (width divides 16)
        window = target[offset : offset + size]
        piece = buffer[skip:count].view(target.dtype)
        for encryptor, subtract in streams:
            encryptor.update_into(zeros[:count], out)
            (np.subtract if subtract else np.add)(window, piece, out=window)
        offset += size
        remaining -= count
        skip = 0


@dataclass(frozen=True)
class VectorLayout:
    """Where each tensor of a model lies in the masked vector, and the weight element after them."""

    slices: Mapping[str, tuple[int, int]]  # tensor name -> [start, stop) in the vector
    weight: int  # the weight element's offset: the model's size in elements

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[int, ...]]) -> VectorLayout:
        """The layout of a model with these tensor shapes (name -> shape)."""
        if WEIGHT_TENSOR in shapes:
            raise ValueError(f"a model tensor may not be named {WEIGHT_TENSOR!r} in secure rounds")
        slices: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in sorted(shapes):
            size = int(np.prod(shapes[name], dtype=np.int64))
            slices[name] = (offset, offset + size)
            offset += size
        return cls(slices=slices, weight=offset)

    @classmethod
    def of_arrays(cls, arrays: Mapping[str, npt.NDArray[Any]]) -> VectorLayout:
        """The layout of a model given as arrays (their shapes)."""
        return cls.of({name: tuple(array.shape) for name, array in arrays.items()})

    @property
    def length(self) -> int:
        """The vector's length: every tensor's elements and the weight element."""
        return self.weight + 1
