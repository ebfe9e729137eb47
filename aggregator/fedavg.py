"""Weighted federated averaging (FedAvg) of models and metrics, in pure numpy.

The result depends only on the contributions, never on the order they arrived in: contributions
are keyed by collaborator and always summed in sorted-name order, so the same inputs give a
bit-identical model, and copies of one model average to that model exactly. Floats (bfloat16
too) accumulate in float64 and are cast back to the model's dtype, rounded to nearest even; integer
(and boolean) tensors are averaged exactly and rounded half to even. Shapes and dtypes follow the reference model.

`average_sources` reads each contribution a slice at a time (from a file, say) and averages it
slice by slice, so its memory is the averaged model plus a few slices, whatever the number of
contributions. The tests hold the reference it is checked against bit for bit: `RunningAverage`
(tests/fedavg_reference.py), one whole contribution at a time, with the same element steps
(`_add_difference`, `_round_half_even`).
With `workers`, a float tensor's slices are shared out among that many threads (numpy and
`pread` release the GIL): each element still sees the same operations in the same order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import numpy.typing as npt

from foedus.privacy.site_budget import SITE_BUDGET_METRICS
from foedus.protos.dtypes import is_bfloat16
from foedus.refusals.errors import StorageError

Array = npt.NDArray[np.generic]
_INT64_LIMIT = 2**63
# Elements averaged at a time: 1 MB of float32 read, and float64 temporaries of 2 MB each that
# stay in cache while every contribution's slice is folded in (faster than larger slices).
SLICE_ELEMENTS = 2**18
# Threads a round's close averages with: the close has the machine to itself, and on 2 cores
# 8 x 100 MB took 0.54 s with one (`make bench BENCH_ARGS=--profile`).
AVERAGING_THREADS = max(1, min(4, os.cpu_count() or 1))


class TensorSource(Protocol):
    """One contribution's tensors, readable a slice at a time (a file on disk, or arrays in memory)."""

    def read(self, name: str, start: int, stop: int) -> Array:
        """Elements [start, stop) of tensor `name` flattened in C order, in the tensor's own dtype.

        The array may be reused by the next read (callers use it before reading again); with
        `average_sources(workers=...)`, by the next read of the same thread only.
        """
        ...


class ArraySource:
    """A TensorSource over arrays in memory."""

    def __init__(self, tensors: Mapping[str, Array]) -> None:
        """Read slices of `tensors` in place; they are never changed."""
        self._tensors = tensors

    def read(self, name: str, start: int, stop: int) -> Array:
        """Elements [start, stop) of `name` in C order: a view when it is C-contiguous."""
        array = np.asarray(self._tensors[name])
        if array.flags.c_contiguous:
            return array.reshape(-1)[start:stop]
        # reshape(-1) would copy the whole tensor at every read; flat copies only the slice.
        values: Array = array.flat[start:stop]
        return values


class MappedArraySource(ArraySource):
    """An `ArraySource` that reads arrays mapped from files (`np.memmap`) from the files.

    A mapped tensor is read with `os.preadv` into a reused buffer (one per thread), not through
    its mapping: pages read through a mapping count in the process's resident memory until it
    is unmapped, so averaging eight 100 MB updates through theirs would hold 800 MB. Other
    arrays are read as `ArraySource` reads them. `close` releases the files.
    """

    def __init__(self, tensors: Mapping[str, Array]) -> None:
        super().__init__(tensors)
        self._buffers = threading.local()
        self._files: dict[str, int | None] = {}
        self._opening = threading.Lock()

    def read(self, name: str, start: int, stop: int) -> Array:
        """Elements [start, stop) of `name` in C order; a mapped one valid until the next read."""
        array = self._tensors[name]
        if not isinstance(array, np.memmap) or array.filename is None:
            return super().read(name, start, stop)
        descriptor = self._file(array.filename)
        if descriptor is None:  # the file is gone (a store in memory kept only the mapping)
            return super().read(name, start, stop)
        itemsize = array.dtype.itemsize
        size = (stop - start) * itemsize
        buffer: Array = getattr(self._buffers, "array", np.empty(0, np.uint8))
        if buffer.size < size:
            buffer = self._buffers.array = np.empty(size, np.uint8)
        target = buffer[:size]
        offset = array.offset + start * itemsize
        done = 0
        while done < size:
            got = os.preadv(descriptor, [target[done:].data], offset + done)
            if got == 0:
                raise StorageError(f"{array.filename}: ends before tensor {name!r} does")
            done += got
        return target.view(array.dtype)

    def _file(self, path: str) -> int | None:
        """The open file at `path`; None when it no longer exists."""
        with self._opening:
            return self._open(path)

    def _open(self, path: str) -> int | None:
        if path not in self._files:
            try:
                self._files[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._files[path] = None
            except OSError as error:
                raise StorageError(f"{path}: cannot read: {error.strerror or error}") from None
        return self._files[path]

    def close(self) -> None:
        """Close the files read so far."""
        for descriptor in self._files.values():
            if descriptor is not None:
                os.close(descriptor)
        self._files.clear()


def average_sources(
    reference: Mapping[str, Array],
    contributions: Mapping[str, tuple[int, TensorSource]],
    *,
    slice_elements: int = SLICE_ELEMENTS,
    workers: int = 1,
) -> dict[str, Array]:
    """The weighted mean of every tensor of `reference` over `contributions`, read a slice at a time.

    `contributions` maps each collaborator to its weight (its data size) and its source. The
    result is bit-identical to the tests' `RunningAverage` of the same tensors: for each slice,
    the contributions are folded in sorted collaborator order with the same float64 operations,
    so each element sees the operations `RunningAverage` gives it, in the same order. (Where two
    NaNs meet, numpy's vector loop keeps one and its tail loop the other, so which comes out
    depends on where slices end; a multiple of 64 elements, as the default, keeps those bits too.)

    Memory is the result plus a few float64 slices: no source is asked for more than
    `slice_elements` elements at a time. Of `reference` only the names, shapes and dtypes are
    used (`np.broadcast_to` of a scalar holds no memory). Each source must hold every tensor with
    the reference's shape and dtype; that is the caller's business, only the length of each
    slice read is checked.
    """
    references = _averageable(reference)
    averaged = {name: np.empty(like.shape, dtype=like.dtype) for name, like in references.items()}
    flat = {name: array.reshape(-1) for name, array in averaged.items()}  # views: C-contiguous

    def keep(name: str, start: int, values: Array) -> None:
        flat[name][start : start + values.size] = values

    average_sources_into(
        references, contributions, keep, slice_elements=slice_elements, workers=workers
    )
    return averaged


# Where `average_sources_into` hands each averaged slice: (tensor name, its first element's
# index in C order, the values in the tensor's dtype, valid only during the call).
SliceSink = Callable[[str, int, Array], None]


def collect_slices(
    reference: Mapping[str, Array], into: Callable[[SliceSink], None]
) -> dict[str, Array]:
    """What `into` hands its sink, slice by slice, gathered into new arrays shaped and typed as
    `reference`'s tensors (a next model computed in memory rather than into a file)."""
    result = {
        name: np.empty(np.shape(like), dtype=np.asarray(like).dtype)
        for name, like in reference.items()
    }

    def keep(name: str, start: int, values: Array) -> None:
        result[name].reshape(-1)[start : start + values.size] = values

    into(keep)
    return result


def average_sources_into(
    reference: Mapping[str, Array],
    contributions: Mapping[str, tuple[int, TensorSource]],
    sink: SliceSink,
    *,
    slice_elements: int = SLICE_ELEMENTS,
    workers: int = 1,
) -> None:
    """`average_sources`, each averaged slice handed to `sink` instead of kept: where the model
    is written as it is averaged, memory is a few slices whatever the model's size.

    Tensors come in name order; with `workers` > 1 a float tensor's slices come from that many
    threads at once, in no particular order (`sink` must take them so).
    """
    if not contributions:
        raise ValueError("nothing to average: no contributions")
    if any(weight <= 0 for weight, _ in contributions.values()):
        raise ValueError("every contribution needs a positive weight")
    if slice_elements <= 0:
        raise ValueError("slice_elements must be positive")
    if workers <= 0:
        raise ValueError("workers must be positive")
    references = _averageable(reference)
    length = min(slice_elements, max((like.size for like in references.values()), default=0))
    integers = any(like.dtype.kind in "biu" for like in references.values())
    averages = [_SliceAverage(contributions, length, integers) for _ in range(workers)]
    with ThreadPoolExecutor(workers, thread_name_prefix="fedavg") as pool:
        for name, like in references.items():
            bounds = list(_slices(like.size, slice_elements))
            if like.dtype.kind in "biu":
                # Integer tensors need a first pass over every slice: one thread does them.
                averages[0].integer_slices(name, like.dtype, bounds, sink)
            elif workers == 1 or len(bounds) <= 1:
                averages[0].float_slices(name, like.dtype, bounds, sink)
            else:
                _shared_out(averages, pool, name, like.dtype, bounds=bounds, sink=sink)


def _shared_out(
    averages: list[_SliceAverage],
    pool: ThreadPoolExecutor,
    name: str,
    dtype: np.dtype[np.generic],
    *,
    bounds: list[tuple[int, int]],
    sink: SliceSink,
) -> None:
    """A float tensor's slices shared out among the threads of `pool`: every n-th to each, with
    its own `_SliceAverage` (its own buffers)."""
    errors = np.geterr()  # numpy's error handling is per thread: the caller's holds in all

    def average_every_nth(index: int) -> None:
        with np.errstate(**errors):
            averages[index].float_slices(name, dtype, bounds[index :: len(averages)], sink)

    for done in [pool.submit(average_every_nth, index) for index in range(len(averages))]:
        done.result()  # raises what the thread raised


def weighted_metrics(
    contributions: Mapping[str, tuple[int, Mapping[str, float]]],
) -> dict[str, float]:
    """Per metric, the mean over the collaborators that reported it, weighted by their data size;
    a site's own privacy budget (`foedus.privacy.site_budget`) is left out: its mean says nothing."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for collaborator in sorted(contributions):
        weight, metrics = contributions[collaborator]
        for metric in sorted(metrics):
            if metric in SITE_BUDGET_METRICS:
                continue
            sums[metric] = sums.get(metric, 0.0) + weight * float(metrics[metric])
            weights[metric] = weights.get(metric, 0) + weight
    return {metric: sums[metric] / weights[metric] for metric in sorted(sums) if weights[metric]}


class _SliceAverage:
    """`average_sources` at work: the contributions in order, and buffers one slice long."""

    def __init__(
        self, contributions: Mapping[str, tuple[int, TensorSource]], length: int, integers: bool
    ) -> None:
        """Average over `contributions` in slices of up to `length` elements."""
        self._parts = [(name, *contributions[name]) for name in sorted(contributions)]
        self._total = sum(weight for _, weight, _ in self._parts)
        # Allocated once, reused for every slice of every tensor.
        self._first = np.empty(length, dtype=np.float64)  # the first contribution's slice
        self._mean = np.empty(length, dtype=np.float64)
        self._difference = np.empty(length, dtype=np.float64)
        self._numerator = np.empty(length if integers else 0, dtype=np.int64)
        self._term = np.empty(length if integers else 0, dtype=np.int64)
        self._length = length
        self._outputs: dict[np.dtype[np.generic], Array] = {}  # slices of the result, per dtype

    def float_slices(
        self, name: str, dtype: np.dtype[np.generic], bounds: list[tuple[int, int]], sink: SliceSink
    ) -> None:
        """Each slice of float tensor `name` in `bounds`, averaged and handed to `sink`."""
        out = self._output(dtype)
        for start, stop in bounds:
            self.float_mean(name, start, stop, out[: stop - start])
            sink(name, start, out[: stop - start])

    def integer_slices(
        self, name: str, dtype: np.dtype[np.generic], bounds: list[tuple[int, int]], sink: SliceSink
    ) -> None:
        """Each slice of integer tensor `name`, averaged and handed to `sink`.

        As in the tests' RunningAverage: exact int64 sums unless a value of some contribution is
        too large for them, which is known only once every slice of every contribution is seen.
        """
        largest = max(
            (
                _magnitude(self._read(part, name, start, stop))
                for start, stop in bounds
                for part in self._parts
            ),
            default=0,
        )
        mean = self._exact_mean if largest * self._total < _INT64_LIMIT else self.float_mean
        out = self._output(dtype)
        for start, stop in bounds:
            mean(name, start, stop, out[: stop - start])
            sink(name, start, out[: stop - start])

    def _output(self, dtype: np.dtype[np.generic]) -> Array:
        """This average's buffer for slices of `dtype`, made once."""
        if dtype not in self._outputs:
            self._outputs[dtype] = np.empty(self._length, dtype=dtype)
        return self._outputs[dtype]

    def float_mean(self, name: str, start: int, stop: int, out: Array) -> None:
        """`out` = the mean of elements [start, stop) in float64, as the tests' `RunningAverage` does."""
        size = stop - start
        first, mean = self._first[:size], self._mean[:size]
        head, *rest = self._parts
        np.copyto(first, self._read(head, name, start, stop), casting="unsafe")
        np.copyto(mean, first)
        for part in rest:
            values = self._read(part, name, start, stop)
            _add_difference(mean, values, first, part[1] / self._total, self._difference[:size])
        if out.dtype.kind in "biu":  # integers too large for exact sums: rounded float64 means
            np.rint(mean, out=mean)
        np.copyto(out, mean, casting="unsafe")

    def _exact_mean(self, name: str, start: int, stop: int, out: Array) -> None:
        """`out` = the integer mean of elements [start, stop), from exact int64 sums."""
        size = stop - start
        numerator, term = self._numerator[:size], self._term[:size]
        numerator.fill(0)
        for part in self._parts:
            np.copyto(term, self._read(part, name, start, stop), casting="unsafe")
            np.multiply(term, np.int64(part[1]), out=term)
            np.add(numerator, term, out=numerator)
        np.copyto(out, _round_half_even(numerator, self._total, out.dtype))

    @staticmethod
    def _read(part: tuple[str, int, TensorSource], name: str, start: int, stop: int) -> Array:
        """Elements [start, stop) of tensor `name` from one collaborator, checked for length."""
        collaborator, _, source = part
        values = source.read(name, start, stop)
        if values.shape != (stop - start,):
            # A wrong length would be broadcast silently or fail deep in numpy: say whose it is.
            raise ValueError(
                f"tensor {name!r} of {collaborator!r}: reading [{start}, {stop}) gave shape "
                f"{list(values.shape)}"
            )
        return values


def _slices(size: int, step: int) -> Iterator[tuple[int, int]]:
    """The bounds [start, stop) of `size` elements taken `step` at a time."""
    for start in range(0, size, step):
        yield start, min(start + step, size)


def _add_difference(
    mean: Array, values: Array, first: Array, share: float, difference: Array
) -> None:
    """mean += share * (values - first) in float64, element by element: the step of every path.

    `difference` is a float64 buffer as long as the others. Sharing it is what makes the tests'
    `RunningAverage` (the reference) and `average_sources` do the very same float operations.
    """
    np.copyto(difference, values, casting="unsafe")
    np.subtract(difference, first, out=difference)
    np.multiply(difference, share, out=difference)
    np.add(mean, difference, out=mean)


def _averageable(reference: Mapping[str, Array]) -> dict[str, Array]:
    """The reference's tensors as arrays in name order, refused if one cannot be averaged."""
    references = {name: np.asarray(reference[name]) for name in sorted(reference)}
    for name, like in references.items():
        if _kind(like.dtype) not in "biuf":
            raise ValueError(f"tensor {name!r}: cannot average dtype {like.dtype}")
    return references


def _kind(dtype: np.dtype[np.generic]) -> str:
    """numpy's kind of `dtype`, but "f" for bfloat16 (to numpy an opaque "V"): it averages as a float."""
    return "f" if is_bfloat16(dtype) else dtype.kind


def _round_half_even(
    numerator: npt.NDArray[np.int64], total: int, dtype: np.dtype[np.generic]
) -> Array:
    quotient, remainder = np.divmod(numerator, np.int64(total))  # floor division, remainder >= 0
    twice = 2 * remainder
    round_up = (twice > total) | ((twice == total) & (quotient % 2 == 1))
    rounded: Array = (quotient + round_up.astype(np.int64)).astype(dtype)
    return rounded


def _magnitude(array: Array) -> int:
    if array.size == 0:
        return 0
    return max(abs(int(array.max())), abs(int(array.min())))
