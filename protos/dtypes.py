"""The dtypes tensors travel in, and what kind of values each holds; plain numpy, no protobuf.

Every dtype of `EXACT_DTYPES` travels as its little-endian bytes under its numpy dtype string
(float32 as OpenFL's encoding, with no name). bfloat16, which numpy knows only through
`ml_dtypes` (whose dtype string, ``<V2``, says nothing), travels as its 2-byte values under the
name ``bfloat16``. It is recognised by its dtype's name, so `ml_dtypes` is imported only where a
bfloat16 tensor is decoded (its import takes half a second, and most models have none).
"""

from __future__ import annotations

import numpy as np

# Little-endian dtype strings we put on the wire; anything else is refused when decoding.
EXACT_DTYPES = frozenset(
    np.dtype(name).newbyteorder("<").str
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
)
FLOAT32 = np.dtype("<f4")
BFLOAT16 = "bfloat16"  # foedus_dtype of bfloat16 tensors


def wire_dtype(dtype: np.dtype[np.generic]) -> str | None:
    """The `foedus_dtype` an array of `dtype` travels under ("" for float32), None if none."""
    if is_bfloat16(dtype):
        return BFLOAT16
    little = dtype.newbyteorder("<")
    if dtype.kind not in "biuf" or little.str not in EXACT_DTYPES:
        return None
    return "" if little == FLOAT32 else little.str


def is_bfloat16(dtype: np.dtype[np.generic]) -> bool:
    """Whether `dtype` is `ml_dtypes.bfloat16` (known by name: no import of ml_dtypes needed)."""
    return dtype.kind == "V" and dtype.name == BFLOAT16 and dtype.itemsize == 2


def is_float(dtype: np.dtype[np.generic]) -> bool:
    """Whether `dtype` holds floating-point values, bfloat16 included: averaged as floats, checked for NaN."""
    return dtype.kind == "f" or is_bfloat16(dtype)


def bfloat16_dtype() -> np.dtype[np.generic]:
    """numpy's bfloat16 dtype, from `ml_dtypes` (imported here, at the first use)."""
    import ml_dtypes  # noqa: PLC0415

    dtype: np.dtype[np.generic] = np.dtype(ml_dtypes.bfloat16)
    return dtype
