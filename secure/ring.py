"""The fixed-point ring Z_(2^bits) a masked update lives in: encoding, decoding, its size check.

`scale = ((2^(bits-1) - 1) // sites) / (max_weight * clip)`: a value clipped to +-clip, times a
weight of at most max_weight, times scale is at most (2^(bits-1) - 1) // sites, a whole number
that rounding cannot pass, and so the sum of every site's value never wraps and reads back
signed (two's complement). (The design's `(2^(bits-1) - 1) / (sites * max_weight * clip)` less
the fraction that rounding could push over the bound.) numpy's unsigned arithmetic wraps modulo
2^bits by itself, which is the ring's addition.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from foedus.plans.schema import SecureAggregationSettings, largest_signed

RingArray = npt.NDArray[np.unsignedinteger[Any]]
FloatArray = npt.NDArray[np.float64]
_CHUNK = 1 << 18  # elements encoded at a time (2 MB of float64)
_UNSIGNED: dict[int, np.dtype[Any]] = {
    16: np.dtype("<u2"),
    32: np.dtype("<u4"),
    64: np.dtype("<u8"),
}
_SIGNED: dict[int, np.dtype[Any]] = {16: np.dtype("<i2"), 32: np.dtype("<i4"), 64: np.dtype("<i8")}


@dataclass(frozen=True)
class FixedPoint:
    """The ring of `bits` bits and the fixed point that maps a weighted, clipped value into it."""

    bits: int
    clip: float
    scale: float
    sites: int = 1  # the collaborators whose values are summed: each value's bound is 1/sites

    @property
    def bound(self) -> int:
        """The largest magnitude one site's encoded value may have: (2^(bits-1) - 1) // sites."""
        return largest_signed(self.bits) // self.sites

    @classmethod
    def for_federation(cls, settings: SecureAggregationSettings, sites: int) -> FixedPoint:
        """The fixed point of a federation of `sites` collaborators (whose ring the loader checked:
        `SecureAggregationSettings.ring_problem`)."""
        if not (math.isfinite(settings.clip) and settings.clip > 0):
            raise ValueError(f"clip must be a finite number above 0, not {settings.clip}")
        scale = (largest_signed(settings.bits) // sites) / (settings.max_weight * settings.clip)
        return cls(bits=settings.bits, clip=float(settings.clip), scale=scale, sites=sites)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The ring's numpy dtype: unsigned, `bits` wide, little-endian (as the wire carries it)."""
        return _UNSIGNED[self.bits]

    def encode(
        self,
        values: npt.ArrayLike,
        weight: int,
        *,
        reference: npt.ArrayLike | None = None,
        factor: float = 1.0,
        noise: Callable[[int, int], FloatArray] | None = None,
    ) -> RingArray:
        """`rint(clip(values, +-clip) * weight * scale)` in the ring; raises ValueError on NaN or inf.

        With `reference` (the same shape), `values - reference` (computed in float64, exact for
        float32 tensors) is encoded instead: a site passes its trained and its global tensor, and
        the delta is never formed whole. With `factor` or `noise` (differential privacy,
        `foedus.privacy.shares`), `delta x factor + noise(start, stop)` is encoded, in float64:
        `noise` gives elements [start, stop) of what is added, a chunk at a time.

        Done in chunks of float64 that stay in the processor's cache (the whole update is never
        copied to float64 at once): a 100 MB float32 tensor costs its ring array and little more.
        """
        source = _floats(values)
        if reference is None:
            base = None
        else:
            base = _floats(reference).reshape(-1)
            if base.size != source.size:
                raise ValueError(f"the reference has {base.size} values, the update {source.size}")
        flat = source.reshape(-1)
        perturbed = factor != 1.0 or noise is not None
        weighted = weight * self.scale
        # Only float64's rounding of a 64-bit ring's values could pass the bound: cut them to it
        # (float64 rounds that bound up: take the float below it then).
        bound = float(self.bound)
        if int(bound) > self.bound:
            bound = float(np.nextafter(bound, 0.0))
        # clip(d, +-clip) * factor is clip(d * factor, +-clip * factor) (rounding is monotonic),
        # and a limit at most the (whole) bound keeps rint within it: one clip, before rint.
        limit = min(self.clip * weighted, bound)
        encoded = np.empty(flat.size, dtype=self.dtype)
        # Written through its signed view: the values fit it, and their bits are the ring's.
        signed = encoded.view(_SIGNED[self.bits])
        scratch = np.empty(min(flat.size, _CHUNK), dtype=np.float64)
        with np.errstate(over="ignore"):  # a huge finite value times factor: inf, clipped
            for begin in range(0, flat.size, _CHUNK):
                chunk = flat[begin : begin + _CHUNK]
                work = scratch[: chunk.size]
                if base is None and not perturbed:
                    checked = chunk
                    np.multiply(chunk, weighted, out=work, dtype=np.float64)
                else:
                    checked = work
                    if base is None:
                        np.copyto(work, chunk, casting="unsafe")
                    else:
                        end = begin + chunk.size
                        np.subtract(chunk, base[begin:end], out=work, dtype=np.float64)
                if not np.isfinite(checked).all():
                    raise ValueError("an update holds NaN or infinite values: it cannot be encoded")
                if perturbed:
                    if factor != 1.0:
                        work *= factor
                    if noise is not None:
                        work += noise(begin, begin + chunk.size)
                if base is not None or perturbed:
                    work *= weighted
                np.clip(work, -limit, limit, out=work)
                np.rint(work, out=work)
                np.copyto(signed[begin : begin + chunk.size], work, casting="unsafe")
        return encoded.reshape(source.shape)

    def encode_weight(self, weight: int) -> RingArray:
        """The weight element: the integer weight itself in the ring (not scaled), shape (1,)."""
        return np.array([weight], dtype=np.int64).astype(self.dtype)

    def signed(self, total: RingArray) -> npt.NDArray[np.signedinteger[Any]]:
        """The ring's elements read as two's complement: the sum's sign back."""
        signed: npt.NDArray[np.signedinteger[Any]] = np.asarray(total, dtype=self.dtype).view(
            _SIGNED[self.bits]
        )
        return signed

    def decode(self, total: RingArray) -> FloatArray:
        """A sum of encoded values back as float64: read signed, divided by the scale."""
        values = self.signed(total).astype(np.float64)
        values /= self.scale
        return values

    def decode_weight(self, total: RingArray) -> int:
        """The summed weight element as an integer."""
        return int(self.signed(total).reshape(-1)[0])


def _floats(values: npt.ArrayLike) -> npt.NDArray[Any]:
    """`values` as an array numpy computes with (bfloat16 and the like: as float64)."""
    source = np.asarray(values)
    if source.dtype.kind not in "fiu":  # numpy's own floats and integers do the math
        source = source.astype(np.float64)
    return source
