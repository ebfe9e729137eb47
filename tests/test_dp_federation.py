"""DP-FedAvg at the aggregator, in plain Python: each round's model is the round's model plus the
sites' clipped updates, summed, noised from the federation's secret and divided by their number;
a huge update moves it by at most clip / n; the federation runs the rounds its budget allows and
says what it spent. Against both stores (`federations.store`)."""

from __future__ import annotations

import dataclasses
import math
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.dp_model import PrivateModel
from foedus.aggregator.fedavg import ArraySource
from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Array, ResultTensor, RoundSummary, TaskResult
from foedus.aggregator.runtime import Runtime
from foedus.aggregator.state import DurableState
from foedus.aggregator.storage import OutputFolder
from foedus.aggregator.store import FederationStore, MemoryStore
from foedus.history.rows import MetricsRow
from foedus.plans.schema import DifferentialPrivacySettings, Plan
from foedus.privacy.accountant import epsilon_after
from foedus.privacy.budget import training_rounds
from foedus.privacy.noise import NOISE_V1, NOISE_VERSION, NoiseSecret, gaussian

from federations import COLLABORATORS, UUID, federation, model, open_state, result, store
from servers import make_plan

__all__ = ["store"]  # the fixture, imported for its use here

SETTINGS = DifferentialPrivacySettings(enabled=True, clip=0.5, noise_multiplier=1.1)
# Each site's trained model: alice's update is within the clip, bob's and carol's are not.
TRAINED = {"alice": 0.1, "bob": 2.0, "carol": -3.0}
DATA_SIZES = {"alice": 1, "bob": 1000, "carol": 7}  # they weigh nothing under DP


def trained(value: float, reference: Mapping[str, Array]) -> dict[str, Array]:
    """A model whose every value is the reference's plus `value`, in the reference's dtypes."""
    return {
        name: (np.asarray(array, dtype=np.float64) + value).astype(array.dtype)
        for name, array in reference.items()
    }


def send(fed: Federation, name: str, tensors: Mapping[str, Array], data_size: int = 10) -> None:
    """`name`'s train result of the round in progress."""
    sent = tuple(ResultTensor(key, frozenset({"trained"}), value) for key, value in tensors.items())
    assert fed.submit(TaskResult(name, fed.round_number, "train", data_size, sent))


def expected(
    reference: Mapping[str, Array],
    uploads: Mapping[str, Mapping[str, Array]],
    secret: NoiseSecret,
    round_number: int,
) -> dict[str, Array]:
    """DP-FedAvg computed here, independently: whole tensors, numpy's norm, the noise function."""
    total = {name: np.zeros(np.size(array)) for name, array in reference.items()}
    base = {name: np.asarray(array, np.float64).reshape(-1) for name, array in reference.items()}
    for site in sorted(uploads):
        update = {
            name: np.asarray(uploads[site][name], np.float64).reshape(-1) - base[name]
            for name in reference
        }
        norm = math.sqrt(sum(float(np.sum(values**2)) for values in update.values()))
        factor = min(1.0, SETTINGS.clip / norm)
        for name in reference:
            total[name] += factor * update[name]
    model: dict[str, Array] = {}
    for name, array in reference.items():
        noise = (
            SETTINGS.noise_multiplier
            * SETTINGS.clip
            * gaussian(secret, round_number, name, 0, np.size(array))
        )
        values = base[name] + (total[name] + noise) / len(uploads)
        model[name] = values.astype(array.dtype).reshape(np.shape(array))
    return model


def assert_model(actual: Mapping[str, Array], wanted: Mapping[str, Array]) -> None:
    """The same tensors: dtypes and shapes exactly, values to float64's last bits (the norm here
    is numpy's, the aggregator's a sum of dot products)."""
    assert sorted(actual) == sorted(wanted)
    for name in wanted:
        assert actual[name].dtype == wanted[name].dtype and actual[name].shape == wanted[name].shape
        np.testing.assert_allclose(actual[name], wanted[name], rtol=1e-12, atol=0, err_msg=name)


def test_each_round_is_the_noised_mean_of_the_clipped_updates(store: FederationStore) -> None:
    """Two rounds: the model is the round's + (sum of clipped updates + the noise of the
    secret, the round and the tensor) / 3, whatever the data sizes; round 1's noise is not
    round 0's."""
    fed = federation(store, rounds=2, privacy=SETTINGS)
    secret = store.privacy_secret()
    assert len(secret.key) == 32 and store.privacy_secret() == secret  # made once
    for round_number in range(2):
        reference = fed.model()
        uploads = {site: trained(value, reference) for site, value in TRAINED.items()}
        for site, tensors in uploads.items():
            send(fed, site, tensors, DATA_SIZES[site])
        summary = fed.close_round_if_due()
        assert summary is not None and summary.trained
        assert_model(fed.model(), expected(reference, uploads, secret, round_number))
    assert not np.array_equal(gaussian(secret, 0, "b", 0, 2), gaussian(secret, 1, "b", 0, 2))


def test_a_huge_update_moves_the_model_by_at_most_clip_over_n_plus_the_noise() -> None:
    """bob sends weights 1e12 away, the others send the global model back: without the noise
    the model moves by exactly clip / 3 (L2 norm over every tensor), in bob's direction."""
    store = MemoryStore(model(), federation_uuid=UUID)
    fed = federation(store, rounds=1, privacy=SETTINGS)
    reference = fed.model()
    for site in COLLABORATORS:
        send(fed, site, trained(1e12 if site == "bob" else 0.0, reference))
    assert fed.close_round_if_due() is not None
    secret = store.privacy_secret()
    moved = []
    for name, array in fed.model().items():
        noise = gaussian(secret, 0, name, 0, array.size) * SETTINGS.noise_multiplier * SETTINGS.clip
        base = np.asarray(reference[name], np.float64).reshape(-1)
        moved.append(np.asarray(array, np.float64).reshape(-1) - base - noise / 3)
    shift = np.concatenate(moved)
    # float32 tensors round the model: a few float32 ulps of the values (about 1) more.
    assert np.linalg.norm(shift) <= SETTINGS.clip / 3 + 1e-6
    assert np.linalg.norm(shift) >= SETTINGS.clip / 3 - 1e-6
    assert np.all(shift > 0)


def test_integer_tensors_are_refused_at_the_close() -> None:
    """Noise cannot be added to an integer tensor (the plan's loader refuses it first)."""
    reference = {"w": np.zeros(3, np.float32), "steps": np.array(7, np.int64)}
    fed = Federation(
        collaborators=("alice",),
        tasks=("train",),
        rounds=1,
        model=reference,
        privacy=SETTINGS,
    )
    send(fed, "alice", reference)
    with pytest.raises(ValueError, match="'steps' is int64"):
        fed.close_round_if_due()


def play_round(fed: Federation, collaborators: Sequence[str]) -> RoundSummary:
    """Every site does its tasks of the round (trained: the model + 1); the round closes."""
    for site in collaborators:
        assignment = fed.assignment(site)
        assert not assignment.quit
        for task in assignment.tasks:
            if task == "train":
                send(fed, site, trained(1.0, fed.model()))
            else:
                sent = result(site, assignment.round_number, task, metrics={"accuracy": 0.5})
                assert fed.submit(sent)
    summary = fed.close_round_if_due()
    assert summary is not None
    return summary


def dp_plan(rounds: int, **settings: object) -> Plan:
    """A plan of `rounds` rounds with differential privacy (SETTINGS changed by `settings`)."""
    plan = make_plan(None, federation={"uuid": UUID, "rounds": rounds})
    return dataclasses.replace(plan, differential_privacy=dataclasses.replace(SETTINGS, **settings))


def test_the_federation_finishes_at_its_budget_and_says_what_it_spent(tmp_path: Path) -> None:
    """A cap between the epsilon of 3 rounds and of 4: of the plan's 6 rounds, 3 train, then
    the final validation; each training row has the epsilon spent so far; the last line names
    the epsilon spent of the cap."""
    cap = (epsilon_after(3, 1.1, 1e-5) + epsilon_after(4, 1.1, 1e-5)) / 2
    plan = dp_plan(6, max_epsilon=cap)
    assert training_rounds(plan) == 3
    assert training_rounds(dp_plan(6, max_epsilon=None)) == 6
    store = MemoryStore(model(), federation_uuid=UUID)
    fed = Federation.from_plan(plan, model(), store=store)
    assert fed.rounds == 3
    runtime = Runtime(plan, fed, OutputFolder(tmp_path))
    rows = []
    while not fed.finished:
        summary = play_round(fed, plan.collaborators)
        rows.append(MetricsRow.parse(runtime.metrics_row(summary.record).to_json()))
    assert [row.round_number for row in rows] == [0, 1, 2, 3]
    assert rows[-1].final_validation and rows[-1].dp is None
    for round_number, row in enumerate(rows[:-1]):
        assert row.dp == {"epsilon": epsilon_after(round_number + 1, 1.1, 1e-5), "delta": 1e-5}
    spent = epsilon_after(3, 1.1, 1e-5)
    assert runtime.final_line().endswith(
        f"; privacy budget: epsilon {spent:.2f} of {cap:g} at delta 1e-05 after 3 rounds"
    )


def test_a_plain_federations_rows_have_no_dp(tmp_path: Path) -> None:
    """Without differential privacy nothing changes: no `dp` key, no secret made."""
    plan = make_plan(None, federation={"uuid": UUID, "rounds": 2})
    state = open_state(tmp_path / "out")
    try:
        fed = Federation.from_plan(plan, model(), store=state, progress=state.recovered.progress)
        assert fed.rounds == 2 and fed.privacy is None
        assert not (tmp_path / "out" / "state" / "privacy.secret").exists()
        runtime = Runtime(plan, fed, OutputFolder(tmp_path / "out"))
        summary = play_round(fed, plan.collaborators)
        line = runtime.metrics_row(summary.record).to_json()
        assert '"dp"' not in line and "privacy" not in runtime.final_line()
    finally:
        state.close()


def test_the_secret_is_kept_private_and_survives_a_restart(tmp_path: Path) -> None:
    """The durable state's secret is made once, mode 0600, with today's noise version after
    it, and read back after a restart."""
    first = open_state(tmp_path / "out")
    try:
        federation(first, privacy=SETTINGS)
        secret = first.privacy_secret()
    finally:
        first.close()
    path = tmp_path / "out" / "state" / "privacy.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret.version == NOISE_VERSION
    assert path.read_bytes() == secret.key + bytes([NOISE_VERSION])
    again: DurableState = open_state(tmp_path / "out")
    try:
        assert again.privacy_secret() == secret
    finally:
        again.close()


def test_a_federation_begun_before_noise_versions_draws_as_it_did(tmp_path: Path) -> None:
    """A state whose secret file is the 32 bytes alone (made before versions were kept) is
    resumed with version 1's noise, the noise it added before: its model ends the same."""
    key = bytes(range(32))
    state = open_state(tmp_path / "out")
    try:
        (tmp_path / "out" / "state" / "privacy.secret").write_bytes(key)
        fed = federation(state, privacy=SETTINGS)
        assert state.privacy_secret() == NoiseSecret(key, NOISE_V1)
        reference = fed.model()
        uploads = {site: trained(value, reference) for site, value in TRAINED.items()}
        for site, tensors in uploads.items():
            send(fed, site, tensors)
        assert fed.close_round_if_due() is not None
        assert_model(fed.model(), expected(reference, uploads, NoiseSecret(key, NOISE_V1), 0))
        again = expected(reference, uploads, NoiseSecret(key, NOISE_VERSION), 0)
        assert not all(np.array_equal(fed.model()[name], again[name]) for name in again)
    finally:
        state.close()


def test_the_model_is_the_same_whatever_the_slices_and_threads() -> None:
    """Slices of 3 values over 4 threads, or whole tensors in one: the very same bytes (what a
    resume that computes the round again relies on)."""
    reference = {"a": np.linspace(-1, 1, 10, dtype=np.float32), "b": np.zeros((3, 3))}
    models = {site: trained(value, reference) for site, value in TRAINED.items()}
    uploads = {site: ArraySource(tensors) for site, tensors in models.items()}
    secret = NoiseSecret(bytes(range(32)))

    def computed(slice_elements: int, workers: int) -> dict[str, Array]:
        return PrivateModel(
            reference,
            uploads,
            settings=SETTINGS,
            secret=secret,
            round_number=4,
            slice_elements=slice_elements,
            workers=workers,
        ).arrays()

    whole = computed(1000, 1)
    for name, array in computed(3, 4).items():
        assert array.tobytes() == whole[name].tobytes(), name
    assert_model(whole, expected(reference, models, secret, 4))
