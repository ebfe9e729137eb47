"""Clipping a site's update: its delta (trained - global), all tensors together, cut to L2 norm `clip`.

The norm is computed a slice at a time in float64, so a 100 MB update needs a few MB more, and
the factor min(1, clip / norm) then scales every value of the delta: the scaled delta's norm is
at most `clip`, whatever the site sent. The aggregator clips every update it sums
(`source_clip_factor`, then `add_clipped` slice by slice), so the guarantee does not rest on a
site's honesty; a site clips its own before it uploads (`clipped_model`; or as it frames the
upload, a slice at a time: `update_clips`, `ClippedValues`), so that an honest site's update
arrives as the aggregator will use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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

    scratch: Float64Array = np.empty(slice_elements, dtype=np.float64)  # a slice's, reused

    def deltas() -> Iterator[Float64Array]:
        for name in sorted(reference):
            base = np.asarray(reference[name]).reshape(-1)
            for start in range(0, base.size, slice_elements):
                stop = min(start + slice_elements, base.size)
                yield _delta(trained.read(name, start, stop), base[start:stop], scratch)

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


def add_clipped(
    total: Float64Array,
    trained: Array,
    reference: Array,
    factor: float,
    *,
    scratch: Float64Array | None = None,
) -> None:
    """Add factor x (trained - reference) to `total` in place (slices of one tensor, in float64;
    the difference made in `scratch`, at least a slice long, when given).

    A factor of 0 (an update that is not finite) adds nothing: 0 x NaN would be NaN.
    """
    if factor == 0:
        return
    delta = _delta(trained, reference, scratch)
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
    A site that sends its update raw clips it as it frames it instead (`Clip`), the same values.
    """
    factor = model_clip_factor(reference, trained, clip)
    if factor in (0.0, 1.0):
        return dict(trained)
    clipped: dict[str, Array] = {}
    for name, values in trained.items():
        array = np.asarray(values)
        made = ClippedValues(array, reference[name], factor)
        out = np.empty(array.size, dtype=array.dtype)
        for start in range(0, array.size, SLICE_ELEMENTS):
            made.values(start, min(start + SLICE_ELEMENTS, array.size), out=out[start:])
        clipped[name] = out.reshape(array.shape)
    return clipped


@dataclass(frozen=True)
class Clip:
    """How a site clips one tensor of its update: reference + factor x (trained - reference),
    `factor` the whole update's (`model_clip_factor`)."""

    reference: Array  # the tensor of the global model the site trained on
    factor: float


def update_clips(
    reference: Mapping[str, Array], trained: Mapping[str, Array], clip: float
) -> dict[str, Clip]:
    """How each tensor of `trained` is clipped to L2 norm `clip` as `clipped_model` clips it;
    empty when nothing is scaled (the delta within `clip`, or not finite)."""
    factor = model_clip_factor(reference, trained, clip)
    if factor in (0.0, 1.0):
        return {}
    return {name: Clip(reference[name], factor) for name in trained}


class ClippedValues:
    """One tensor of a clipped update, made a slice at a time as it is read: the values of
    `clipped_model`, from the trained tensor and the clip, with no clipped copy of the model.

    A site that sends its update raw clips it as the upload is framed
    (`foedus.protos.stream.MadeBytes`): a 100 MB update clipped into a new model first took a
    site 0.27 s of CPU a round here, mostly the faults of the new model's pages. `trained`
    (C order) gives the values' dtype and byte order.
    """

    def __init__(self, trained: Array, reference: Array, factor: float) -> None:
        self._trained = np.asarray(trained).reshape(-1)
        self._reference = np.asarray(reference).reshape(-1)
        self._factor = factor
        self._dtype = self._trained.dtype
        if self._reference.size != self._trained.size:
            raise ValueError(
                f"a tensor of {self._trained.size} values clipped against "
                f"{self._reference.size} of the global model's"
            )

    def __len__(self) -> int:
        """The values' size in bytes."""
        return int(self._trained.nbytes)

    def values(self, start: int, stop: int, *, out: Array | None = None) -> Array:
        """Elements [start, stop) clipped: into the front of `out` when given, else a new array."""
        made = np.empty(stop - start, self._dtype) if out is None else out[: stop - start]
        trained, base = self._trained[start:stop], self._reference[start:stop]
        if self._dtype in _NATIVE:
            _scale_native(trained, base, self._factor, made)
        else:
            scratch: Float64Array = np.empty(stop - start, dtype=np.float64)
            _scale_in_float64(trained, base, self._factor, made, scratch)
        return made

    def bytes_at(self, start: int, stop: int) -> memoryview:
        """Bytes [start, stop) of the clipped values (a value a bound cuts is made whole, then cut)."""
        itemsize = self._dtype.itemsize
        first = start // itemsize
        made = self.values(first, -(-stop // itemsize))
        skipped = start - first * itemsize
        return made.view(np.uint8).data[skipped : skipped + stop - start]


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
    dtype (bfloat16, float16: too coarse to round each step), in `scratch` (a slice's worth:
    a whole 100 MB model in float64 was 200 MB of new pages)."""
    moved = scratch[: trained.size]
    np.copyto(moved, trained)
    np.subtract(moved, base, out=moved)
    moved *= factor
    np.add(moved, base, out=moved)
    np.copyto(out, moved, casting="unsafe")


def _delta(trained: Array, reference: Array, scratch: Float64Array | None = None) -> Float64Array:
    """trained - reference in float64 (the reference cast value by value as the subtraction
    reads it, no copy of it made): in the front of `scratch` when given, else a new array.
    A scratch reused slice after slice spares a new 2 MB array each (0.040 -> 0.033 s of CPU
    per 100 MB of a norm's pass, the same bits)."""
    values = np.asarray(trained)
    if scratch is None:
        delta: Float64Array = values.astype(np.float64)
    else:
        delta = scratch[: values.size]
        np.copyto(delta, values.reshape(-1))
    np.subtract(delta, reference, out=delta)
    return delta
