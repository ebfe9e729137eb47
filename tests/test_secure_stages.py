"""A secure federation's rounds in plain Python, over the memory store and the durable one: the
stages' closing rule, resends, refusals of what sites post and upload, dropouts, failed rounds,
and a restart that goes on with the very same messages and model. The sites are real
(`foedus.secure.SiteRound` with pki's certificates); only the socket is left out."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foedus.aggregator.checks import PLAINTEXT_REFUSED
from foedus.aggregator.federation import Federation
from foedus.aggregator.records import (
    Array,
    RoundCommit,
    RoundRecord,
    SecureClose,
    SecurePost,
    TaskResult,
)
from foedus.aggregator.runtime import Runtime
from foedus.aggregator.state import DurableState
from foedus.aggregator.storage import OutputFolder, read_model
from foedus.aggregator.store import FederationStore, MemoryStore
from foedus.pki.layout import CertsLayout
from foedus.plans.schema import (
    AGGREGATED_MODEL_VALIDATION,
    BestModelSettings,
    DifferentialPrivacySettings,
    StragglerPolicy,
    StragglerSettings,
)
from foedus.privacy.noise import NoiseSecret
from foedus.privacy.shares import NoiseShares
from foedus.refusals.errors import InvalidRequestError, PreconditionError
from foedus.secure import WEIGHT_TENSOR, RevealedShare, SealedShare, SecretKind
from foedus.secure.wire import Post, Relay, Stage

from clocks import Clock
from federations import COLLABORATORS, UUID, federation, model, open_state, result, store
from old_states import before_secure, schema_of
from secure_sites import SETTINGS, Sites, certificate_der, masked_result, post, relay
from servers import make_plan

__all__ = ["store"]  # the fixture, used by name

# Each site's delta (the same value in every element) and sample count.
DELTAS = {"alice": (0.1, 10), "bob": (-0.2, 30), "carol": (0.5, 60)}
# One value's quantization error at most: half a unit of 1 / scale, per site, over the weight.
SCALE = (2**31 - 1) / (len(COLLABORATORS) * SETTINGS.max_weight * SETTINGS.clip)


def secure_federation(store: FederationStore | None = None, **options: Any) -> Federation:
    """alice, bob and carol training two rounds around `model()`, aggregating securely."""
    settings: dict[str, Any] = {
        "tasks": ("train",),
        "rounds": 2,
        "secure": SETTINGS,
        "federation_uuid": UUID,
        **options,
    }
    return federation(store, **settings)


def delta_of(name: str) -> dict[str, Array]:
    """`name`'s delta over `model()`."""
    value = DELTAS[name][0]
    return {key: np.full(array.shape, value) for key, array in model().items()}


def expected(names: tuple[str, ...]) -> float:
    """The weighted mean of `names`' deltas: each element of the next model (from zeros)."""
    total = sum(DELTAS[name][1] for name in names)
    return sum(DELTAS[name][0] * DELTAS[name][1] for name in names) / total


def secure_rows(store: FederationStore) -> int:
    """How many secure posts and closes the store keeps."""
    if isinstance(store, MemoryStore):
        return len(store.secure_posts) + len(store.secure_closes)
    assert isinstance(store, DurableState)
    connection = sqlite3.connect(store.root / "state.sqlite")
    try:
        posts = connection.execute("SELECT COUNT(*) FROM secure_posts").fetchone()[0]
        closes = connection.execute("SELECT COUNT(*) FROM secure_closes").fetchone()[0]
    finally:
        connection.close()
    return int(posts) + int(closes)


def through_upload(fed: Federation, certs: CertsLayout, uploaders: tuple[str, ...]) -> Sites:
    """Every site posts its keys and shares; `uploaders` upload their masked updates."""
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys()
    sites.shares()
    for name in uploaders:
        sites.upload(name, delta_of(name), DELTAS[name][1])
    return sites


def assert_model(fed: Federation, names: tuple[str, ...]) -> None:
    """The global model is the round's (zeros) plus the weighted mean of `names`' deltas."""
    for key, array in fed.model().items():
        assert array.dtype == model()[key].dtype
        np.testing.assert_allclose(array, expected(names), atol=2 / SCALE, rtol=0)


# -- a whole round ---------------------------------------------------------------------------


def test_a_secure_round_closes_with_the_unmasked_weighted_mean(
    store: FederationStore, certs: CertsLayout
) -> None:
    """Every stage in order: the next model is the weighted mean of the deltas within the
    quantization, the stages' rows are gone, and the next round's stages are open."""
    fed = secure_federation(store)
    sites = through_upload(fed, certs, COLLABORATORS)
    assert relay(fed, "alice", 0, Stage.SURVIVORS).ready is False
    assert fed.close_round_if_due() is None  # decided: now the survivors confirm
    assert relay(fed, "alice", 0, Stage.SURVIVORS).members == COLLABORATORS
    assert fed.assignment("alice").tasks == ()  # the round waits for its unmasking
    sites.confirm(COLLABORATORS)
    assert fed.close_round_if_due() is None
    sites.reveal(COLLABORATORS)
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained and summary.reporters == COLLABORATORS
    assert summary.metrics == {"train": {"loss": 0.5}}
    assert_model(fed, COLLABORATORS)
    assert secure_rows(store) == 0
    assert relay(fed, "alice", 1, Stage.KEYS) == Relay(1, Stage.KEYS, ready=False)


@pytest.mark.parametrize(
    ("dropped", "when"),
    [("carol", "before its upload"), ("carol", "while unmasking")],
)
def test_the_round_closes_without_a_site_that_left(
    store: FederationStore, certs: CertsLayout, dropped: str, when: str
) -> None:
    """A site that leaves before its upload (its masks removed with its mask key's shares) or
    after confirming (its seed rebuilt from the others' shares): the survivors' exact mean."""
    fed = secure_federation(store)
    uploaders = COLLABORATORS if when == "while unmasking" else ("alice", "bob")
    sites = through_upload(fed, certs, uploaders)
    if when == "before its upload":
        fed.leave(dropped, "its disk died")
    assert fed.close_round_if_due() is None
    sites.confirm(uploaders)
    if when == "while unmasking":
        fed.leave(dropped, "its disk died")
    sites.reveal(("alice", "bob"))
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained
    assert_model(fed, uploaders)


def test_the_state_never_holds_a_sites_update(tmp_path: Path, certs: CertsLayout) -> None:
    """Recognisable updates (one value repeated): no file of the state holds one site's values,
    as floats or encoded in the ring, while its masked upload waits nor after the round."""
    state = open_state(tmp_path)
    try:
        fed = secure_federation(state)
        sites = through_upload(fed, certs, COLLABORATORS)
        fed.close_round_if_due()
        sites.confirm(COLLABORATORS)
        while_unmasking = _state_bytes(tmp_path)
        sites.reveal(COLLABORATORS)
        assert fed.close_round_if_due() is not None
        after = _state_bytes(tmp_path)
    finally:
        state.close()
    # The scan sees tensors: the new global model, the sum the round may learn, is there.
    mean = np.float32(expected(COLLABORATORS))
    assert np.full(4, mean, np.float32).tobytes() in after
    fixed = sites.rounds["alice"].context.fixed_point
    for name, (value, weight) in DELTAS.items():
        patterns = [
            np.full(4, value, np.float32).tobytes(),
            np.full(4, value, np.float64).tobytes(),
            np.tile(fixed.encode(np.array([value]), weight), 4).tobytes(),
        ]
        for pattern in patterns:
            assert pattern not in while_unmasking and pattern not in after, name


def _state_bytes(folder: Path) -> bytes:
    """Every file under the state folder (the database and its log too), end to end."""
    return b"".join(p.read_bytes() for p in sorted((folder / "state").rglob("*")) if p.is_file())


# -- the state holds nothing that correlates with a site's update ---------------------------------

# Updates made recognisable: random, and summing to nothing (equal weights), so the one model the
# round may learn (their sum) is zero and any value correlated with one of them is a leak.
BIG = {"b": np.zeros(256, dtype=np.float64), "w": np.zeros((16, 32), dtype=np.float32)}
WINDOW = 128  # values compared at each place: a random window's correlation has sd 1/sqrt(128)
LEAK = 0.5  # about 6 sd: no chance match in the few million windows scanned


def recognisable_updates() -> dict[str, dict[str, Array]]:
    """alice r, bob p - r, carol -p (r, p uniform in +-0.4, within the clip): their sum is 0."""
    rng = np.random.default_rng(22)
    r = {key: rng.uniform(-0.4, 0.4, array.shape) for key, array in BIG.items()}
    p = {key: rng.uniform(-0.4, 0.4, array.shape) for key, array in BIG.items()}
    return {"alice": r, "bob": {k: p[k] - r[k] for k in BIG}, "carol": {k: -p[k] for k in BIG}}


def sliding_correlation(values: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Pearson's correlation of `pattern` with every window of `values` of its length (0 where a
    window is constant or holds a value that is not finite or 1000 times beyond the pattern's:
    such values are no copy of it, and would drown the running sums' precision)."""
    n = pattern.size
    with np.errstate(invalid="ignore", over="ignore"):  # any bytes, read as floats: NaN and all
        x = values.astype(np.float64)
        bad = ~np.isfinite(x) | (np.abs(x) > 1e3 * np.abs(pattern).max())
    x[bad] = 0.0
    y = (pattern - pattern.mean()) / pattern.std()
    sums = np.concatenate(([0.0], np.cumsum(x)))
    squares = np.concatenate(([0.0], np.cumsum(x * x)))
    flagged = np.concatenate(([0], np.cumsum(bad)))
    mean = (sums[n:] - sums[:-n]) / n
    var = (squares[n:] - squares[:-n]) / n - mean * mean
    covariance = np.correlate(x, y, mode="valid") / n
    usable = (var > 1e-12 * np.maximum(1.0, mean * mean)) & (flagged[n:] == flagged[:-n])
    result = np.zeros(covariance.size)
    result[usable] = covariance[usable] / np.sqrt(var[usable])
    return result


def strongest_correlation(data: bytes, pattern: np.ndarray, dtype: type[np.generic]) -> float:
    """The largest |correlation| of `pattern` with `data` read as `dtype` at every byte phase."""
    size = np.dtype(dtype).itemsize
    best = 0.0
    for phase in range(size):
        usable = (len(data) - phase) // size
        if usable < pattern.size:
            continue
        values = np.frombuffer(data, dtype=dtype, count=usable, offset=phase)
        best = max(best, float(np.abs(sliding_correlation(values, pattern)).max()))
    return best


def leaks(data: bytes, update: Mapping[str, Array], encoded: Mapping[str, Array]) -> list[str]:
    """The forms of `update` that `data` holds values correlated with: floats (32 or 64 bits,
    as the update or as the trained model, the same here: the model is zero) or ring values."""
    found = []
    for key, values in update.items():
        plain = np.asarray(values, dtype=np.float64).reshape(-1)[:WINDOW]
        ring = np.asarray(encoded[key]).reshape(-1)[:WINDOW].astype(np.float64)
        for form, pattern, dtype in (
            ("float32", plain, np.float32),
            ("float64", plain, np.float64),
            ("ring", ring, np.int32),
        ):
            if strongest_correlation(data, pattern, dtype) > LEAK:
                found.append(f"{key} as {form}")
    return found


# Differential privacy on top: the noise is small beside the updates, so a leak would still
# correlate (clip 20: each update, of L2 norm about 6.4, is not cut), and each site's noised
# update is looked for as well as its own.
PRIVACY = DifferentialPrivacySettings(enabled=True, clip=20.0, noise_multiplier=0.005)
PRIVATE_RING = dataclasses.replace(SETTINGS, clip=PRIVACY.share_bound(2), max_weight=1)


@pytest.mark.parametrize("private", [False, True], ids=["secure", "secure-with-dp"])
def test_the_state_holds_nothing_correlated_with_a_sites_update(
    tmp_path: Path, certs: CertsLayout, private: bool
) -> None:
    """Three recognisable updates summing to zero: while the masked uploads wait for their
    unmasking and once the round is closed, no file under the aggregator's folder holds values
    correlated with any site's update, as floats or as its ring encoding; the scan does find
    one planted among the same files' bytes, and the model is their sum (zero). With
    differential privacy each site adds its noise share first: nor is its noised update
    there, the model is the shares' mean, and the aggregator keeps no noise secret."""
    updates = recognisable_updates()
    settings = PRIVATE_RING if private else SETTINGS
    shares = {
        name: NoiseShares(PRIVACY, 2, NoiseSecret(bytes([index]) * 32))
        for index, name in enumerate(COLLABORATORS)
    }
    weight = 1 if private else 20
    state = DurableState.open(tmp_path, UUID, lambda: BIG, max_tensor_bytes=2**20)
    try:
        fed = Federation(
            collaborators=COLLABORATORS,
            tasks=("train",),
            rounds=2,
            model=BIG,
            clock=Clock(),
            store=state,
            progress=state.recovered.progress,
            secure=settings,
            federation_uuid=UUID,
            privacy=PRIVACY if private else None,
        )
        sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID, settings=settings)
        sites.keys()
        sites.shares()
        for name in COLLABORATORS:
            sites.upload(name, updates[name], weight, shares=shares[name] if private else None)
        fed.close_round_if_due()
        sites.confirm(COLLABORATORS)
        while_unmasking = _folder_bytes(tmp_path)
        sites.reveal(COLLABORATORS)
        summary = fed.close_round_if_due()
        assert summary is not None and summary.trained
        after = _folder_bytes(tmp_path)
        scale = sites.rounds["alice"].context.fixed_point.scale
        for key, array in fed.model().items():
            size = array.size
            noise = sum(shares[name].noise(0)(key, 0, size) for name in COLLABORATORS)
            mean = noise.reshape(array.shape) / 3 if private else 0
            np.testing.assert_allclose(array, mean, atol=3 / scale + 1e-7)
        assert not (tmp_path / "state" / "privacy.secret").exists()
    finally:
        state.close()
    fixed = sites.rounds["alice"].context.fixed_point
    forms = dict(updates)
    if private:  # each update as its site noised it, too
        for name, update in updates.items():
            noised = {
                k: v + shares[name].noise(0)(k, 0, v.size).reshape(v.shape)
                for k, v in update.items()
            }
            forms[f"{name}, noised"] = noised
    for name, update in forms.items():
        encoded = {k: fixed.signed(fixed.encode(v.reshape(-1), weight)) for k, v in update.items()}
        assert leaks(while_unmasking, update, encoded) == [], name
        assert leaks(after, update, encoded) == [], name
        planted = after + np.asarray(update["w"], np.float32).tobytes() + after[:999]
        assert "w as float32" in leaks(planted, update, encoded), name
        planted = while_unmasking[:13] + encoded["b"].astype(np.int32).tobytes()
        assert "b as ring" in leaks(planted, update, encoded), name


def _folder_bytes(folder: Path) -> bytes:
    """Every file under `folder` (the state, its database and log, the models), end to end."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


# -- a malicious site ----------------------------------------------------------------------------


def test_a_share_that_does_not_open_is_relayed_and_the_others_suffice(
    certs: CertsLayout, caplog: pytest.LogCaptureFixture
) -> None:
    """carol seals garbage for alice: the aggregator cannot tell (it cannot open a share), so
    takes it; alice logs that she holds no share of carol's and goes on; carol's seed is rebuilt
    from bob's share and her own, and the round closes at the three sites' mean."""
    fed = secure_federation()
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys()
    sites.shares(["alice", "bob"])
    carol = sites.rounds["carol"]
    got = relay(fed, "carol", 0, Stage.KEYS)
    carol.accept_keys(got.members, got.keys)
    sealed = tuple(
        dataclasses.replace(share, ciphertext=bytes(len(share.ciphertext)))
        if share.receiver == "alice"
        else share
        for share in carol.sealed_shares()
    )
    assert post(fed, "carol", Post(0, Stage.SHARES, shares=sealed))
    with caplog.at_level(logging.WARNING, logger="foedus.secure.site"):
        for name in COLLABORATORS:
            sites.upload(name, delta_of(name), DELTAS[name][1])
    (line,) = [r.getMessage() for r in caplog.records if "holds no share" in r.getMessage()]
    assert "site 'alice' holds no share of carol's" in line and "its share does not open" in line
    fed.close_round_if_due()
    sites.confirm(COLLABORATORS)
    sites.reveal(COLLABORATORS)
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained
    assert_model(fed, COLLABORATORS)


def test_an_upload_outside_the_ring_or_of_the_wrong_length_is_refused_and_the_round_goes_on(
    certs: CertsLayout,
) -> None:
    """carol uploads 64-bit values into a 32-bit ring, then one value too many: each refused
    (INVALID_ARGUMENT), nothing kept; she sends nothing valid, so the round closes at the
    cut-off with alice and bob (her masks removed with her mask key's shares) at their mean."""
    clock = Clock()
    straggler = StragglerSettings(StragglerPolicy.CUTOFF, cutoff_seconds=30, min_reports=2)
    fed = secure_federation(clock=clock, straggler=straggler)
    for name in COLLABORATORS:
        fed.assignment(name)  # the round's clock starts with its first assignment
    sites = through_upload(fed, certs, ("alice", "bob"))
    carol = sites.rounds["carol"]
    got = relay(fed, "carol", 0, Stage.SHARES)
    carol.accept_shares(got.members, got.shares)
    masked = carol.masked_update(delta_of("carol"), DELTAS["carol"][1])
    wide = {name: array.astype(np.uint64) + np.uint64(2**32) for name, array in masked.items()}
    longer = {**masked, "b": np.append(masked["b"], masked["b"][:1])}
    for bad, says in (
        (wide, "tensor 'b' is uint64; this federation's masked values are uint32"),
        (longer, "masked tensor 'b' has shape [3], not [2]"),
    ):
        with pytest.raises(InvalidRequestError, match=re.escape(says)):
            fed.submit(masked_result("carol", 0, bad))
    assert sorted(result.collaborator for result in fed.accepted()) == ["alice", "bob"]
    clock.now += 31
    assert fed.close_round_if_due() is None  # decided without carol: the survivors confirm
    assert relay(fed, "alice", 0, Stage.SURVIVORS).members == ("alice", "bob")
    sites.confirm(("alice", "bob"))
    sites.reveal(("alice", "bob"))
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained and summary.reporters == ("alice", "bob")
    assert_model(fed, ("alice", "bob"))


@pytest.mark.parametrize(
    ("weight", "outcome"),
    [(3 * 100 + 1, "outside 3..300"), (-100, "outside 3..300"), (0, None)],
    ids=["over the limit", "negative", "zero"],
)
def test_a_masked_weight_out_of_range_fails_the_round_only_when_the_sum_shows_it(
    certs: CertsLayout, caplog: pytest.LogCaptureFixture, weight: int, outcome: str | None
) -> None:
    """carol masks a weight of her choosing (her values weighted by 60). The aggregator sees
    only the survivors' summed weight: out of 3..300 (three sites of 1..max_weight 100) the
    round closes untrained, saying so; a zero weight among honest ones sums into range and
    cannot be told apart: carol's values then count over alice's and bob's weight alone."""
    fed = secure_federation()
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys()
    sites.shares()
    for name in ("alice", "bob"):
        sites.upload(name, delta_of(name), DELTAS[name][1])
    carol = sites.rounds["carol"]
    got = relay(fed, "carol", 0, Stage.SHARES)
    carol.accept_shares(got.members, got.shares)
    masked = carol.masked_update(delta_of("carol"), 60)
    shift = np.array([weight - 60], dtype=np.int64).astype(np.uint32)  # mod 2^32
    masked[WEIGHT_TENSOR] = masked[WEIGHT_TENSOR] + shift  # the ring's addition
    assert fed.submit(masked_result("carol", 0, masked))
    fed.close_round_if_due()
    sites.confirm(COLLABORATORS)
    sites.reveal(COLLABORATORS)
    with caplog.at_level(logging.WARNING, logger="foedus.aggregator.secure_stages"):
        summary = fed.close_round_if_due()
    assert summary is not None
    if outcome is not None:
        assert not summary.trained
        assert "round 0 closes untrained: round 0's summed weight is not usable" in caplog.text
        assert outcome in caplog.text
        for key, array in fed.model().items():
            np.testing.assert_array_equal(array, model()[key])
        return
    assert summary.trained
    weighted = sum(value * samples for value, samples in DELTAS.values())
    for array in fed.model().values():
        np.testing.assert_allclose(array, weighted / (10 + 30), atol=3 / SCALE, rtol=0)


# -- the closing rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "straggler",
    [
        StragglerSettings(StragglerPolicy.CUTOFF, cutoff_seconds=30),
        StragglerSettings(offline_after_seconds=30),
    ],
    ids=["cutoff", "offline"],
)
def test_a_stage_closes_without_a_silent_site_by_the_straggler_policy(
    certs: CertsLayout, straggler: StragglerSettings
) -> None:
    """KEYS waits for carol until the cut-off (or her silence) and closes with t or more:
    carol is then excluded, her late post refused."""
    clock = Clock()
    fed = secure_federation(clock=clock, straggler=straggler)
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
    sites.keys(["alice", "bob"])
    clock.now += 29
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
    fed.close_round_if_due()
    assert relay(fed, "alice", 0, Stage.KEYS).ready is False
    clock.now += 2
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
    fed.close_round_if_due()
    assert relay(fed, "alice", 0, Stage.KEYS).members == ("alice", "bob")
    assert relay(fed, "carol", 0, Stage.KEYS) == Relay(
        0, Stage.KEYS, ready=True, excluded=True, members=("alice", "bob")
    )
    late = Post(0, Stage.KEYS, keys=sites.rounds["carol"].advertisement())
    with pytest.raises(PreconditionError, match="round 0's KEYS stage closed without carol"):
        post(fed, "carol", late)


def test_a_site_left_out_of_a_stage_is_not_awaited_by_the_round(certs: CertsLayout) -> None:
    """carol, silent, is left out of KEYS; back online she cannot report, so the round closes
    with alice and bob instead of waiting for her."""
    clock = Clock()
    fed = secure_federation(clock=clock, straggler=StragglerSettings(offline_after_seconds=30))
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys(["alice", "bob"])
    clock.now += 31
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
    fed.close_round_if_due()
    sites.shares(["alice", "bob"])
    fed.liveness.seen("carol")  # back, and online from now on
    for name in ("alice", "bob"):
        sites.upload(name, delta_of(name), DELTAS[name][1])
    assert fed.close_round_if_due() is None  # decided without carol: the survivors confirm
    assert relay(fed, "carol", 0, Stage.SURVIVORS).excluded
    sites.confirm(("alice", "bob"))
    sites.reveal(("alice", "bob"))
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == ("alice", "bob") and summary.trained
    assert_model(fed, ("alice", "bob"))


def test_a_stage_below_the_threshold_fails_the_round_untrained(
    store: FederationStore, certs: CertsLayout, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Everyone but alice left before posting keys: KEYS closes with one site, the round closes
    untrained with one line saying why (and its console line says so)."""
    fed = secure_federation(store)
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys(["alice"])
    fed.leave("bob", "gone")
    with caplog.at_level(logging.WARNING, logger="foedus.aggregator.secure_stages"):
        fed.leave("carol", "gone")
        summary = fed.close_round_if_due()
    assert summary is not None and not summary.trained and summary.reporters == ()
    lines = [r.getMessage() for r in caplog.records if "untrained" in r.getMessage()]
    assert lines == [
        "round 0 closes untrained: round 0's KEYS stage closed with 1 site(s) (alice), fewer "
        "than the threshold of 2 (secure_aggregation.threshold); the global model stays as it was"
    ]
    assert fed.round_number == 1
    for key, array in fed.model().items():
        np.testing.assert_array_equal(array, model()[key])
    plan = dataclasses.replace(make_plan(None), secure_aggregation=SETTINGS)
    runtime = Runtime(plan, fed, OutputFolder(tmp_path))
    line = runtime.round_line(summary)
    assert "reported nobody (missing alice,bob,carol)  untrained: secure aggregation failed" in line
    # Were it the federation's last round, the model the final line names is written anyway.
    runtime.out = io.StringIO()
    runtime.record(dataclasses.replace(summary, finished=True))
    assert read_model(runtime.output.last_model, 1 << 20).keys() == model().keys()


def test_fewer_survivors_than_the_threshold_close_the_round_untrained(
    store: FederationStore, certs: CertsLayout
) -> None:
    """Only alice uploads, bob and carol leave: one survivor, below t, so nothing is revealed
    and the model stays."""
    fed = secure_federation(store)
    through_upload(fed, certs, ("alice",))
    fed.leave("bob", "gone")
    fed.leave("carol", "gone")
    summary = fed.close_round_if_due()
    assert summary is not None and not summary.trained and summary.reporters == ("alice",)
    assert fed.round_number == 1 and secure_rows(store) == 0


def test_a_secret_that_cannot_be_rebuilt_closes_the_round_untrained(
    store: FederationStore, certs: CertsLayout, caplog: pytest.LogCaptureFixture
) -> None:
    """carol dropped; alice reveals a forged share of carol's mask key: with t = 2 of the two
    survivors no subset rebuilds it, so the round closes untrained, saying whose secret."""
    fed = secure_federation(store)
    sites = through_upload(fed, certs, ("alice", "bob"))
    fed.leave("carol", "gone")
    fed.close_round_if_due()
    sites.confirm(("alice", "bob"))
    confirmations = relay(fed, "alice", 0, Stage.UNMASK).confirmations
    shares = sites.rounds["alice"].revealed_shares(("alice", "bob"), confirmations)
    forged = tuple(
        dataclasses.replace(share, share=bytes(66)) if share.owner == "carol" else share
        for share in shares
    )
    assert post(fed, "alice", Post(0, Stage.UNMASK, revealed=forged))
    sites.reveal(("bob",))
    with caplog.at_level(logging.WARNING, logger="foedus.aggregator.secure_stages"):
        summary = fed.close_round_if_due()
    assert summary is not None and not summary.trained
    assert summary.reporters == ("alice", "bob")
    assert "round 0 closes untrained: round 0's masks cannot be removed" in caplog.text
    assert "'carol'" in caplog.text
    for key, array in fed.model().items():
        np.testing.assert_array_equal(array, model()[key])


# -- resends and refusals -----------------------------------------------------------------------


def test_a_resend_changes_nothing_and_a_different_second_post_is_refused(
    store: FederationStore, certs: CertsLayout
) -> None:
    """The same post again is answered OK (False: a resend), also after the stage closed; a
    different one is refused."""
    fed = secure_federation(store)
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    keys = Post(0, Stage.KEYS, keys=sites.rounds["alice"].advertisement())
    assert post(fed, "alice", keys)
    assert not post(fed, "alice", keys)
    other = Sites.of(fed, certs, ["alice"], uuid=UUID).rounds["alice"].advertisement()
    with pytest.raises(PreconditionError, match="alice already posted a different KEYS message"):
        post(fed, "alice", Post(0, Stage.KEYS, keys=other))
    sites.keys(["bob", "carol"])
    assert relay(fed, "bob", 0, Stage.KEYS).members == COLLABORATORS
    assert not post(fed, "alice", keys)  # its answer was lost while the stage closed


def _keys(sites: Sites, name: str, **changes: Any) -> Post:
    advertisement = sites.rounds[name].advertisement()
    return Post(0, Stage.KEYS, keys=dataclasses.replace(advertisement, **changes))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"collaborator": "bob"}, "the keys are advertised as 'bob''s; alice advertises its own"),
        ({"mask_key": b"k" * 31}, "mask_key is 31 bytes long, not 32"),
        ({"seed_commitment": b""}, "seed_commitment is 0 bytes long, not 32"),
        ({"mask_key": bytes(32)}, "mask_key is a low-order point: it agrees no secret"),
        ({"certificate": b"not a certificate"}, "the certificate is not DER X.509"),
        ({"certificate": "bob"}, "the certificate is issued to bob, not to alice"),
        ({"signature": b""}, "the keys' signature is 0 bytes long"),
        ({"encryption_key": b"e" * 32}, "the keys' signature is not its certificate's"),
    ],
    ids=[
        "name",
        "key-length",
        "commitment",
        "low-order",
        "not-der",
        "bobs-certificate",
        "unsigned",
        "swapped",
    ],
)
def test_keys_that_cannot_be_the_callers_are_refused(
    certs: CertsLayout, change: dict[str, Any], message: str
) -> None:
    """Each malformed or forged advertisement is INVALID_ARGUMENT, naming what is wrong; nothing kept."""
    fed = secure_federation()
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    if change.get("certificate") == "bob":
        change = {"certificate": certificate_der(certs, "bob")}
    with pytest.raises(InvalidRequestError) as refused:
        post(fed, "alice", _keys(sites, "alice", **change))
    assert message in str(refused.value)
    assert post(fed, "alice", _keys(sites, "alice"))  # the honest post still goes through


def test_keys_of_another_round_or_federation_do_not_verify(certs: CertsLayout) -> None:
    """A replayed advertisement (signed for round 1, or for another federation) is refused."""
    fed = secure_federation()
    for round_number, uuid in ((1, UUID), (0, "another-federation")):
        replayed = Sites.of(fed, certs, ["alice"], round_number=round_number, uuid=uuid)
        keys = Post(0, Stage.KEYS, keys=replayed.rounds["alice"].advertisement())
        with pytest.raises(InvalidRequestError, match="forged, or of another round"):
            post(fed, "alice", keys)


def test_posts_out_of_turn_are_refused_with_what_to_do(
    store: FederationStore, certs: CertsLayout
) -> None:
    """Another round, a stage not yet open, a stage the caller is not in: FAILED_PRECONDITION."""
    fed = secure_federation(store)
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    with pytest.raises(PreconditionError, match=r"round 1 is not the round in progress \(0\)"):
        post(fed, "alice", Post(1, Stage.KEYS, keys=sites.rounds["alice"].advertisement()))
    share = SealedShare("alice", "alice", b"x" * 100)
    with pytest.raises(PreconditionError, match="KEYS stage's members are not known yet"):
        post(fed, "alice", Post(0, Stage.SHARES, shares=(share,)))
    zeros = {name: np.zeros(a.shape, np.uint32) for name, a in model().items()}
    zeros[WEIGHT_TENSOR] = np.zeros(1, np.uint32)
    with pytest.raises(PreconditionError, match="SHARES stage has not closed"):
        fed.submit(masked_result("alice", 0, zeros))
    fed.leave("carol", "gone")
    sites.keys(["alice", "bob"])
    with pytest.raises(PreconditionError, match="carol is not among round 0's KEYS stage's"):
        post(fed, "carol", Post(0, Stage.SHARES, shares=(share,)))


def test_shares_must_go_one_to_each_holder_among_the_members(
    store: FederationStore, certs: CertsLayout
) -> None:
    """Shares from another sender, to a stranger or a non-member, twice to one, or missing one:
    INVALID_ARGUMENT."""
    fed = secure_federation(store)
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys()
    alice = sites.rounds["alice"]
    got = relay(fed, "alice", 0, Stage.KEYS)
    alice.accept_keys(got.members, got.keys)
    honest = tuple(alice.sealed_shares())
    rows: list[tuple[tuple[SealedShare, ...], str]] = [
        (
            (dataclasses.replace(honest[0], sender="bob"), *honest[1:]),
            "a share says it is from 'bob'",
        ),
        ((*honest[:2], SealedShare("alice", "mallory", b"x" * 100)), "addressed to 'mallory'"),
        ((*honest[:2], honest[1]), "two shares are addressed to bob"),
        (honest[:2], "no share for carol"),
        ((*honest[:2], dataclasses.replace(honest[2], ciphertext=b"")), "0 bytes long"),
    ]
    for shares, message in rows:
        with pytest.raises(InvalidRequestError, match=message):
            post(fed, "alice", Post(0, Stage.SHARES, shares=shares))
    assert post(fed, "alice", Post(0, Stage.SHARES, shares=honest))


def test_confirmations_and_revealed_shares_are_checked(
    store: FederationStore, certs: CertsLayout
) -> None:
    """A confirmation over another list or unsigned, a share of the wrong kind or of an owner
    the caller does not hold: INVALID_ARGUMENT; the honest ones close the round."""
    fed = secure_federation(store)
    sites = through_upload(fed, certs, ("alice", "bob"))
    fed.leave("carol", "gone")
    fed.close_round_if_due()
    honest = sites.rounds["alice"].confirmation(("alice", "bob"))
    for bad, message in (
        (dataclasses.replace(honest, survivors=COLLABORATORS), "round 0's survivors are"),
        (dataclasses.replace(honest, collaborator="bob"), "signed as 'bob'"),
        (dataclasses.replace(honest, signature=b"s" * 64), "signature is not its certificate's"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            post(fed, "alice", Post(0, Stage.SURVIVORS, confirmation=bad))
    sites.confirm(("alice", "bob"))
    survivors = ("alice", "bob")
    confirmations = relay(fed, "alice", 0, Stage.UNMASK).confirmations
    shares = sites.rounds["alice"].revealed_shares(survivors, confirmations)
    carol = next(share for share in shares if share.owner == "carol")
    assert carol.kind is SecretKind.MASK_PRIVATE_KEY
    for bad_shares, message in (
        ([dataclasses.replace(carol, kind=SecretKind.SELF_MASK_SEED)], "carol is not a survivor"),
        ([RevealedShare("mallory", SecretKind.SELF_MASK_SEED, b"s" * 66)], "'mallory'"),
        ([carol, carol], "two revealed shares of carol's"),
        ([dataclasses.replace(carol, share=b"s")], "1 bytes long; a share takes 66"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            post(fed, "alice", Post(0, Stage.UNMASK, revealed=tuple(bad_shares)))
    sites.reveal(survivors)
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained
    assert_model(fed, survivors)


def test_a_plaintext_or_malformed_upload_is_refused(
    store: FederationStore, certs: CertsLayout
) -> None:
    """A float update (as OpenFL sends), a wrong ring, a missing weight, a plain data size, a
    site excluded from SHARES: each refused with its status; nothing kept."""
    fed = secure_federation(store)
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    fed.leave("carol", "gone")
    sites.keys(["alice", "bob"])
    sites.shares(["alice", "bob"])
    with pytest.raises(InvalidRequestError) as refused:
        fed.submit(result("alice", 0))
    assert str(refused.value) == f"tensor 'w' is float32: {PLAINTEXT_REFUSED}"
    alice = sites.rounds["alice"]
    got = relay(fed, "alice", 0, Stage.SHARES)
    alice.accept_shares(got.members, got.shares)
    masked = alice.masked_update(delta_of("alice"), 10)
    narrow = {name: array.astype(np.uint16) for name, array in masked.items()}
    rows: list[tuple[Any, str]] = [
        (masked_result("alice", 0, narrow), "are uint32 (secure_aggregation.bits)"),
        (
            masked_result("alice", 0, {k: v for k, v in masked.items() if k != WEIGHT_TENSOR}),
            "lacks 1 tensor(s): 'foedus.secure.weight'",
        ),
        (
            masked_result("alice", 0, {**masked, "w": masked["w"].reshape(-1)}),
            "masked tensor 'w' has shape [4], not [2, 2]",
        ),
        (
            dataclasses.replace(masked_result("alice", 0, masked), data_size=10),
            "data_size of a masked",
        ),
    ]
    for bad, message in rows:
        with pytest.raises(InvalidRequestError, match=re.escape(message)):
            fed.submit(bad)
    with pytest.raises(PreconditionError, match="SHARES stage closed without carol"):
        fed.submit(masked_result("carol", 0, masked))
    assert fed.accepted() == ()
    assert fed.submit(masked_result("alice", 0, masked))


def test_a_federation_without_secure_aggregation_has_no_stages(certs: CertsLayout) -> None:
    """Posting to a plain federation, or in a final validation round: FAILED_PRECONDITION."""
    plain = federation()
    advertisement = Sites.of(plain, certs, ["alice"], uuid=UUID).rounds["alice"].advertisement()
    with pytest.raises(PreconditionError, match="does not aggregate securely"):
        post(plain, "alice", Post(0, Stage.KEYS, keys=advertisement))
    fed = secure_federation(tasks=(AGGREGATED_MODEL_VALIDATION, "train"), rounds=0)
    with pytest.raises(PreconditionError, match="final validation round: it trains nothing"):
        post(fed, "alice", Post(0, Stage.KEYS, keys=advertisement))


# -- a site that keeps its metrics ----------------------------------------------------------------

AMV = AGGREGATED_MODEL_VALIDATION


def kept(name: str, round_number: int) -> TaskResult:
    """A validation from a site that keeps its metrics, as `--keep-metrics` sends it."""
    return TaskResult(name, round_number, AMV, 1, ())


def test_a_site_that_keeps_its_metrics_counts_without_them(
    store: FederationStore, certs: CertsLayout
) -> None:
    """carol keeps her metrics: her validations and masked update carry none and are accepted;
    her update counts in the model; the means are over alice and bob, weighted, and the row's
    sites leave her out; the best model follows those means. In the final validation round
    nobody reports a metric: no means, no new best."""
    fed = secure_federation(store, tasks=(AMV, "train"), rounds=1, best_model=BestModelSettings())
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys()
    sites.shares()
    for name, accuracy, size in (("alice", 0.5, 10), ("bob", 0.9, 30)):
        assert fed.submit(result(name, 0, AMV, data_size=size, metrics={"accuracy": accuracy}))
    assert fed.submit(kept("carol", 0))
    for name in COLLABORATORS:
        loss = None if name == "carol" else DELTAS[name][1] / 100
        sites.upload(name, delta_of(name), DELTAS[name][1], loss=loss)
    assert fed.close_round_if_due() is None
    sites.confirm(COLLABORATORS)
    assert fed.close_round_if_due() is None
    sites.reveal(COLLABORATORS)
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained and summary.reporters == COLLABORATORS
    assert_model(fed, COLLABORATORS)  # carol's update counts
    assert summary.metrics[AMV] == {"accuracy": pytest.approx(0.8)}  # (0.5 * 10 + 0.9 * 30) / 40
    assert summary.metrics["train"] == {"loss": pytest.approx(0.2)}  # (0.1 + 0.3) / 2: the
    # masked train results' data_size is 1 each
    assert sorted(summary.record.sites) == ["alice", "bob"]
    assert summary.best is not None and summary.best.training_rounds == 0
    assert summary.best.value == pytest.approx(0.8)
    for name in COLLABORATORS:
        assert fed.submit(kept(name, 1))
    final = fed.close_round_if_due()
    assert final is not None and final.final_validation and final.reporters == COLLABORATORS
    assert final.metrics == {} and final.record.sites == {}
    assert final.best == summary.best and final.best_model is None


def test_a_secure_validation_holds_metrics_alone(store: FederationStore) -> None:
    """A validation result of a secure federation with a model tensor is refused as plaintext,
    with or without metrics; nothing is kept."""
    fed = secure_federation(store, tasks=(AMV, "train"))
    for metrics in (None, {"accuracy": 0.5}):
        tensors = (
            *result("alice", 0, "train").tensors[:1],
            *result("alice", 0, AMV, metrics=metrics).tensors,
        )
        with pytest.raises(InvalidRequestError) as refused:
            fed.submit(TaskResult("alice", 0, AMV, 10, tensors))
        assert str(refused.value) == f"tensor 'w' in {AMV} results: {PLAINTEXT_REFUSED}"
    assert fed.accepted() == ()


def test_a_plain_federation_refuses_a_validation_without_metrics_naming_the_way_out(
    store: FederationStore,
) -> None:
    """Without secure aggregation a validation must report a metric; the refusal says a site
    keeps its metrics only in a secure federation."""
    fed = federation(store, tasks=(AMV, "train"))
    with pytest.raises(InvalidRequestError) as refused:
        fed.submit(kept("alice", 0))
    assert str(refused.value) == (
        f"{AMV} results hold no metric: a validation reports at least one (a tensor tagged "
        "'metric', such as accuracy); a site keeps its metrics only in a secure federation "
        "(secure_aggregation.enabled)"
    )
    assert fed.accepted() == ()


# -- a restart ------------------------------------------------------------------------------------


def _relays(fed: Federation) -> dict[tuple[str, Stage], Relay]:
    return {(name, stage): relay(fed, name, 0, stage) for name in COLLABORATORS for stage in Stage}


def test_a_restart_relays_the_same_messages_and_makes_the_same_model(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """The durable store closed in the middle of UNMASK and opened again: the same relays, the
    round goes on, and the model is byte for byte an undisturbed run's."""
    undisturbed = secure_federation(MemoryStore(model(), federation_uuid=UUID))
    sites = through_upload(undisturbed, certs, COLLABORATORS)
    undisturbed.close_round_if_due()
    sites.confirm(COLLABORATORS)
    sites.reveal(COLLABORATORS)
    assert undisturbed.close_round_if_due() is not None

    state = open_state(tmp_path)
    fed = secure_federation(state)
    sites = through_upload(fed, certs, COLLABORATORS)
    fed.close_round_if_due()
    sites.confirm(COLLABORATORS)
    sites.reveal(["alice"])
    before = _relays(fed)
    state.close()

    state = open_state(tmp_path)
    try:
        fed = secure_federation(state)
        assert _relays(fed) == before
        sites.fed = fed
        assert not post(fed, "alice", _repost(sites, fed))  # the same reveal again: a resend
        sites.reveal(["bob", "carol"])
        assert fed.close_round_if_due() is not None
        assert _bytes(fed.model()) == _bytes(undisturbed.model())
    finally:
        state.close()


def _repost(sites: Sites, fed: Federation) -> Post:
    """alice's UNMASK post again, as she would resend it after a restart of hers."""
    survivors = relay(fed, "alice", 0, Stage.SURVIVORS).members
    confirmations = relay(fed, "alice", 0, Stage.UNMASK).confirmations
    shares = sites.rounds["alice"].revealed_shares(survivors, confirmations)
    return Post(0, Stage.UNMASK, revealed=tuple(shares))


def _bytes(arrays: Mapping[str, Array]) -> dict[str, bytes]:
    return {name: np.asarray(array).tobytes() for name, array in arrays.items()}


def test_posts_and_closes_are_read_back_until_their_round_commits(tmp_path: Path) -> None:
    """The durable store gives back the round's posts (bytes as kept) and closes when opened
    again, and none once the round is committed."""
    posts = (
        SecurePost(0, int(Stage.KEYS), "bob", b"\x08\x01"),
        SecurePost(0, int(Stage.KEYS), "alice", b"\x00\xff"),
        SecurePost(0, int(Stage.SHARES), "alice", b"shares"),
    )
    closes = (SecureClose(0, int(Stage.KEYS), ("alice", "bob")),)
    state = open_state(tmp_path)
    for item in posts:
        state.record_secure_post(item)
    state.record_secure_close(closes[0])
    state.close()
    state = open_state(tmp_path)
    try:
        progress = state.recovered.progress
        assert progress.secure_posts == (posts[1], posts[0], posts[2])  # by stage, then name
        assert progress.secure_closes == closes
        state.commit_round(RoundCommit(_record(0), None, None, False))
    finally:
        state.close()
    state = open_state(tmp_path)
    try:
        progress = state.recovered.progress
        assert (progress.round_number, progress.secure_posts, progress.secure_closes) == (1, (), ())
    finally:
        state.close()


def _record(round_number: int) -> RoundRecord:
    return RoundRecord(round_number, False, (), COLLABORATORS, {}, 0.0, trained=False)


def test_a_state_before_secure_aggregation_is_migrated(tmp_path: Path) -> None:
    """A version-4 state (no secure tables) opens as the newest version, its round as it was."""
    open_state(tmp_path).close()
    before_secure(tmp_path / "state")
    assert schema_of(tmp_path)[0] == 4
    state = open_state(tmp_path)
    try:
        assert schema_of(tmp_path)[0] == 5
        assert state.recovered.progress.secure_posts == ()
        assert secure_rows(state) == 0
    finally:
        state.close()
