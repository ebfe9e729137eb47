"""FedAvg over arrays in memory, for tests: the reference `foedus.aggregator.fedavg` is checked against.

`RunningAverage` adds one whole contribution at a time, with the element steps the streaming
average shares (`_add_difference`, `_round_half_even`), so `average_sources` must give its bits;
`federated_average` is `average_sources` over arrays in memory, for tests that average models
they hold (the bfloat16 and PyTorch runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from foedus.aggregator.fedavg import (
    _INT64_LIMIT,
    SLICE_ELEMENTS,
    ArraySource,
    _add_difference,
    _averageable,
    _kind,
    _magnitude,
    _round_half_even,
    average_sources,
)
from foedus.aggregator.records import Array

SLICE = SLICE_ELEMENTS  # the slice of the in-memory paths below (tests shrink it)


@dataclass(frozen=True)
class Contribution:
    """One collaborator's share of an average: its weight (its data size) and its values."""

    weight: int
    tensors: Mapping[str, Array]


def federated_average(
    contributions: Mapping[str, Contribution], reference: Mapping[str, Array]
) -> dict[str, Array]:
    """The weighted mean of every tensor of `reference` over `contributions` (keyed by collaborator)."""
    if not contributions:
        raise ValueError("nothing to average: no contributions")
    if any(part.weight <= 0 for part in contributions.values()):
        raise ValueError("every contribution needs a positive weight")
    references = _averageable(reference)
    sources = {
        collaborator: (part.weight, ArraySource(_matching(references, part.tensors)))
        for collaborator, part in sorted(contributions.items())
    }
    return average_sources(references, sources, slice_elements=SLICE)


class RunningAverage:
    """`federated_average` one contribution at a time, in memory of the order of one model.

    Add the contributions in sorted collaborator order (as `federated_average` sums them) with
    `total` the sum of all their weights; each can be dropped once added, and the result is
    bit-identical to `federated_average` of them all.
    """

    def __init__(self, reference: Mapping[str, Array], total: int) -> None:
        """Average the tensors of `reference` over contributions whose weights sum to `total`."""
        if total <= 0:
            raise ValueError("every contribution needs a positive weight")
        self._reference = _averageable(reference)
        self._total = total
        self._added = 0  # weight added so far
        self._last: str | None = None  # the collaborator added last
        self._first: dict[str, Array] = {}  # the first contribution's tensors (float path)
        self._sums: dict[str, npt.NDArray[np.float64]] = {}  # float64 running means
        self._numerators: dict[str, npt.NDArray[np.int64]] = {}  # exact sums of integer tensors
        self._largest: dict[str, int] = {}  # the largest magnitude of each integer tensor

    def add(self, collaborator: str, weight: int, tensors: Mapping[str, Array]) -> None:
        """Fold one collaborator's tensors into the average (after the ones before it by name)."""
        if weight <= 0:
            raise ValueError("every contribution needs a positive weight")
        if self._last is not None and collaborator <= self._last:
            raise ValueError(f"contribution of {collaborator!r} added out of order")
        if self._added + weight > self._total:
            raise ValueError("the contributions weigh more than the total given")
        arrays = _matching(self._reference, tensors)
        first = self._last is None
        for name, array in arrays.items():
            if self._reference[name].dtype.kind in "biu":
                self._add_integer(name, array, weight, first)
            self._add_float(name, array, weight, first)
        self._last = collaborator
        self._added += weight

    def result(self) -> dict[str, Array]:
        """The average of everything added; the running sums are released."""
        if self._last is None:
            raise ValueError("nothing to average: no contributions")
        if self._added != self._total:
            raise ValueError("the contributions weigh less than the total given")
        averaged: dict[str, Array] = {}
        for name, like in self._reference.items():
            mean = self._sums.pop(name)
            self._first.pop(name, None)
            if _kind(like.dtype) == "f":
                averaged[name] = mean.astype(like.dtype)
                continue
            numerator = self._numerators.pop(name)
            if self._largest[name] * self._total >= _INT64_LIMIT:
                # Too large for exact int64 sums; float64 is exact below 2**53 and close above.
                averaged[name] = np.rint(mean).astype(like.dtype)
            else:
                averaged[name] = _round_half_even(numerator, self._total, like.dtype)
        return averaged

    def _add_float(self, name: str, array: Array, weight: int, first: bool) -> None:
        # The mean as the first array plus the weighted differences from it: the same value as
        # sum(w * x) / total, but copies of one model give that model back bit for bit.
        if first:
            self._sums[name] = array.astype(np.float64, order="C")
            # float16/32/64 convert to float64 exactly, so the first is kept as it came.
            exact = array.dtype.kind == "f" and array.dtype.itemsize <= 8
            self._first[name] = array if exact else self._sums[name].copy()
            return
        # Element by element the same operations, a slice at a time: the float64 temporary
        # stays small instead of twice the tensor's size.
        share = weight / self._total
        sums = self._sums[name].reshape(-1)  # a view: the sums are C-contiguous
        values, first_values = array.reshape(-1), self._first[name].reshape(-1)
        difference = np.empty(min(SLICE, sums.size), dtype=np.float64)
        for start in range(0, sums.size, SLICE):
            stop = min(start + SLICE, sums.size)
            _add_difference(
                sums[start:stop],
                values[start:stop],
                first_values[start:stop],
                share,
                difference[: stop - start],
            )

    def _add_integer(self, name: str, array: Array, weight: int, first: bool) -> None:
        if first:
            self._numerators[name] = np.zeros(array.shape, dtype=np.int64)
            self._largest[name] = 0
        self._largest[name] = max(self._largest[name], _magnitude(array))
        if self._largest[name] * self._total < _INT64_LIMIT:
            self._numerators[name] += np.int64(weight) * array.astype(np.int64)


def _matching(references: Mapping[str, Array], tensors: Mapping[str, Array]) -> dict[str, Array]:
    """One contribution's tensors as arrays, each checked for the reference's shape and dtype."""
    arrays: dict[str, Array] = {}
    for name, like in references.items():
        if name not in tensors:
            raise ValueError(f"tensor {name!r} is missing from some contributions")
        array = np.asarray(tensors[name])
        if array.shape != like.shape or array.dtype != like.dtype:
            raise ValueError(
                f"tensor {name!r} is {array.dtype}{list(array.shape)}, "
                f"the reference is {like.dtype}{list(like.shape)}"
            )
        arrays[name] = array
    return arrays
