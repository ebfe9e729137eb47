"""Clipping an update's delta to L2 norm `clip`: a huge update moves the sum by at most `clip`."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from foedus.aggregator.fedavg import ArraySource
from foedus.collaborator.client import OutgoingTensor, task_results_parts
from foedus.privacy import (
    ClippedValues,
    add_clipped,
    clip_factor,
    clipped_model,
    delta_norm,
    factor_for,
    source_clip_factor,
    update_clips,
)
from foedus.protos import aggregator_pb2
from foedus.protos.stream import framed_chunks

RNG = np.random.default_rng(23)


def _model(scale: float = 1.0) -> dict[str, np.ndarray]:
    """A small model of three float tensors of other shapes and dtypes."""
    return {
        "conv.weight": (scale * RNG.standard_normal((4, 3, 5))).astype(np.float32),
        "conv.bias": (scale * RNG.standard_normal(4)).astype(np.float64),
        "fc.weight": (scale * RNG.standard_normal((7, 11))).astype(ml_dtypes.bfloat16),
    }


def _norm(delta: dict[str, np.ndarray]) -> float:
    """The L2 norm of every tensor's values together, the plain way."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in delta.values()])
    return float(np.linalg.norm(flat))


def _minus(
    trained: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    return {
        name: trained[name].astype(np.float64) - reference[name].astype(np.float64)
        for name in trained
    }


@pytest.mark.parametrize("slice_elements", [1, 7, 64, 2**18])
def test_the_norm_is_the_whole_updates_over_every_tensor(slice_elements: int) -> None:
    """Computed a slice at a time, the norm is the norm of all the values together."""
    reference, trained = _model(), _model()
    expected = _norm(_minus(trained, reference))
    norm = delta_norm(reference, ArraySource(trained), slice_elements=slice_elements)
    assert norm == pytest.approx(expected, rel=1e-12)
    delta = _minus(trained, reference)
    assert clip_factor(delta, 1.0, slice_elements=slice_elements) == pytest.approx(
        1.0 / expected, rel=1e-12
    )


def test_a_huge_update_moves_the_sum_by_at_most_clip() -> None:
    """Three honest sites and one that sends 1e6 times their update: the sum of the clipped
    deltas differs from the honest sites' sum by at most `clip`, and by exactly `clip` here."""
    clip = 0.5
    reference = _model()
    honest = [
        {k: v + (0.001 * _model()[k]).astype(v.dtype) for k, v in reference.items()}
        for _ in range(3)
    ]
    huge = {
        name: (v.astype(np.float64) + 1e6 * RNG.standard_normal(v.shape)).astype(v.dtype)
        for name, v in reference.items()
    }

    def clipped_sum(sites: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        total = {name: np.zeros(v.size) for name, v in reference.items()}
        for site in sites:
            factor = source_clip_factor(reference, ArraySource(site), clip)
            for name in reference:
                add_clipped(
                    total[name], site[name].reshape(-1), reference[name].reshape(-1), factor
                )
        return total

    without = clipped_sum(honest)
    with_huge = clipped_sum([*honest, huge])
    moved = _norm({name: with_huge[name] - without[name] for name in without})
    assert moved == pytest.approx(clip, rel=1e-9)
    honest_sum = {
        n: sum(_minus(site, reference)[n].reshape(-1) for site in honest) for n in reference
    }
    assert _norm({n: without[n] - honest_sum[n] for n in without}) < 1e-12  # small: unclipped


def test_an_update_within_clip_is_left_as_it_is() -> None:
    """Factor 1, and the site uploads the very arrays it trained."""
    reference = _model()
    trained = {name: v + (1e-3 * np.ones_like(v)).astype(v.dtype) for name, v in reference.items()}
    assert source_clip_factor(reference, ArraySource(trained), 10.0) == 1.0
    clipped = clipped_model(reference, trained, 10.0)
    assert all(clipped[name] is trained[name] for name in trained)


def test_a_site_clips_its_upload_in_its_own_dtypes() -> None:
    """clipped_model: the delta scaled to `clip` (up to the dtype's rounding), shapes and dtypes
    kept; the aggregator's clip of it then changes it by no more than that rounding."""
    reference = _model()
    trained = _model(scale=100.0)
    clipped = clipped_model(reference, trained, 2.0)
    for name in trained:
        assert clipped[name].dtype == trained[name].dtype
        assert clipped[name].shape == trained[name].shape
    norm = _norm(_minus(clipped, reference))
    assert norm == pytest.approx(2.0, rel=1e-2)  # bfloat16 keeps 8 bits
    again = source_clip_factor(reference, ArraySource(clipped), 2.0)
    assert again == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("cut", [1, 3, 7, 4096])
def test_values_clipped_a_piece_at_a_time_are_the_clipped_models_bytes(cut: int) -> None:
    """A site that sends its update raw clips it as it frames it (`update_clips`,
    `ClippedValues`): whatever byte ranges the chunks cut, values split among them, the bytes
    are `clipped_model`'s, in every dtype."""
    reference, trained = _model(), _model(scale=100.0)
    clips = update_clips(reference, trained, 2.0)
    clipped = clipped_model(reference, trained, 2.0)
    assert set(clips) == set(trained)
    for name, array in trained.items():
        made = ClippedValues(array, clips[name].reference, clips[name].factor)
        assert len(made) == array.nbytes
        pieces = [
            bytes(made.bytes_at(start, min(start + cut, len(made))))
            for start in range(0, len(made), cut)
        ]
        assert b"".join(pieces) == clipped[name].tobytes(), name


def test_an_update_within_clip_has_nothing_to_clip_as_it_is_framed() -> None:
    """Within `clip` the factor is 1: no tensor is scaled (the arrays go as they are)."""
    reference = _model()
    trained = {name: values + values.dtype.type(0.01) for name, values in reference.items()}
    assert update_clips(reference, trained, 10.0) == {}


def test_an_upload_clipped_as_it_is_framed_is_the_clipped_models_upload() -> None:
    """The client's chunks of a train result clipped as it is framed are byte for byte those of
    the clipped model framed as it is: the aggregator receives the same upload either way."""
    reference, trained = _model(), _model(scale=100.0)
    clips = update_clips(reference, trained, 2.0)
    head = aggregator_pb2.TaskResults(round_number=3, task_name="train", data_size=5)
    made = task_results_parts(
        head, [OutgoingTensor(n, a, tags=("trained",), clip=clips[n]) for n, a in trained.items()]
    )
    whole = task_results_parts(
        head,
        [
            OutgoingTensor(n, a, tags=("trained",))
            for n, a in clipped_model(reference, trained, 2.0).items()
        ],
    )
    assert sum(map(len, made)) == sum(map(len, whole))  # the size the client declares
    assert list(framed_chunks(made, 100)) == list(framed_chunks(whole, 100))


def test_float32_and_float64_clip_in_their_own_arithmetic_within_a_rounding() -> None:
    """Those dtypes scale in their own arithmetic (no float64 detour): each value within a few
    roundings of reference + factor x delta computed in float64, a slice boundary
    crossed (2**18 values) and the norm past `clip` by a rounding at most."""
    size = 2**18 + 5
    reference = {"w": RNG.standard_normal(size).astype(np.float32), "b": RNG.standard_normal(9)}
    trained = {name: values + 0.25 for name, values in reference.items()}
    clipped = clipped_model(reference, trained, 3.0)
    factor = 3.0 / _norm(_minus(trained, reference))
    for name, values in clipped.items():
        assert values.dtype == reference[name].dtype
        moved = factor * (trained[name].astype(np.float64) - reference[name])
        bound = 4 * np.finfo(values.dtype).eps * (np.abs(reference[name]) + np.abs(moved))
        assert np.all(np.abs(values - (reference[name] + moved)) <= bound)
    assert _norm(_minus(clipped, reference)) <= 3.0 * (1 + 1e-5)


def test_values_whose_squares_overflow_have_a_finite_norm() -> None:
    """1e200 squared is past float64: the norm is still sqrt(2) x 1e200, the factor finite."""
    delta = {"w": np.array([1e200, -1e200]), "b": np.array([3.0])}
    factor = clip_factor(delta, 1.0, slice_elements=1)
    assert factor == pytest.approx(1 / (math.sqrt(2) * 1e200), rel=1e-12)
    assert factor > 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_an_update_that_is_not_finite_moves_nothing(bad: float) -> None:
    """NaN or infinity cannot be bounded: factor 0, and the update adds nothing to the sum (not
    0 x NaN); a site uploads it as it is, for the aggregator's check of non-finite values."""
    reference = {"w": np.zeros(3, dtype=np.float32)}
    trained = {"w": np.array([1.0, bad, 2.0], dtype=np.float32)}
    assert clip_factor(trained, 1.0) == 0.0
    factor = source_clip_factor(reference, ArraySource(trained), 1.0)
    assert factor == 0.0
    total = np.array([1.0, 2.0, 3.0])
    add_clipped(total, trained["w"], reference["w"], factor)
    assert total.tolist() == [1.0, 2.0, 3.0]
    assert clipped_model(reference, trained, 1.0)["w"] is trained["w"]


def test_add_clipped_adds_factor_times_the_delta_in_float64() -> None:
    """total += factor x (trained - reference), in place, the slices' own dtypes read as float64."""
    total = np.array([1.0, 1.0, 1.0])
    trained = np.array([3.0, 1.0, -1.0], dtype=np.float32)
    reference = np.array([1.0, 1.0, 1.0], dtype=ml_dtypes.bfloat16)
    add_clipped(total, trained, reference, 0.25)
    assert total.tolist() == [1.5, 1.0, 0.5]


@pytest.mark.parametrize(
    ("norm", "expected"), [(0.0, 1.0), (2.0, 1.0), (4.0, 0.5), (1e300, 2e-300)]
)
def test_the_factor_is_min_one_clip_over_norm(norm: float, expected: float) -> None:
    """Within clip: 1; past it: clip / norm."""
    assert factor_for(norm, 2.0) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf, math.nan])
def test_a_clip_that_bounds_nothing_is_refused(clip: float) -> None:
    """Zero, negative, infinite or NaN: a ValueError naming clip."""
    with pytest.raises(ValueError, match="clip is a finite number > 0"):
        factor_for(1.0, clip)
