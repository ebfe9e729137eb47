"""Weighted FedAvg: exact weights, exact dtypes, and the same bits whatever the arrival order."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from foedus.aggregator.fedavg import (
    ArraySource,
    MappedArraySource,
    TensorSource,
    average_sources,
    weighted_metrics,
)
from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Array, ResultTensor, TaskResult
from foedus.privacy.site_budget import SITE_BUDGET_METRICS, SiteBudget

import fedavg_reference
from fedavg_reference import Contribution, RunningAverage, federated_average

MODEL: dict[str, Array] = {
    "f16": np.array([1.0, -2.5, 3.25], dtype=np.float16),
    "f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "f64": np.array([[0.1, 0.2], [0.3, 1e300]], dtype=np.float64),
    "i64": np.array([0, 10, -10, 7], dtype=np.int64),
    "scalar": np.array(3, dtype=np.int64),
}


def shifted(model: dict[str, Array], by: float) -> dict[str, Array]:
    """`model` with `by` added to every tensor, dtypes kept."""
    return {name: np.add(array, by).astype(array.dtype) for name, array in model.items()}


def test_weights_mix_one_quarter_and_three_quarters() -> None:
    """Data sizes 1 and 3 give exactly 0.25 of the first plus 0.75 of the second."""
    a = np.array([1.0, 2.0, -4.0, 0.1], dtype=np.float32)
    b = np.array([5.0, -2.0, 8.0, 0.7], dtype=np.float32)
    averaged = federated_average(
        {"alice": Contribution(1, {"w": a}), "bob": Contribution(3, {"w": b})}, {"w": a}
    )
    expected = (0.25 * a.astype(np.float64) + 0.75 * b.astype(np.float64)).astype(np.float32)
    assert averaged["w"].dtype == np.float32
    assert averaged["w"].tobytes() == expected.tobytes()
    assert averaged["w"].tolist() == pytest.approx([4.0, -1.0, 5.0, 0.55], rel=1e-6)


def test_identical_inputs_give_themselves_bit_for_bit() -> None:
    """Averaging copies of one model, with any weights, gives that model exactly."""
    contributions = {name: Contribution(w, MODEL) for name, w in (("a", 7), ("b", 1), ("c", 1000))}
    averaged = federated_average(contributions, MODEL)
    for name, array in MODEL.items():
        assert averaged[name].dtype == array.dtype, name
        assert averaged[name].shape == array.shape, name
        assert averaged[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int64"])
def test_dtype_and_shape_are_preserved(dtype: str) -> None:
    """Each dtype comes back as itself, with its shape."""
    reference = {"t": np.arange(6, dtype=dtype).reshape(2, 3)}
    other = {"t": (np.arange(6).reshape(2, 3) * 3).astype(dtype)}
    averaged = federated_average(
        {"a": Contribution(2, reference), "b": Contribution(5, other)}, reference
    )["t"]
    assert (averaged.dtype, averaged.shape) == (np.dtype(dtype), (2, 3))
    expected = np.arange(6).reshape(2, 3) * (2 + 5 * 3) / 7
    np.testing.assert_allclose(averaged.astype(np.float64), expected, rtol=1e-3, atol=0.5)


def test_integers_round_half_to_even() -> None:
    """Integer means that fall on .5 round to the even neighbour; others to the nearest."""
    reference = {"i": np.array([0, 0, 0, 0, 0], dtype=np.int64)}
    low = {"i": np.array([0, 1, 2, 3, -1], dtype=np.int64)}
    high = {"i": np.array([1, 2, 3, 5, -2], dtype=np.int64)}
    averaged = federated_average({"a": Contribution(1, low), "b": Contribution(1, high)}, reference)
    # Means 0.5, 1.5, 2.5, 4, -1.5 -> 0, 2, 2, 4, -2.
    assert averaged["i"].tolist() == [0, 2, 2, 4, -2]


def test_mismatched_tensor_is_refused() -> None:
    """A contribution whose tensor differs in dtype from the reference is not averaged silently."""
    bad = {"t": np.zeros(3, dtype=np.float64)}
    with pytest.raises(ValueError, match="'t'"):
        federated_average({"a": Contribution(1, bad)}, {"t": np.zeros(3, dtype=np.float32)})


def train_result(collaborator: str, data_size: int, model: dict[str, Array]) -> TaskResult:
    """`train` results of round 0 carrying `model` and a loss."""
    tensors = tuple(ResultTensor(name, frozenset({"trained"}), a) for name, a in model.items())
    loss = ResultTensor("loss", frozenset({"metric"}), np.array(0.5, dtype=np.float32))
    return TaskResult(collaborator, 0, "train", data_size, (*tensors, loss))


def model_bytes(model: Mapping[str, Array]) -> bytes:
    """Every tensor's name, dtype and bytes, in name order."""
    return b"".join(
        name.encode() + model[name].dtype.str.encode() + model[name].tobytes()
        for name in sorted(model)
    )


def aggregate_in_order(order: list[str]) -> bytes:
    """Submit the same three `train` results in `order`; the aggregated model's bytes."""
    rng = np.random.default_rng(7)
    model: dict[str, Array] = {
        "w64": rng.normal(size=512),
        "w32": rng.normal(size=64).astype(np.float32),
        "steps": np.array(3, dtype=np.int64),
    }
    # Very different scales make float sums depend on their order, so a fixed order must be kept.
    updates = {
        name: (
            size,
            {
                k: np.add(v, rng.normal(scale=s, size=v.shape)).astype(v.dtype)
                for k, v in model.items()
            },
        )
        for name, size, s in (("alice", 17, 1.0), ("bob", 3, 1e-3), ("carol", 101, 1e3))
    }
    federation = Federation(
        collaborators=("alice", "bob", "carol"), tasks=("train",), rounds=1, model=model
    )
    for name in order:
        size, trained = updates[name]
        assert federation.submit(train_result(name, size, trained))
    summary = federation.close_round_if_due()
    assert summary is not None and summary.trained
    assert model_bytes(summary.model) != model_bytes(model)
    return model_bytes(summary.model)


@pytest.mark.parametrize("order", [["bob", "carol", "alice"], ["carol", "alice", "bob"]])
def test_arrival_order_does_not_change_a_bit(order: list[str]) -> None:
    """The same results submitted in different orders give byte-identical aggregates."""
    assert aggregate_in_order(order) == aggregate_in_order(["alice", "bob", "carol"])


def test_metrics_are_means_weighted_by_data_size() -> None:
    """Each metric is averaged over those who reported it, weighted by their data size."""
    metrics = weighted_metrics(
        {
            "alice": (1, {"accuracy": 0.5, "loss": 2.0}),
            "bob": (3, {"accuracy": 0.9}),
        }
    )
    assert metrics == {"accuracy": pytest.approx(0.8), "loss": 2.0}


def test_a_sites_own_privacy_budget_is_not_averaged() -> None:
    """The sites' DP-SGD budgets (`dp_epsilon`, `dp_delta`, `dp_max_epsilon`) have no mean in the
    round's metrics; the other metrics of the same results still do."""
    alice = SiteBudget(2.5, 1e-5, 8.0).to_metrics()
    bob = SiteBudget(3.5, 1e-5).to_metrics()
    metrics = weighted_metrics(
        {"alice": (1, {"loss": 2.0, **alice}), "bob": (3, {"loss": 1.0, **bob})}
    )
    assert set(alice) == set(SITE_BUDGET_METRICS)
    assert metrics == {"loss": pytest.approx(1.25)}


def batch_mean(parts: list[tuple[int, Array]], dtype: np.dtype[np.generic]) -> Array:
    """The formula `federated_average` used when it held every contribution at once."""
    total = sum(weight for weight, _ in parts)
    if dtype.kind in "biu":
        largest = max(max(abs(int(a.max())), abs(int(a.min()))) for _, a in parts)
        if largest * total < 2**63:
            numerator = sum(np.int64(w) * a.astype(np.int64) for w, a in parts)
            quotient, remainder = np.divmod(numerator, np.int64(total))
            twice = 2 * remainder
            up = (twice > total) | ((twice == total) & (quotient % 2 == 1))
            mean: Array = (quotient + up.astype(np.int64)).astype(dtype)
            return mean
    first = parts[0][1].astype(np.float64)
    accumulator = first.copy()
    for weight, array in parts[1:]:
        accumulator += (weight / total) * (array.astype(np.float64) - first)
    if dtype.kind in "biu":
        return np.rint(accumulator).astype(dtype)
    return accumulator.astype(dtype)


@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]
)
@pytest.mark.parametrize("slice_size", [10, 2**20])
def test_running_average_is_bit_identical_to_the_batch_formula(
    dtype: type[np.generic], slice_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One contribution at a time, a slice at a time, gives the bytes the all-at-once formula gave."""
    monkeypatch.setattr(fedavg_reference, "SLICE", slice_size)
    rng = np.random.default_rng(11)
    weights = {"dave": 5, "alice": 17, "carol": 101, "bob": 3}
    scales = {"alice": 1.0, "bob": 1e-3, "carol": 1e3, "dave": 7.0}
    arrays: dict[str, Array] = {}
    for name in weights:
        values = rng.normal(scale=scales[name], size=(33, 7))
        arrays[name] = (values > 0 if dtype is np.bool_ else values).astype(dtype)
    arrays["bob"] = np.asfortranarray(arrays["bob"])  # a layout of its own
    if dtype is np.int64:
        arrays["carol"][0, 0] = 2**62  # forces the float64 fallback
    contributions = {name: Contribution(weights[name], {"t": arrays[name]}) for name in weights}
    averaged = federated_average(contributions, {"t": arrays["alice"]})
    ordered = [(weights[name], arrays[name]) for name in sorted(weights)]
    expected = batch_mean(ordered, np.dtype(dtype))
    assert averaged["t"].dtype == expected.dtype
    assert averaged["t"].tobytes() == expected.tobytes()


def test_running_average_refuses_contributions_out_of_order() -> None:
    """Contributions must come in collaborator order, or the sums would depend on arrival."""
    average = RunningAverage({"t": np.zeros(2)}, 3)
    average.add("bob", 1, {"t": np.ones(2)})
    with pytest.raises(ValueError, match="out of order"):
        average.add("alice", 2, {"t": np.ones(2)})


# -- average_sources: the same bits, a slice at a time ----------------------------------------


Buffers = dict[np.dtype[np.generic], Array]


class ReusingSource:
    """A TensorSource at its most hostile: every read, from whichever source, overwrites the
    same buffer (one per dtype, in `buffers`); reads are checked against their promise and logged."""

    def __init__(
        self,
        collaborator: str,
        tensors: Mapping[str, Array],
        slice_elements: int,
        log: list[str],
        buffers: Buffers,
    ) -> None:
        """Serve `tensors` to a caller that promised slices of at most `slice_elements`."""
        self._collaborator, self._source = collaborator, ArraySource(tensors)
        self._sizes = {name: np.asarray(array).size for name, array in tensors.items()}
        self._limit, self._log, self._buffers = slice_elements, log, buffers

    def read(self, name: str, start: int, stop: int) -> Array:
        """A copy of the slice in the buffer the previous read used (scribbled over first)."""
        assert 0 <= start < stop <= self._sizes[name], (name, start, stop)
        assert stop - start <= self._limit, (name, start, stop)
        self._log.append(f"{name}[{start}:{stop}] {self._collaborator}")
        values = self._source.read(name, start, stop)
        buffer = self._buffers.setdefault(values.dtype, np.empty(self._limit, values.dtype))
        buffer.fill(1)  # whatever a caller kept of the previous read is now wrong
        buffer[: stop - start] = values
        return buffer[: stop - start]


def running_average(
    parts: Mapping[str, tuple[int, Mapping[str, Array]]], reference: Mapping[str, Array]
) -> dict[str, Array]:
    """`RunningAverage` fed `parts` in collaborator order."""
    average = RunningAverage(reference, sum(weight for weight, _ in parts.values()))
    for name in sorted(parts):
        average.add(name, *parts[name])
    return average.result()


def from_sources(
    parts: Mapping[str, tuple[int, Mapping[str, Array]]],
    reference: Mapping[str, Array],
    slice_elements: int,
    log: list[str] | None = None,
) -> dict[str, Array]:
    """`average_sources` of `parts`, read through ReusingSources that share their buffers."""
    log = [] if log is None else log
    buffers: Buffers = {}
    sources: dict[str, tuple[int, TensorSource]] = {
        name: (weight, ReusingSource(name, tensors, slice_elements, log, buffers))
        for name, (weight, tensors) in parts.items()
    }
    return average_sources(reference, sources, slice_elements=slice_elements)


def assert_same_bits(
    got: Mapping[str, Array], expected: Mapping[str, Array], *, nan_bits: bool = True
) -> None:
    """The same tensors with the same dtypes, shapes and bytes (-0.0 included); NaN payloads and
    signs too, unless not `nan_bits`: then a NaN where a NaN is expected is enough."""
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert (got[name].dtype, got[name].shape) == (array.dtype, array.shape), name
        values, wanted = got[name], array
        if not nan_bits and array.dtype.kind == "f":
            both = np.isnan(values) & np.isnan(wanted)
            values, wanted = np.where(both, 0, values), np.where(both, 0, wanted)
        assert values.tobytes() == wanted.tobytes(), (name, got[name], array)


DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64]


@st.composite
def averaging_cases(
    draw: st.DrawFn,
) -> tuple[dict[str, tuple[int, dict[str, Array]]], dict[str, Array], int]:
    """Contributions of one random tensor (any dtype, shape, values, layout), and a slice size."""
    dtype = np.dtype(draw(st.sampled_from([*DTYPES, np.bool_])))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    names = draw(
        st.lists(st.text("abcxyz", min_size=1, max_size=3), min_size=1, max_size=5, unique=True)
    )
    parts: dict[str, tuple[int, dict[str, Array]]] = {}
    for name in names:
        # Huge weights push integers onto the float64 path, as huge values do.
        weight = draw(st.integers(1, 1000) | st.integers(1, 2**40))
        array: Array = draw(hnp.arrays(dtype, shape))  # NaN, inf, -0.0, extremes included
        if array.ndim > 1 and draw(st.booleans()):
            array = np.asfortranarray(array)
        parts[name] = (weight, {"t": array})
    reference: dict[str, Array] = {"t": np.zeros(shape, dtype)}
    slice_elements = st.integers(1, int(np.prod(shape)) + 3) | st.sampled_from([64, 128, 2**18])
    return parts, reference, draw(slice_elements)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(averaging_cases())
def test_sources_give_the_bits_of_the_whole_model_formula(
    case: tuple[dict[str, tuple[int, dict[str, Array]]], dict[str, Array], int],
) -> None:
    """Any dtype, shape, weights and slice size: average_sources gives the bytes of the old paths.

    Where two NaNs meet in one operation numpy's vector loop keeps the first and its scalar tail
    loop the second, so which NaN comes out depends on where a slice ends (for RunningAverage's
    own slice too): NaN bits are compared exactly when slices end where the old ones did (a
    multiple of 64 elements, as the default is), other values always.
    """
    parts, reference, slice_elements = case
    with np.errstate(all="ignore"):  # inf - inf and overflowing casts warn, in every path alike
        got = from_sources(parts, reference, slice_elements)
        in_memory: dict[str, tuple[int, TensorSource]] = {
            name: (weight, ArraySource(tensors)) for name, (weight, tensors) in parts.items()
        }
        threaded = average_sources(reference, in_memory, slice_elements=slice_elements, workers=3)
        expected = running_average(parts, reference)
        contributions = {name: Contribution(w, tensors) for name, (w, tensors) in parts.items()}
        assert_same_bits(federated_average(contributions, reference), expected)
        if reference["t"].size:
            ordered = [(w, tensors["t"]) for _, (w, tensors) in sorted(parts.items())]
            assert_same_bits({"t": batch_mean(ordered, reference["t"].dtype)}, expected)
    assert_same_bits(got, expected, nan_bits=slice_elements % 64 == 0)
    assert_same_bits(threaded, expected, nan_bits=slice_elements % 64 == 0)


def test_nans_that_meet_keep_the_bits_of_the_old_path() -> None:
    """NaNs of both signs, infinities and -0.0 meeting element by element: the old bytes exactly."""
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5], dtype=np.float64)
    rng = np.random.default_rng(5)
    parts = {
        name: (weight, {"t": rng.choice(specials, size=(37, 5)).astype(np.float32)})
        for name, weight in (("a", 3), ("b", 1), ("c", 8), ("d", 2))
    }
    reference = {"t": np.zeros((37, 5), dtype=np.float32)}
    with np.errstate(invalid="ignore"):
        expected = running_average(parts, reference)
        for slice_elements in (64, 128, 2**18):
            assert_same_bits(from_sources(parts, reference, slice_elements), expected)
        for slice_elements in (1, 7, 100):  # slices end elsewhere: NaNs, but maybe other ones
            assert_same_bits(
                from_sources(parts, reference, slice_elements), expected, nan_bits=False
            )
    assert np.signbit(expected["t"][np.isnan(expected["t"])]).any()


@pytest.mark.parametrize("slice_elements", [1, 2, 5, 2**18])
def test_copies_read_from_sources_give_the_model_back(slice_elements: int) -> None:
    """Copies of one model, with any weights and slices, average to that model bit for bit."""
    model = {
        **MODEL,
        "empty": np.zeros((0, 3), dtype=np.float32),
        "flags": np.array([True, False, True]),
        "bytes": np.array([[0, 255], [7, 128]], dtype=np.uint8),
    }
    parts = {name: (weight, model) for name, weight in (("a", 7), ("b", 1), ("c", 1000))}
    assert_same_bits(from_sources(parts, model, slice_elements), model)


def test_reads_go_slice_by_slice_in_collaborator_order() -> None:
    """Each slice is read from every collaborator in name order; integers get a first pass."""
    tensors: dict[str, Array] = {
        "w": np.arange(5, dtype=np.float32),
        "n": np.arange(3, dtype=np.int64),
    }
    log: list[str] = []
    parts = {name: (1, tensors) for name in ("bob", "alice", "carol")}
    assert_same_bits(from_sources(parts, tensors, 2, log), tensors)
    slices = {"n": ["0:2", "2:3"], "w": ["0:2", "2:4", "4:5"]}
    trio = ("alice", "bob", "carol")
    magnitudes = [f"n[{s}] {who}" for s in slices["n"] for who in trio]
    assert log == [
        *magnitudes,
        *magnitudes,  # then the exact sums, in the same order
        *(f"w[{s}] {who}" for s in slices["w"] for who in trio),
    ]


def test_integer_fallback_is_decided_over_every_slice_of_every_contribution() -> None:
    """One value too large for int64 sums, in the last slice of the last contributor, sends the
    whole tensor onto the float64 path, as RunningAverage decides it."""
    big = 2**53 + 1  # float64 rounds it to 2**53: which path was taken shows in element 0
    small = np.array([big, 0, 0, 0, 0], dtype=np.int64)
    large = small.copy()
    large[-1] = 2**62  # 2**62 * 3 >= 2**63
    reference = {"i": np.zeros(5, dtype=np.int64)}
    exact = {name: (1, {"i": small}) for name in ("a", "b", "c")}
    fallback = {**exact, "c": (1, {"i": large})}
    assert from_sources(exact, reference, 2)["i"][0] == big
    averaged = from_sources(fallback, reference, 2)
    assert averaged["i"][0] == 2**53
    assert_same_bits(averaged, running_average(fallback, reference))


def test_memory_is_the_result_plus_a_few_slices() -> None:
    """8 contributions of a 16 MiB float32 tensor: traced peak under 16 MiB + 8 slices of 1 MiB,
    where RunningAverage's float64 running sum alone takes 32 MiB."""
    size, slice_elements = 4 * 2**20, 2**18  # 16 MiB of float32, read 1 MiB at a time
    base = np.linspace(-1, 1, size, dtype=np.float32)
    parts = {f"c{i}": (10 + i, {"w": base * np.float32(1 + i / 8)}) for i in range(8)}
    reference = {"w": base}
    sources: dict[str, tuple[int, TensorSource]] = {
        name: (weight, ArraySource(tensors)) for name, (weight, tensors) in parts.items()
    }

    def traced_peak(average: Callable[[], object]) -> int:
        """The peak of memory traced (numpy's buffers included) while `average` runs."""
        tracemalloc.start()
        try:
            average()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak = traced_peak(lambda: average_sources(reference, sources, slice_elements=slice_elements))
    old_peak = traced_peak(lambda: running_average(parts, reference))
    assert peak < 16 * 2**20 + 8 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert old_peak > 16 * 2**20 + 32 * 2**20, f"{old_peak / 2**20:.1f} MiB"  # the measure works
    # Read through sources that refuse a slice longer than promised: the same bits.
    log: list[str] = []
    averaged = from_sources(parts, reference, slice_elements, log)
    assert_same_bits(averaged, running_average(parts, reference))
    assert len(log) == 8 * size // slice_elements  # every read a whole slice, none more


class FileSource:
    """Each tensor in a raw file of its own, read with readinto into one reused buffer."""

    def __init__(
        self, paths: Mapping[str, Path], dtypes: Mapping[str, np.dtype[np.generic]]
    ) -> None:
        """Read tensor `name` from `paths[name]`, stored as `dtypes[name]`."""
        self._paths, self._dtypes = paths, dtypes
        self._buffer = bytearray()

    def read(self, name: str, start: int, stop: int) -> Array:
        """Elements [start, stop) of the file, in the buffer the previous read used."""
        itemsize = self._dtypes[name].itemsize
        size = (stop - start) * itemsize
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        with self._paths[name].open("rb") as file:
            file.seek(start * itemsize)
            assert file.readinto(memoryview(self._buffer)[:size]) == size
        return np.frombuffer(self._buffer, dtype=self._dtypes[name], count=stop - start)


def test_updates_on_disk_average_like_updates_in_memory(tmp_path: Path) -> None:
    """Contributions read from files a slice at a time give the bytes of those in memory."""
    rng = np.random.default_rng(3)
    dtypes = {name: array.dtype for name, array in MODEL.items()}
    parts: dict[str, tuple[int, dict[str, Array]]] = {}
    sources: dict[str, tuple[int, TensorSource]] = {}
    for collaborator, weight in (("alice", 17), ("bob", 3), ("carol", 101)):
        tensors = shifted(MODEL, float(rng.normal(scale=5)))
        paths = {name: tmp_path / f"{collaborator}.{name}" for name in tensors}
        for name, array in tensors.items():
            paths[name].write_bytes(array.tobytes())
        parts[collaborator] = (weight, tensors)
        sources[collaborator] = (weight, FileSource(paths, dtypes))
    contributions = {name: Contribution(w, tensors) for name, (w, tensors) in parts.items()}
    assert_same_bits(
        average_sources(MODEL, sources, slice_elements=3), federated_average(contributions, MODEL)
    )


def test_array_source_reads_any_layout_in_c_order() -> None:
    """Fortran-ordered and strided arrays are read in C order, a slice at a time."""
    array = np.arange(24, dtype=np.int32).reshape(4, 6)
    for layout in (array, np.asfortranarray(array), array.T.copy().T, array[:, ::-1][:, ::-1]):
        source = ArraySource({"t": layout})
        slices = [source.read("t", start, min(start + 5, 24)) for start in range(0, 24, 5)]
        assert [int(value) for part in slices for value in part] == list(range(24))


@pytest.mark.parametrize(
    ("reference", "weights", "slice_elements", "message"),
    [
        ({"t": np.zeros(2)}, {}, 4, "no contributions"),
        ({"t": np.zeros(2)}, {"a": 1, "b": 0}, 4, "positive weight"),
        ({"t": np.zeros(2)}, {"a": -3}, 4, "positive weight"),
        ({"t": np.zeros(2, dtype=np.complex64)}, {"a": 1}, 4, "cannot average dtype complex64"),
        ({"t": np.array(["x", "y"])}, {"a": 1}, 4, "'t': cannot average"),
        ({"t": np.zeros(2)}, {"a": 1}, 0, "slice_elements"),
    ],
)
def test_sources_are_refused_as_federated_average_refuses_them(
    reference: dict[str, Array], weights: dict[str, int], slice_elements: int, message: str
) -> None:
    """No contributions, a weight not above zero, a dtype that has no mean: ValueError, as before."""
    sources: dict[str, tuple[int, TensorSource]] = {
        name: (weight, ArraySource(reference)) for name, weight in weights.items()
    }
    with pytest.raises(ValueError, match=message):
        average_sources(reference, sources, slice_elements=slice_elements)
    if slice_elements > 0:
        contributions = {name: Contribution(w, reference) for name, w in weights.items()}
        with pytest.raises(ValueError, match=message):
            federated_average(contributions, reference)


def test_a_source_reading_the_wrong_length_is_named() -> None:
    """A slice of the wrong length is an error naming the tensor and collaborator, not a broadcast."""
    reference = {"t": np.zeros(4, dtype=np.float32)}
    short = ArraySource({"t": np.zeros(3, dtype=np.float32)})
    sources: dict[str, tuple[int, TensorSource]] = {
        "alice": (1, ArraySource(reference)),
        "bob": (1, short),
    }
    with pytest.raises(ValueError, match=r"'t' of 'bob': reading \[2, 4\) gave shape \[1\]"):
        average_sources(reference, sources, slice_elements=2)


def _rss_file_mb() -> float:
    """This process's resident pages mapped from files (RssFile), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_mapped_tensors_are_read_from_their_files_not_their_mappings(tmp_path: Path) -> None:
    """Slices of a mapped tensor come by pread: the mapping's pages never become resident."""
    values = np.arange(16 * 2**20, dtype=np.float32)  # 64 MiB
    path = tmp_path / "upload"
    path.write_bytes(b"head" + values.tobytes())
    mapped = np.memmap(path, dtype=np.float32, mode="r", offset=4, shape=values.shape)
    source = MappedArraySource({"t": mapped, "small": np.arange(5, dtype=np.int64)})
    before = _rss_file_mb()
    try:
        for start in range(0, values.size, 2**18):
            stop = min(start + 2**18, values.size)
            assert np.array_equal(source.read("t", start, stop), values[start:stop])
        assert source.read("small", 1, 4).tolist() == [1, 2, 3]
    finally:
        source.close()
    assert _rss_file_mb() - before < 16
    assert float(np.asarray(mapped).sum()) > 0  # through the mapping: now its pages are resident
    assert _rss_file_mb() - before > 48


def test_a_mapped_tensor_whose_file_is_gone_is_read_through_its_mapping(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    path.write_bytes(np.arange(10, dtype=np.float64).tobytes())
    mapped = np.memmap(path, dtype=np.float64, mode="r", shape=(10,))
    path.unlink()
    source = MappedArraySource({"t": mapped})
    assert source.read("t", 3, 6).tolist() == [3.0, 4.0, 5.0]
    source.close()


def test_threads_reading_mapped_files_give_the_bits_of_one(tmp_path: Path) -> None:
    """A close's sources (updates mapped from files) read by several threads at once: each
    thread reads into its own buffer, and the model is the one a single thread makes."""
    rng = np.random.default_rng(5)
    reference = {"w": np.zeros(3000, np.float32), "n": np.zeros(7, np.int64)}
    sources: dict[str, tuple[int, TensorSource]] = {}
    opened: list[MappedArraySource] = []
    for index, collaborator in enumerate(("alice", "bob", "carol", "dave")):
        values = rng.normal(size=3000).astype(np.float32)
        path = tmp_path / collaborator
        path.write_bytes(b"xyz" + values.tobytes())  # odd offset, as in an upload
        mapped = np.memmap(path, dtype=np.float32, mode="r", offset=3, shape=values.shape)
        source = MappedArraySource({"w": mapped, "n": np.arange(7, dtype=np.int64) * index})
        opened.append(source)
        sources[collaborator] = (10 + index, source)
    try:
        single = average_sources(reference, sources, slice_elements=64)
        threaded = average_sources(reference, sources, slice_elements=64, workers=4)
    finally:
        for source in opened:
            source.close()
    assert_same_bits(threaded, single)
    with pytest.raises(ValueError, match="workers"):
        average_sources(reference, sources, workers=0)
