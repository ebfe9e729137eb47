"""Adaptive clipping for DP-FedAvg (Andrew et al. 2021), in plain Python: the clip moves toward
the target quantile of the sites' update norms by the round's noisy count of unclipped updates,
each round's model is clipped to its clip and noised with the update's share of the noise
multiplier, the count's noise has its std, and a federation stopped between rounds resumes with
the same clips and the same model bytes. Against both stores (`federations.store`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Array, ResultTensor, RoundSummary, TaskResult
from foedus.aggregator.runtime import Runtime
from foedus.aggregator.storage import OutputFolder
from foedus.aggregator.store import FederationStore
from foedus.history.rows import MetricsRow
from foedus.plans.schema import AdaptiveClippingSettings, DifferentialPrivacySettings
from foedus.privacy.adaptive import CLIP_RANGE, count_normal, moved_clip, unclipped_share
from foedus.privacy.budget import plan_text
from foedus.privacy.noise import CLIP_COUNT_STREAM, NoiseSecret, gaussian

from federations import COLLABORATORS, UUID, federation, model, open_state, store
from servers import make_plan

__all__ = ["store"]  # the fixture, imported for its use here

# 2 x count_noise (0.6) above the round's noise multiplier (0.5): the update's is 0.905.
ADAPTIVE = AdaptiveClippingSettings(target_quantile=0.5, learning_rate=0.2, count_noise=0.3)
SECRET = NoiseSecret(bytes(range(32)))
ELEMENTS = 6  # model(): a 2x2 float32 tensor and a float64 vector of 2


def settings(clip: float) -> DifferentialPrivacySettings:
    """Differential privacy with adaptive clipping from `clip`."""
    return DifferentialPrivacySettings(
        enabled=True, clip=clip, noise_multiplier=0.5, adaptive_clipping=ADAPTIVE
    )


def uploads_of_norm(norm: float, reference: Mapping[str, Array]) -> dict[str, dict[str, Array]]:
    """Each site's trained model: the reference plus an update of L2 norm `norm`, every value
    the same (alice's), or alternating in sign (bob's, carol's)."""
    step = norm / math.sqrt(ELEMENTS)
    models: dict[str, dict[str, Array]] = {}
    for index, site in enumerate(COLLABORATORS):
        models[site] = {}
        for name, array in reference.items():
            signs = np.resize([1.0, -1.0 if index else 1.0], np.size(array)).reshape(
                np.shape(array)
            )
            models[site][name] = (np.asarray(array, np.float64) + step * signs).astype(array.dtype)
    return models


def play_round(fed: Federation, uploads: Mapping[str, Mapping[str, Array]]) -> RoundSummary:
    """Every site sends its trained model; the round closes."""
    for site, tensors in uploads.items():
        sent = tuple(
            ResultTensor(key, frozenset({"trained"}), value) for key, value in tensors.items()
        )
        assert fed.submit(TaskResult(site, fed.round_number, "train", 10, sent))
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained
    return summary


def expected_model(
    reference: Mapping[str, Array],
    uploads: Mapping[str, Mapping[str, Array]],
    clip: float,
    round_number: int,
) -> dict[str, Array]:
    """A round of DP-FedAvg with adaptive clipping computed here: each delta clipped to `clip`
    (numpy's norm), the noise of the model's stream times z_delta x clip, z_delta worked out
    from z^-2 = z_delta^-2 + (2 count_noise)^-2."""
    z_delta = (0.5**-2 - (2 * 0.3) ** -2) ** -0.5
    base = {name: np.asarray(array, np.float64).reshape(-1) for name, array in reference.items()}
    total = {name: np.zeros(values.size) for name, values in base.items()}
    for site in sorted(uploads):
        delta = {
            name: np.asarray(uploads[site][name], np.float64).reshape(-1) - base[name]
            for name in base
        }
        norm = math.sqrt(sum(float(np.sum(values**2)) for values in delta.values()))
        for name in base:
            total[name] += min(1.0, clip / norm) * delta[name]
    model: dict[str, Array] = {}
    for name, array in reference.items():
        noise = z_delta * clip * gaussian(SECRET, round_number, name, 0, np.size(array))
        values = base[name] + (total[name] + noise) / len(uploads)
        model[name] = values.astype(array.dtype).reshape(np.shape(array))
    return model


def expected_clip(clip: float, unclipped: int, round_number: int) -> float:
    """The next clip worked out here: clip x exp(-0.2 x (noisy share - 0.5)), the share's noise
    from the count's own stream."""
    normal = float(gaussian(SECRET, round_number, "", 0, 1, stream=CLIP_COUNT_STREAM)[0])
    share = (unclipped - 1.5 + 0.3 * normal) / 3 + 0.5
    return clip * math.exp(-0.2 * (share - 0.5))


def with_secret(store: FederationStore) -> FederationStore:
    """`store` drawing its noise from SECRET: the durable one from its file, the memory one set."""
    location = store.location
    if location is None:
        store._secret = SECRET  # type: ignore[attr-defined]  # MemoryStore's, made at first call
    else:
        (location / "privacy.secret").write_bytes(SECRET.key + bytes([SECRET.version]))
    assert store.privacy_secret() == SECRET
    return store


@pytest.mark.parametrize(
    ("norm", "initial", "unclipped"),
    [
        pytest.param(1.0, 0.1, 0, id="every-update-clipped-the-clip-grows"),
        pytest.param(0.01, 1.0, 3, id="no-update-clipped-the-clip-shrinks"),
    ],
)
def test_the_clip_moves_toward_the_target_quantile(
    store: FederationStore, tmp_path: Path, norm: float, initial: float, unclipped: int
) -> None:
    """Every site's update of norm 1 under a clip of 0.1 (all clipped): the clip grows each
    round; of norm 0.01 under a clip of 1 (none clipped): it shrinks. Each round's clip and
    model are worked out here; its metrics row's `dp` says the clip the round used.

    The direction could only be wrong if the count's noise (std 0.3 / 3 on the share) moved the
    share past 0.5 the other way: a standard normal beyond 5, about 3e-7 a round (and SECRET
    is fixed: what holds once holds always)."""
    fed = federation(with_secret(store), rounds=4, privacy=settings(initial))
    plan = make_plan(None, federation={"uuid": UUID, "rounds": 4})
    plan = dataclasses.replace(plan, differential_privacy=settings(initial))
    runtime = Runtime(plan, fed, OutputFolder(tmp_path / "rows"))
    clip = initial
    for round_number in range(4):
        reference = fed.model()
        uploads = uploads_of_norm(norm, reference)
        summary = play_round(fed, uploads)
        following = expected_clip(clip, unclipped, round_number)
        assert (summary.clip, summary.next_clip) == (clip, pytest.approx(following, rel=1e-12))
        assert (following > clip) == (unclipped == 0)
        for name, array in expected_model(reference, uploads, clip, round_number).items():
            np.testing.assert_allclose(fed.model()[name], array, rtol=1e-12, err_msg=name)
        row = MetricsRow.parse(runtime.metrics_row(summary.record).to_json())
        assert row.dp is not None and row.dp["clip"] == clip
        assert summary.next_clip is not None
        clip = summary.next_clip


def test_the_count_noise_has_its_std_and_a_stream_of_its_own() -> None:
    """The count's standard normals over 4000 rounds: mean 0 and std 1, each within 5 of its
    standard errors (a false alarm about 6e-7 each; SECRET is fixed, so the test cannot
    flicker); on the unclipped share of 3 sites they are noise of std count_noise / 3. They are
    not the model's noise of any tensor named ""."""
    rounds = 4000
    normals = np.array([count_normal(SECRET, r) for r in range(rounds)])
    assert abs(normals.mean()) < 5 / math.sqrt(rounds)
    assert abs(normals.std() - 1) < 5 / math.sqrt(2 * rounds)
    shares = np.array([unclipped_share(ADAPTIVE, 2, 3, normal) for normal in normals])
    assert abs(shares.std() - 0.3 / 3) < 5 * 0.1 / math.sqrt(2 * rounds)
    assert abs(shares.mean() - 2 / 3) < 5 * 0.1 / math.sqrt(rounds)
    model_stream = [float(gaussian(SECRET, r, "", 0, 1)[0]) for r in range(10)]
    assert list(normals[:10]) != model_stream


def test_the_first_line_says_the_clip_adapts_and_how_the_noise_is_shared() -> None:
    """`aggregator start`'s first line: the starting clip, the quantile, the round's noise
    multiplier and the update's share of it."""
    plan = make_plan(None, federation={"uuid": UUID, "rounds": 4})
    plan = dataclasses.replace(plan, differential_privacy=settings(0.1))
    assert plan_text(plan).startswith(
        "differential privacy (clip 0.1 at first, adapting to the 0.5 quantile of the sites' "
        "update norms, noise multiplier 0.5 (the update's 0.9045, with the noise on the count "
        "of unclipped sites); privacy budget: epsilon "
    )


def test_the_clip_stays_within_its_range() -> None:
    """A share far off the target (a huge count noise's draw) moves the clip at most
    CLIP_RANGE from the plan's: the clip and the noise stay finite and positive."""
    fast = dataclasses.replace(ADAPTIVE, learning_rate=1e6)
    assert moved_clip(fast, 1.0, -1.0, initial=1.0) == pytest.approx(CLIP_RANGE)
    assert moved_clip(fast, 1.0, 2.0, initial=1.0) == pytest.approx(1 / CLIP_RANGE)
    assert moved_clip(ADAPTIVE, 2.0, 0.5, initial=1.0) == 2.0  # on target: unchanged


def test_a_stopped_federation_resumes_with_its_clip_and_the_same_model(tmp_path: Path) -> None:
    """A durable federation stopped after round 1 of 3 and opened again: the clip of the round
    in progress read back from its record, and the same clips and model bytes at the end as an
    undisturbed run of the same secret."""

    def run(folder: Path, stop_after: int | None) -> tuple[list[float | None], dict[str, bytes]]:
        clips: list[float | None] = []
        state = open_state(folder)
        try:
            fed = federation(with_secret(state), rounds=3, privacy=settings(0.1))
            while not fed.finished:
                clips.append(play_round(fed, uploads_of_norm(1.0, fed.model())).clip)
                if stop_after is not None and fed.round_number == stop_after:
                    state.close()
                    state = open_state(folder)
                    assert state.recovered.progress.clip is not None
                    fed = federation(state, rounds=3, privacy=settings(0.1))
                    stop_after = None
            return clips, {name: array.tobytes() for name, array in fed.model().items()}
        finally:
            state.close()

    undisturbed = run(tmp_path / "undisturbed", None)
    resumed = run(tmp_path / "resumed", 1)
    assert resumed == undisturbed
    clips = undisturbed[0]
    assert clips[0] == 0.1 and len(set(clips)) == 3
    assert model().keys() == undisturbed[1].keys()
