"""Clipping a site's update: its delta (trained - global), all tensors together, cut to L2 norm `clip`.

The norm is computed a slice at a time in float64, so a 100 MB update needs a few MB more, and
the factor min(1, clip / norm) then scales every value of the delta: the scaled delta's norm is
at most `clip`, whatever the site sent. The aggregator clips every update it sums
(`source_clip_factor`, then `add_clipped` slice by slice), so the guarantee does not rest on a
site's honesty; a site clips its own before it uploads (`clipped_model`), so that an honest
site's update arrives as the aggregator will use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]
Float64Array = npt.NDArray[np.float64]
SLICE_ELEMENTS = 2**18  # values squared at a time: float64 temporaries of 2 MB, kept in cache


class SliceReader(Protocol):
    """A model's tensors readable a slice at a time (`foedus.aggregator.fedavg.TensorSource` is one)."""

    def read(self, name: str, start: int, stop: int) -> Array:
        """Elements [start, stop) of tensor `name`, flattened in C order, in its own dtype."""
        ...


class _Arrays:
    """A SliceReader over arrays in memory."""

    def __init__(self, tensors: Mapping[str, Array]) -> None:
        self._tensors = tensors

    def read(self, name: str, start: int, stop: int) -> Array:
        values: Array = np.asarray(self._tensors[name]).reshape(-1)[start:stop]
        return values


def factor_for(norm: float, clip: float) -> float:
    """min(1, clip / norm): what scales a delta of L2 norm `norm` to at most `clip`.

    A delta that is not finite (NaN or infinite values) is scaled to nothing: it cannot be
    bounded, so it must not move the model.
    """
    if not clip > 0 or not math.isfinite(clip):
        raise ValueError(f"clip is a finite number > 0, not {clip}")
    if not math.isfinite(norm):
        return 0.0
    return 1.0 if norm <= clip else clip / norm


def delta_norm(
    reference: Mapping[str, Array],
    trained: SliceReader,
    *,
    slice_elements: int = SLICE_ELEMENTS,
) -> float:
    """The L2 norm of trained - reference over every tensor of `reference`, in float64.

    NaN or infinity when the delta has a value that is not finite.
    """

    def deltas() -> Iterator[Float64Array]:
        for name in sorted(reference):
            base = np.asarray(reference[name]).reshape(-1)
            for start in range(0, base.size, slice_elements):
                stop = min(start + slice_elements, base.size)
                yield _delta(trained.read(name, start, stop), base[start:stop])

    return _norm(deltas)


def source_clip_factor(
    reference: Mapping[str, Array],
    trained: SliceReader,
    clip: float,
    *,
    slice_elements: int = SLICE_ELEMENTS,
) -> float:
    """The factor that clips trained - reference to L2 norm `clip` (`factor_for` its norm)."""
    return factor_for(delta_norm(reference, trained, slice_elements=slice_elements), clip)


def model_clip_factor(
    reference: Mapping[str, Array], trained: Mapping[str, Array], clip: float
) -> float:
    """The factor that clips trained - reference to L2 norm `clip`, both models in memory."""
    return source_clip_factor(reference, _Arrays(trained), clip)


def clip_factor(
    delta: Mapping[str, Array], clip: float, *, slice_elements: int = SLICE_ELEMENTS
) -> float:
    """The factor that clips `delta` (all its tensors together) to L2 norm `clip`."""

    def values() -> Iterator[Float64Array]:
        for name in sorted(delta):
            flat = np.asarray(delta[name]).reshape(-1)
            for start in range(0, flat.size, slice_elements):
                yield flat[start : start + slice_elements].astype(np.float64)

    return factor_for(_norm(values), clip)


def _norm(slices: Callable[[], Iterator[Float64Array]]) -> float:
    """The L2 norm of the values `slices()` yields; NaN or infinity if one is not finite.

    Squares that overflow float64 (values past 1e154) are summed again scaled by the largest
    value (two more passes, only then), so finite values have a finite norm. The sums are
    numpy's own (`einsum`), not BLAS's `dot`: OpenBLAS spreads a dot over threads of its own,
    which spin against each other when several sites' threads clip at once (`make bench`'s dp
    part: 8 sites' clipping took 9-11 s of CPU through BLAS, 0.6 s without), and its sum's order
    follows its thread count.
    """
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # an infinite total is handled below
        for values in slices():
            total += float(np.einsum("i,i->", values, values))
    if math.isfinite(total) or math.isnan(total):
        return math.sqrt(total)
    largest = max(
        (float(np.max(np.abs(values))) for values in slices() if values.size), default=0.0
    )
    if not math.isfinite(largest):
        return largest
    scaled = 0.0
    for values in slices():
        unit = values / largest
        scaled += float(np.einsum("i,i->", unit, unit))
    return largest * math.sqrt(scaled)


def add_clipped(total: Float64Array, trained: Array, reference: Array, factor: float) -> None:
    """Add factor x (trained - reference) to `total` in place (slices of one tensor, in float64).

    A factor of 0 (an update that is not finite) adds nothing: 0 x NaN would be NaN.
    """
    if factor == 0:
        return
    delta = _delta(trained, reference)
    delta *= factor
    total += delta


def clipped_model(
    reference: Mapping[str, Array], trained: Mapping[str, Array], clip: float
) -> dict[str, Array]:
    """`trained` with its delta from `reference` clipped to L2 norm `clip`, in trained's dtypes.

    What a site uploads: reference + factor x (trained - reference), rounded to each tensor's
    dtype (so the norm may pass `clip` by a rounding; the aggregator clips again). Unchanged
    (the same arrays) when the delta is within `clip`, or not finite: the aggregator refuses
    NaN and infinity as in any federation (or, allowing them, gives that update no weight).
    """
    factor = model_clip_factor(reference, trained, clip)
    if factor in (0.0, 1.0):
        return dict(trained)
    clipped: dict[str, Array] = {}
    scratch: Float64Array = np.empty(SLICE_ELEMENTS, dtype=np.float64)
    for name, values in trained.items():
        array = np.asarray(values)
        flat = array.reshape(-1)
        base = np.asarray(reference[name]).reshape(-1)
        out = np.empty(flat.size, dtype=array.dtype)
        for start in range(0, flat.size, SLICE_ELEMENTS):
            stop = min(start + SLICE_ELEMENTS, flat.size)
            if array.dtype in _NATIVE:
                _scale_native(flat[start:stop], base[start:stop], factor, out[start:stop])
            else:
                _scale_in_float64(
                    flat[start:stop], base[start:stop], factor, out[start:stop], scratch
                )
        clipped[name] = out.reshape(array.shape)
    return clipped


# The dtypes a site clips in their own arithmetic: three passes of native SIMD loops, where a
# float64 detour made a 100 MB float32 model's clip 0.27 s of the site's CPU (0.04 s native).
_NATIVE = frozenset({np.dtype(np.float32), np.dtype(np.float64)})


def _scale_native(trained: Array, base: Array, factor: float, out: Array) -> None:
    """out = base + factor x (trained - base) in the slices' own dtype: each step rounded to it,
    so the delta's norm may pass the clip by a few units in the last place (the aggregator,
    clipping again in float64, takes that off)."""
    np.subtract(trained, base, out=out)
    np.multiply(out, out.dtype.type(factor), out=out)
    np.add(out, base, out=out)


def _scale_in_float64(
    trained: Array, base: Array, factor: float, out: Array, scratch: Float64Array
) -> None:
    """out = base + factor x (trained - base) computed in float64 and rounded once to out's
    dtype (bfloat16, float16: too coarse to round each step), in `scratch`, a buffer kept in
    cache (a whole 100 MB model in float64 was 200 MB of new pages)."""
    moved = scratch[: trained.size]
    np.copyto(moved, trained)
    np.subtract(moved, base, out=moved)
    moved *= factor
    np.add(moved, base, out=moved)
    np.copyto(out, moved, casting="unsafe")


def _delta(trained: Array, reference: Array) -> Float64Array:
    """trained - reference in float64, a new array (the reference cast value by value as the
    subtraction reads it, no copy of it made)."""
    delta: Float64Array = np.asarray(trained).astype(np.float64)
    np.subtract(delta, reference, out=delta)
    return delta
