"""Weighted FedAvg: exact weights, exact dtypes, and the same bits whatever the arrival order."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from aggregator import fedavg
from aggregator.fedavg import Contribution, RunningAverage, federated_average, weighted_metrics
from aggregator.federation import Array, Federation, ResultTensor, TaskResult

MODEL: dict[str, Array] = {
    "f16": np.array([1.0, -2.5, 3.25], dtype=np.float16),
    "f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "f64": np.array([[0.1, 0.2], [0.3, 1e300]], dtype=np.float64),
    "i64": np.array([0, 10, -10, 7], dtype=np.int64),
    "scalar": np.array(3, dtype=np.int64),
}


def shifted(model: dict[str, Array], by: float) -> dict[str, Array]:
    """`model` with `by` added to every tensor, dtypes kept."""
    return {name: (array + by).astype(array.dtype) for name, array in model.items()}


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
            {k: (v + rng.normal(scale=s, size=v.shape)).astype(v.dtype) for k, v in model.items()},
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
            return (quotient + up.astype(np.int64)).astype(dtype)
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
    monkeypatch.setattr(fedavg, "_SLICE", slice_size)
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
