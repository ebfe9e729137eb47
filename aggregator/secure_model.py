"""The next global model of a secure round, computed a slice at a time from the survivors'
masked uploads (`foedus.aggregator.secure_stages` decides when, `foedus.secure.Unmasking` how the
masks come off): only sums over every survivor are ever formed, never one site's update.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from foedus.aggregator.fedavg import SLICE_ELEMENTS, SliceSink, TensorSource, collect_slices
from foedus.aggregator.records import Array
from foedus.secure import WEIGHT_TENSOR
from foedus.secure.masks import VectorLayout
from foedus.secure.ring import RingArray
from foedus.secure.unmask import Unmasking


class SecureModel:
    """The next global model of a secure round before it is computed, with the same `into` and
    `arrays` as `foedus.aggregator.records.AveragedModel`: for each slice, the survivors' masked
    values summed in the ring, the masks removed, decoded, divided by the summed weight and
    added to the round's model (`foedus.secure.Unmasking`). Only sums over every survivor are
    ever formed, a slice at a time."""

    def __init__(
        self,
        reference: Mapping[str, Array],
        uploads: Mapping[str, TensorSource],
        unmasking: Unmasking,
        *,
        slice_elements: int = SLICE_ELEMENTS,
    ) -> None:
        """`uploads`: each survivor's masked tensors (the model's names and WEIGHT_TENSOR)."""
        self.reference = reference
        self._uploads = [uploads[name] for name in sorted(uploads)]
        self._unmasking = unmasking
        self._slice = slice_elements
        self._layout = VectorLayout.of_arrays({k: np.asarray(v) for k, v in reference.items()})
        self.weight = unmasking.total_weight(
            self._summed(WEIGHT_TENSOR, 0, 1), self._layout.weight
        )  # ProtocolViolation when it is out of range

    def _summed(self, name: str, start: int, stop: int) -> RingArray:
        """Elements [start, stop) of tensor `name` summed over the survivors, still masked."""
        total: RingArray = np.zeros(stop - start, dtype=self._unmasking.fixed_point.dtype)
        for source in self._uploads:
            values = source.read(name, start, stop)
            if values.shape != total.shape or values.dtype != total.dtype:
                raise ValueError(
                    f"tensor {name!r}: reading [{start}, {stop}) gave "
                    f"{values.dtype}{list(values.shape)}"
                )
            np.add(total, values, out=total)  # unsigned: wraps around, the ring's addition
        return total

    def _slices(self) -> Iterator[tuple[str, int, int, int]]:
        """(tensor, start, stop, its offset in the masked vector), a slice at a time."""
        for name, (offset, end) in self._layout.slices.items():
            for start in range(0, end - offset, self._slice):
                yield name, start, min(start + self._slice, end - offset), offset

    def into(self, sink: SliceSink) -> None:
        """Compute the model a slice at a time, handing each slice to `sink` (the tensor's dtype)."""
        unmasking = self._unmasking
        for name, start, stop, offset in self._slices():
            flat = np.asarray(self.reference[name]).reshape(-1)
            unmasked = unmasking.unmask(self._summed(name, start, stop), offset + start)
            sink(name, start, unmasking.updated(flat[start:stop], unmasked, self.weight))

    def arrays(self) -> dict[str, Array]:
        """Compute the model into arrays in memory."""
        return collect_slices(self.reference, self.into)
