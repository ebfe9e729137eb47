"""Weighted federated averaging (FedAvg) of models and metrics, in pure numpy.

The result depends only on the contributions, never on the order they arrived in: contributions
are keyed by collaborator and always summed in sorted-name order, so the same inputs give a
bit-identical model, and copies of one model average to that model exactly. Floats accumulate in
float64 and are cast back to the model's dtype; integer (and boolean) tensors are averaged exactly
and rounded half to even. Shapes and dtypes follow the reference model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.generic]
_INT64_LIMIT = 2**63


@dataclass(frozen=True)
class Contribution:
    """One collaborator's share of an average: its weight (its data size) and its values."""

    weight: int
    tensors: Mapping[str, Array]


def federated_average(
    contributions: Mapping[str, Contribution], reference: Mapping[str, Array]
) -> dict[str, Array]:
    """The weighted mean of every tensor of `reference` over `contributions` (keyed by collaborator)."""
    ordered = [contributions[name] for name in sorted(contributions)]
    if not ordered:
        raise ValueError("nothing to average: no contributions")
    if any(part.weight <= 0 for part in ordered):
        raise ValueError("every contribution needs a positive weight")
    total = sum(part.weight for part in ordered)
    averaged: dict[str, Array] = {}
    for name in sorted(reference):
        like = np.asarray(reference[name])
        arrays = [np.asarray(part.tensors[name]) for part in ordered if name in part.tensors]
        if len(arrays) != len(ordered):
            raise ValueError(f"tensor {name!r} is missing from some contributions")
        for array in arrays:
            if array.shape != like.shape or array.dtype != like.dtype:
                raise ValueError(
                    f"tensor {name!r} is {array.dtype}{list(array.shape)}, "
                    f"the reference is {like.dtype}{list(like.shape)}"
                )
        weights = [part.weight for part in ordered]
        if like.dtype.kind == "f":
            averaged[name] = _float_mean(arrays, weights, total, like.dtype)
        elif like.dtype.kind in "biu":
            averaged[name] = _integer_mean(arrays, weights, total, like.dtype)
        else:
            raise ValueError(f"tensor {name!r}: cannot average dtype {like.dtype}")
    return averaged


def weighted_metrics(
    contributions: Mapping[str, tuple[int, Mapping[str, float]]],
) -> dict[str, float]:
    """Per metric, the mean over the collaborators that reported it, weighted by their data size."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for collaborator in sorted(contributions):
        weight, metrics = contributions[collaborator]
        for metric in sorted(metrics):
            sums[metric] = sums.get(metric, 0.0) + weight * float(metrics[metric])
            weights[metric] = weights.get(metric, 0) + weight
    return {metric: sums[metric] / weights[metric] for metric in sorted(sums) if weights[metric]}


def _float_mean(
    arrays: list[Array], weights: list[int], total: int, dtype: np.dtype[np.generic]
) -> Array:
    # The mean as the first array plus the weighted differences from it: the same value as
    # sum(w * x) / total, but copies of one model give that model back bit for bit.
    first = arrays[0].astype(np.float64)
    accumulator = first.copy()
    for array, weight in zip(arrays[1:], weights[1:], strict=True):
        accumulator += (weight / total) * (array.astype(np.float64) - first)
    return accumulator.astype(dtype)


def _integer_mean(
    arrays: list[Array], weights: list[int], total: int, dtype: np.dtype[np.generic]
) -> Array:
    largest = max((_magnitude(array) for array in arrays), default=0)
    if largest * total >= _INT64_LIMIT:
        # Too large for exact int64 sums; float64 is exact below 2**53 and close above.
        mean = _float_mean(arrays, weights, total, np.dtype(np.float64))
        return np.rint(mean).astype(dtype)
    numerator = np.zeros(arrays[0].shape, dtype=np.int64)
    for array, weight in zip(arrays, weights, strict=True):
        numerator += np.int64(weight) * array.astype(np.int64)
    quotient, remainder = np.divmod(numerator, np.int64(total))  # floor division, remainder >= 0
    twice = 2 * remainder
    round_up = (twice > total) | ((twice == total) & (quotient % 2 == 1))
    rounded: Array = (quotient + round_up.astype(np.int64)).astype(dtype)
    return rounded


def _magnitude(array: Array) -> int:
    if array.size == 0:
        return 0
    return max(abs(int(array.max())), abs(int(array.min())))
