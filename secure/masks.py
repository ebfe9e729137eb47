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

from collections.abc import Mapping
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


def keystream(key: bytes, start: int, stop: int, dtype: npt.DTypeLike) -> RingArray:
    """Elements [start, stop) of PRG(key) as `dtype` (unsigned); a start mid-block works."""
    ring = np.dtype(dtype).newbyteorder("<")
    if len(key) != 32:
        raise ValueError("a mask key is 32 bytes (AES-256)")
    if not 0 <= start <= stop:
        raise ValueError(f"a keystream slice is 0 <= start <= stop, not [{start}, {stop})")
    width = ring.itemsize
    first_byte, end_byte = start * width, stop * width
    first_block = first_byte // _BLOCK
    skip = first_byte - first_block * _BLOCK
    size = end_byte - first_block * _BLOCK
    # update_into wants room for a block more than it writes.
    buffer = np.empty(size + _BLOCK, dtype=np.uint8)
    out = memoryview(buffer)  # type: ignore[arg-type]
    encryptor = Cipher(
        algorithms.AES(key), modes.CTR(first_block.to_bytes(_BLOCK, "big"))
    ).encryptor()
    zeros = memoryview(_ZEROS)
    offset = 0
    while offset < size:
        count = min(_CHUNK, size - offset)
        encryptor.update_into(zeros[:count], out[offset:])
        offset += count
    return buffer[skip : skip + (stop - start) * width].view(ring)


def add_mask(target: RingArray, key: bytes, start: int, *, subtract: bool = False) -> None:
    """Add (or subtract) PRG(key)'s elements [start, start + target.size) to `target`, in place.

    `target` is flat (a C-contiguous 1-d view): its dtype is the ring's; numpy wraps modulo 2^bits.
    """
    stream = keystream(key, start, start + target.size, target.dtype)
    if subtract:
        np.subtract(target, stream, out=target)
    else:
        np.add(target, stream, out=target)


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
