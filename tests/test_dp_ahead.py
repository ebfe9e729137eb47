"""A DP round's clip factors and noise made while the round is open (`aggregator/dp_ahead.py`):
the close's model is the very same bytes whatever was made ahead, the noise held is bounded and
handed over once, and a federation makes them for its accepted uploads, also after a restart."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.dp_ahead import RoundAhead, UploadOpener, model_slices, scaled_noise
from foedus.aggregator.dp_model import PrivateModel
from foedus.aggregator.fedavg import ArraySource
from foedus.aggregator.records import Array
from foedus.aggregator.store import FederationStore
from foedus.privacy.clipping import source_clip_factor
from foedus.privacy.noise import NoiseSecret, gaussian

from federations import federation, open_state, store
from test_dp_federation import SETTINGS, TRAINED, assert_model, expected, send, trained

__all__ = ["store"]  # the fixture, imported for its use here

SECRET = NoiseSecret(bytes(range(32)))
WAIT = 30.0  # seconds a test waits for the thread at most (it takes milliseconds)
# Tensors of odd sizes cut in slices of 4: 3 + 3 + 1 slices, the last of each shorter.
REFERENCE = {
    "a": np.linspace(-1, 1, 9, dtype=np.float32),
    "b": np.arange(12, dtype=np.float64).reshape(3, 4) / 7,
    "c": np.array(0.5, dtype=np.float32),
}
SLICE = 4
SLICES = list(model_slices(REFERENCE, SLICE))


def opener(tensors: Mapping[str, Array]) -> UploadOpener:
    """Opens `tensors` as an upload, as the federation opens an accepted result's file."""
    return lambda: contextlib.nullcontext(ArraySource(tensors))


def made_ahead(
    uploads: Mapping[str, Mapping[str, Array]], sites: tuple[str, ...], noise_slices: int
) -> RoundAhead:
    """A round's work made ahead to the end: the factors of `sites`, the first `noise_slices`
    slices of noise."""
    ahead = RoundAhead(
        SETTINGS, SECRET, 4, REFERENCE, slice_elements=SLICE, noise_bytes=noise_slices * SLICE * 8
    ).start()
    for site in sites:
        ahead.accepted(site, opener(uploads[site]))
    assert ahead.join(WAIT)
    ahead.stop()  # as the close does
    return ahead


def test_the_slices_are_the_closes() -> None:
    """Tensors in name order, each cut from 0 in steps of the slice, the last one shorter."""
    assert SLICES == [
        ("a", 0, 4),
        ("a", 4, 8),
        ("a", 8, 9),
        ("b", 0, 4),
        ("b", 4, 8),
        ("b", 8, 12),
        ("c", 0, 1),
    ]


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize(
    ("sites", "noise_slices"),
    [((), 0), (("bob",), 2), (("alice", "carol"), 5), (tuple(TRAINED), len(SLICES))],
)
def test_the_model_is_the_same_bytes_whatever_was_made_ahead(
    sites: tuple[str, ...], noise_slices: int, workers: int
) -> None:
    """Nothing, some or all of the factors and the noise made ahead: the very bytes of the
    close that makes them all itself, and DP-FedAvg computed independently."""
    uploads = {site: trained(value, REFERENCE) for site, value in TRAINED.items()}

    def computed(ahead: RoundAhead | None) -> dict[str, Array]:
        return PrivateModel(
            REFERENCE,
            {site: ArraySource(tensors) for site, tensors in uploads.items()},
            settings=SETTINGS,
            secret=SECRET,
            round_number=4,
            slice_elements=SLICE,
            workers=workers,
            ahead=ahead,
        ).arrays()

    alone = computed(None)
    together = computed(made_ahead(uploads, sites, noise_slices))
    for name, array in alone.items():
        assert together[name].tobytes() == array.tobytes(), name
    assert_model(together, expected(REFERENCE, uploads, SECRET, 4))


def test_the_noise_held_is_bounded_and_handed_over_once() -> None:
    """A bound of 3 slices' noise: those 3 are made, scaled as the close scales them, and each
    is handed over once; the others are the close's to make."""
    ahead = made_ahead({}, (), 3)
    for piece in SLICES[:3]:
        noise = ahead.noise(*piece)
        assert noise is not None
        wanted = gaussian(SECRET, 4, *piece) * (SETTINGS.noise_multiplier * SETTINGS.clip)
        assert noise.tobytes() == wanted.tobytes()
        assert noise.tobytes() == scaled_noise(SETTINGS, SECRET, 4, piece).tobytes()
        assert ahead.noise(*piece) is None
    assert all(ahead.noise(*piece) is None for piece in SLICES[3:])


def test_the_factors_made_ahead_are_the_closes() -> None:
    """Each upload's factor, as the close computes it: bob's and carol's cut to clip, alice's
    kept, an update with a NaN moving nothing; a site nobody made a factor for has none."""
    uploads = {site: trained(value, REFERENCE) for site, value in TRAINED.items()}
    uploads["carol"]["b"][1, 2] = np.nan
    ahead = made_ahead(uploads, ("alice", "bob", "carol"), 0)
    for site, tensors in uploads.items():
        wanted = source_clip_factor(REFERENCE, ArraySource(tensors), SETTINGS.clip)
        assert ahead.factor(site) == wanted
    assert ahead.factor("alice") == 1.0 and ahead.factor("carol") == 0.0
    assert 0 < (ahead.factor("bob") or 0) < 1
    assert ahead.factor("dave") is None


def test_a_stopped_round_makes_nothing_more() -> None:
    """Stopped before it starts: no thread, no noise, an upload accepted later is not read."""
    ahead = RoundAhead(SETTINGS, SECRET, 4, REFERENCE, slice_elements=SLICE)
    ahead.stop()
    ahead.start()

    def never() -> contextlib.AbstractContextManager[ArraySource]:
        raise AssertionError("a stopped round read an upload")

    ahead.accepted("alice", never)
    assert ahead.join(WAIT)
    assert ahead.noise(*SLICES[0]) is None and ahead.factor("alice") is None


def test_an_upload_that_cannot_be_read_ahead_is_left_to_the_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reading an upload fails: one warning, no factor (the close reads it and says why)."""

    def broken() -> contextlib.AbstractContextManager[ArraySource]:
        raise OSError("the disk is gone")

    ahead = RoundAhead(SETTINGS, SECRET, 4, REFERENCE, slice_elements=SLICE, noise_bytes=0)
    with caplog.at_level(logging.WARNING, logger="foedus.aggregator.dp_ahead"):
        ahead.start().accepted("alice", broken)
        assert ahead.join(WAIT)
    assert ahead.factor("alice") is None
    assert [r.getMessage() for r in caplog.records] == [
        "round 4: computing ahead for its close failed; the close computes it"
    ]


def test_a_federation_makes_each_rounds_work_while_it_is_open(store: FederationStore) -> None:
    """Two DP rounds, each made ahead to the end before its close: each model is the noised
    mean of the clipped updates of that round (round 1's work is made from round 1's model)."""
    fed = federation(store, rounds=2, privacy=SETTINGS)
    secret = store.privacy_secret()
    for round_number in range(2):
        reference = fed.model()
        uploads = {site: trained(value, reference) for site, value in TRAINED.items()}
        for site, tensors in uploads.items():
            send(fed, site, tensors)
        assert fed.wait_prepared(WAIT)
        summary = fed.close_round_if_due()
        assert summary is not None and summary.trained
        assert_model(fed.model(), expected(reference, uploads, secret, round_number))
    assert fed.finished and fed.wait_prepared(WAIT)  # the final round makes nothing


def test_a_restarted_federation_makes_the_factors_of_the_uploads_it_kept(tmp_path: Path) -> None:
    """Two uploads accepted, the aggregator restarted: the new one makes their factors and the
    noise, the third upload arrives, and the model is the one the first would have made."""
    first = open_state(tmp_path / "out")
    try:
        fed = federation(first, rounds=1, privacy=SETTINGS)
        secret = first.privacy_secret()
        reference = fed.model()
        uploads = {site: trained(value, reference) for site, value in TRAINED.items()}
        send(fed, "alice", uploads["alice"])
        send(fed, "bob", uploads["bob"])
        fed.stop()
    finally:
        first.close()
    again = open_state(tmp_path / "out")
    try:
        fed = federation(again, rounds=1, privacy=SETTINGS)
        assert fed.wait_prepared(WAIT)
        send(fed, "carol", uploads["carol"])
        assert fed.wait_prepared(WAIT)
        assert fed.close_round_if_due() is not None
        assert_model(fed.model(), expected(reference, uploads, secret, 0))
    finally:
        again.close()


def test_a_stopped_federation_still_closes_its_round_the_same(store: FederationStore) -> None:
    """`stop` (the aggregator stopping) ends the round's thread; a close after it computes all
    it needs itself: the same model."""
    fed = federation(store, rounds=1, privacy=SETTINGS)
    fed.stop()
    assert fed.wait_prepared(WAIT)
    reference = fed.model()
    uploads = {site: trained(value, reference) for site, value in TRAINED.items()}
    for site, tensors in uploads.items():
        send(fed, site, tensors)
    assert fed.wait_prepared(WAIT)
    assert fed.close_round_if_due() is not None
    assert_model(fed.model(), expected(reference, uploads, store.privacy_secret(), 0))
