"""What every lossy code takes and gives: a 1-D float32 array of finite values, and the names in its messages.

An encoder refuses a NaN or an infinity with a `ValueError` naming its position (the site's own
bug, caught before anything is sent); a decoder refuses one read from a payload.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]
Payload = bytes | bytearray | memoryview


def label(name: str) -> str:
    """How a message names the tensor: `tensor 'fc.weight'`, or `a tensor` when unnamed."""
    return f"tensor {name!r}" if name else "a tensor"


def float32_vector(values: npt.NDArray[np.generic], *, name: str = "") -> Float32Array:
    """`values` as the contiguous 1-D float32 array a lossy code encodes; `ValueError` for
    another dtype or shape, or for a NaN or infinity (naming its position)."""
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
        got = f"{values.dtype} {values.shape}" if isinstance(values, np.ndarray) else type(values)
        raise ValueError(
            f"{label(name)}: a lossy code encodes a 1-D float32 array (the tensor flattened in "
            f"C order), got {got}"
        )
    position = first_nonfinite(values)
    if position is not None:
        raise ValueError(
            f"{label(name)}: value at position {position} is {values[position]}: a NaN or an "
            "infinity cannot be encoded (the training diverged, or the update was computed wrong)"
        )
    vector: Float32Array = np.ascontiguousarray(values)
    return vector


def first_nonfinite(values: npt.NDArray[np.generic]) -> int | None:
    """The position of the first NaN or infinity in the 1-D `values`, or None.

    A sum first, since NaN and infinities survive it; element by element only if it is not
    finite (a sum of large finite values may overflow).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.add.reduce(values))):
            return None
    finite = np.isfinite(values)
    if finite.all():
        return None
    return int(np.argmin(finite))


def checked_count(count: int) -> int:
    """The element count a decoder is given by its caller (the tensor's shape in the caller's
    own model): `ValueError` unless a non-negative integer."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"a decoder needs the tensor's element count, >= 0; got {count!r}")
    return int(count)


def byte_view(payload: Payload) -> memoryview:
    """`payload` as a flat memoryview of bytes (no copy)."""
    view = memoryview(payload)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
