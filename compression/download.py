"""The global model in a download code: which code each tensor travels in, its lossy payload
encoded a slice at a time, and the very values a site decodes of it (`round_trip`).

`lossless` carries every dtype and gives the same bits back. `bfloat16` and `int8` carry float32
tensors only (the others travel raw, code `none`), and a tensor they cannot carry, a NaN, an
infinity or a value past the code's range (which a plan's `limits.allow_non_finite` lets into a
model), travels raw too: the site must not train on values it was never sent.

A site trains on what it decoded, so under a lossy download code the base of its upload delta
is `round_trip(code, tensor)`, which the aggregator computes from its own model to add the
deltas back to: decoding is deterministic, and both codes work block by block (int8's blocks of
`INT8_BLOCK` values, bfloat16 value by value), so a payload encoded in slices of whole blocks
(`LossyEncoder`, the aggregator's spool in bounded memory) decodes to the values the whole
tensor encoded at once decodes to, bit for bit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from foedus.compression.codes import Code, carried_code
from foedus.compression.quantize import (
    INT8_BLOCK,
    INT8_HEADER_BYTES,
    bfloat16_encode,
    bfloat16_round,
    int8_decode,
    int8_encode,
)
from foedus.compression.vectors import Float32Array

Array = npt.NDArray[np.generic]
# Values encoded at a time by `round_trip`: 4 MiB of float32, a whole number of int8 blocks.
SLICE_VALUES = 1 << 20


class LossyEncoder:
    """One float32 tensor's `bfloat16` or `int8` payload, encoded a slice of values at a time.

    Each `encode` returns the slice's part of the payload's body (bfloat16's 2-byte values,
    int8's byte a value), which follow one another; `head` then gives what comes before the
    body (int8's header and every block's scale, 1.6 % of the body; nothing for bfloat16).
    Every slice but the last holds a whole number of `INT8_BLOCK` values. `ValueError` (from
    the codes) for a value the code cannot carry: the tensor travels raw then.
    """

    def __init__(self, code: Code, *, name: str = "") -> None:
        if code not in (Code.BFLOAT16, Code.INT8):
            raise ValueError(f"{code} is not a lossy download code (bfloat16 or int8)")
        self.code = code
        self.name = name
        self._header = b""
        self._scales: list[bytes] = []
        self._ragged = False  # a slice of a part of a block came: it must be the last

    def encode(self, values: Float32Array) -> bytes:
        """The body of the next slice of the tensor's values (1-D float32, C order)."""
        if self._ragged:
            raise ValueError("only the last slice of a tensor may end inside an int8 block")
        self._ragged = values.size % INT8_BLOCK != 0
        if self.code is Code.BFLOAT16:
            return bfloat16_encode(values, name=self.name)
        payload = int8_encode(values, block=INT8_BLOCK, name=self.name)
        blocks = -(-values.size // INT8_BLOCK)
        self._header = payload[:INT8_HEADER_BYTES]
        codes_start = INT8_HEADER_BYTES + 4 * blocks
        self._scales.append(payload[INT8_HEADER_BYTES:codes_start])
        return payload[codes_start:]

    def head(self) -> bytes:
        """What comes before the body, once every slice is encoded (none for an empty tensor)."""
        if self.code is Code.BFLOAT16:
            return b""
        if not self._header:  # no slice: an empty tensor's payload is the header alone
            self._header = int8_encode(np.empty(0, np.float32), block=INT8_BLOCK)
        return self._header + b"".join(self._scales)


def round_trip(code: Code, array: Array, *, name: str = "") -> Array:
    """What a site decodes of the global tensor `array` sent in the download `code`: decode
    (encode) for a lossy code on float32 values it can carry (a new array, the same shape;
    `bfloat16_round` for bfloat16, the same bits), `array` itself otherwise (`lossless` and
    `none` give the same bits back)."""
    carried = carried_code(code, array.dtype, array.ndim)
    if not carried.lossy:
        return array
    flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    try:
        if carried is Code.BFLOAT16:  # value by value: no payload needed between
            return bfloat16_round(flat, name=name).reshape(array.shape)
        out = np.empty(flat.shape, np.float32)
        for start in range(0, flat.size, SLICE_VALUES):
            values = flat[start : start + SLICE_VALUES]
            decoded = int8_decode(int8_encode(values, name=name), values.size)
            out[start : start + values.size] = decoded
    except ValueError:  # a value the code cannot carry: the tensor travels raw
        return array
    return out.reshape(array.shape)
