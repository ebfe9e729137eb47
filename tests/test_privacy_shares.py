"""DP-FedAvg under secure aggregation: each site clips its delta and adds its noise share before
it masks; whatever sum the aggregator can unmask (a quorum of sites or more) carries at least
the planned noise, and the ring holds every noised value. Real sites (`SiteRound`, pki's
certificates) in memory; the test plays the aggregator (tests/secure_rounds.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import secrets
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography import x509
from scipy import stats

from foedus.pki.layout import CertsLayout
from foedus.plans.schema import (
    LARGEST_NORMAL,
    DifferentialPrivacySettings,
    Plan,
    SecureAggregationSettings,
)
from foedus.privacy.clipping import clip_factor
from foedus.privacy.noise import NOISE_V1, NoiseSecret, _box_muller, _box_muller_v2
from foedus.privacy.shares import NoiseShares, federation_secret
from foedus.secure.errors import ProtocolViolation
from foedus.secure.site import SiteRound
from foedus.secure.site_secrets import SiteSecrets

from secure_rounds import (
    SITES,
    SiteIdentity,
    context,
    for_receiver,
    run_round,
    sites,
    updates,
)
from servers import make_plan

PRIVACY = DifferentialPrivacySettings(enabled=True, clip=1.0, noise_multiplier=0.8)
THRESHOLD = 2  # of the 5 sites: the quorum is 3 (more than half), not the threshold
QUORUM = 3
WEIGHTS = dict.fromkeys(SITES, 1)  # every site weighs 1 under differential privacy
# 24,576 values, each site's delta of L2 norm about 1.6: clipped to 1 before the noise.
MODEL = {"w": np.zeros((96, 128), dtype=np.float64), "b": np.zeros(12288, dtype=np.float64)}
FALSE_ALARM = 1e-6  # each statistical check fails an honest run this rarely


def fresh_shares(names: Collection[str] = SITES) -> dict[str, NoiseShares]:
    """Each site's noise shares from a fresh secret, as a new site's state folder makes it."""
    return {
        name: NoiseShares(PRIVACY, QUORUM, NoiseSecret(secrets.token_bytes(32))) for name in names
    }


def a_round(
    known: Mapping[str, SiteIdentity],
    cas: list[x509.Certificate],
    shares: Mapping[str, NoiseShares],
    deltas: Mapping[str, Mapping[str, npt.NDArray[np.float64]]],
    dropped: Collection[str] = (),
) -> tuple[dict[str, npt.NDArray[Any]], float]:
    """One secure round of the five sites with noise shares, `dropped` dying before their
    upload; the next model (from zeros) and the ring's scale."""
    round_context = context(
        SITES, threshold=THRESHOLD, clip=PRIVACY.share_bound(QUORUM), max_weight=1
    )
    assert round_context.quorum == QUORUM
    model, _ = run_round(
        sites(round_context, known, cas),
        MODEL,
        deltas,
        WEIGHTS,
        before_upload=dropped,
        shares=shares,
    )
    return model, round_context.fixed_point.scale


def flat(tensors: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
    """Every tensor's values, in name order, as one float64 vector."""
    return np.concatenate(
        [np.asarray(tensors[name], np.float64).reshape(-1) for name in sorted(tensors)]
    )


def clipped_sum(
    deltas: Mapping[str, Mapping[str, npt.NDArray[np.float64]]], names: Collection[str]
) -> npt.NDArray[np.float64]:
    """The sum of `names`' deltas, each clipped to L2 norm `clip` (the noiseless sum)."""
    return sum(
        (flat(deltas[name]) * clip_factor(deltas[name], PRIVACY.clip) for name in names),
        np.zeros(flat(MODEL).size),
    )


def noise_of(share: NoiseShares, round_number: int = 3) -> npt.NDArray[np.float64]:
    """A site's noise share of the round, every tensor in name order."""
    values = share.noise(round_number)
    return np.concatenate([values(name, 0, MODEL[name].size) for name in sorted(MODEL)])


@pytest.mark.parametrize("dropped", [(), ("erin",), ("dave", "erin")], ids=["5", "4", "3"])
def test_any_sum_the_aggregator_unmasks_carries_at_least_the_planned_noise(
    known: Mapping[str, SiteIdentity], cas: list[x509.Certificate], dropped: tuple[str, ...]
) -> None:
    """Survivors k = 5, 4 and 3 (the quorum t): the unmasked sum's deviation from the sum of the
    clipped deltas has mean 0 and variance k / t x (noise_multiplier x clip)^2, at least the
    planned noise's. Fresh secrets every run: each check (chi-square for the variance, normal
    for the mean, over 24,576 values) fails an honest run with probability 1e-6."""
    survivors = [name for name in SITES if name not in dropped]
    deltas = updates(MODEL, SITES, seed=11, scale=0.01)
    model, _ = a_round(known, cas, fresh_shares(), deltas, dropped)
    deviation = flat(model) * len(survivors) - clipped_sum(deltas, survivors)
    values = deviation.size
    expected = len(survivors) / QUORUM * PRIVACY.noise_std**2
    low = stats.chi2.ppf(FALSE_ALARM / 2, values) / values
    high = stats.chi2.isf(FALSE_ALARM / 2, values) / values
    ratio = float(np.mean(deviation**2)) / expected
    assert low <= ratio <= high, (ratio, low, high)
    assert float(np.mean(deviation**2)) >= low * PRIVACY.noise_std**2  # the planned noise, or more
    z = stats.norm.isf(FALSE_ALARM / 2)
    assert abs(float(np.mean(deviation))) <= z * math.sqrt(expected / values)


def test_fewer_survivors_than_the_quorum_unmask_nothing(
    known: Mapping[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """Two survivors (the threshold, below the quorum of 3): no site reveals a share, so their
    sum, whose noise would be below the planned, is never unmasked."""
    deltas = updates(MODEL, SITES, seed=12, scale=0.01)
    with pytest.raises(ProtocolViolation, match="fewer than the 3 needed"):
        a_round(known, cas, fresh_shares(), deltas, ("carol", "dave", "erin"))


def test_the_unmasked_sum_is_the_clipped_deltas_and_the_shares_a_huge_update_moves_it_by_clip(
    known: Mapping[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """Knowing each site's secret, the test computes its noise exactly: the unmasked sum is the
    clipped deltas plus the survivors' noise shares within the fixed point's rounding (nothing
    cut by the ring, though the noise is 3.5 times the clip here), and carol's update a million
    times too large moves it by clip (1) at most."""
    shares = fresh_shares()
    deltas = updates(MODEL, SITES, seed=13, scale=0.01)
    deltas["carol"] = {name: array * 1e6 for name, array in deltas["carol"].items()}
    model, scale = a_round(known, cas, shares, deltas)
    noise = sum((noise_of(shares[name]) for name in SITES), np.zeros(flat(MODEL).size))
    assert float(np.max(np.abs(noise))) > 3 * PRIVACY.clip
    unmasked = flat(model) * len(SITES)
    rounding = len(SITES) * 0.5 / scale + 1e-9
    np.testing.assert_allclose(unmasked, clipped_sum(deltas, SITES) + noise, rtol=0, atol=rounding)
    others = [name for name in SITES if name != "carol"]
    moved = unmasked - clipped_sum(deltas, others) - noise
    assert float(np.linalg.norm(moved)) <= PRIVACY.clip + math.sqrt(moved.size) * rounding


def test_a_restarted_site_masks_the_very_same_bytes(
    known: Mapping[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """alice started again in a round (her round secrets read back from her round file, the
    relays fetched again, her site secret read back from her state folder): the same masked
    update, byte for byte, as the start before; another site secret: another update."""
    round_context = context(
        SITES, threshold=THRESHOLD, clip=PRIVACY.share_bound(QUORUM), max_weight=1
    )
    round_sites = sites(round_context, known, cas)
    deltas = updates(MODEL, SITES, seed=14, scale=0.01)
    _, relays = run_round(round_sites, MODEL, deltas, WEIGHTS, shares=fresh_shares())
    saved = round_sites["alice"].secrets.to_bytes()
    site_secret = NoiseSecret(secrets.token_bytes(32))

    def started(secret: NoiseSecret) -> dict[str, bytes]:
        site = SiteRound(
            round_context,
            "alice",
            SiteSecrets.from_bytes(saved),
            signing_key=known["alice"].key,
            certificate_der=known["alice"].certificate,
            ca_certificates=cas,
        )
        site.accept_keys(relays.u1, relays.keys)
        site.accept_shares(relays.u2, for_receiver(relays.shares, "alice", relays.u2))
        share = NoiseShares(PRIVACY, QUORUM, federation_secret(secret, "f-1"))
        delta = deltas["alice"]
        update = site.masked_update(
            delta, 1, factor=clip_factor(delta, PRIVACY.clip), noise=share.noise(3)
        )
        return {name: array.tobytes() for name, array in update.items()}

    assert started(site_secret) == started(site_secret)
    assert started(site_secret)["w"] != started(NoiseSecret(secrets.token_bytes(32)))["w"]


def test_each_federation_gets_its_own_noise_from_one_site_secret() -> None:
    """One state folder's secret in two federations: independent noise (the same noise in both
    would let the two sums be subtracted, and the noise with them); the key is pinned, and the
    site secret's noise version goes with it."""
    secret = NoiseSecret(bytes(range(32)))
    first = NoiseShares(PRIVACY, QUORUM, federation_secret(secret, "federation-1"))
    second = NoiseShares(PRIVACY, QUORUM, federation_secret(secret, "federation-2"))
    a, b = first.noise(0)("w", 0, 20000), second.noise(0)("w", 0, 20000)
    assert abs(float(np.corrcoef(a, b)[0, 1])) < 0.05  # 7 sd of a chance correlation
    pinned = hmac.digest(secret.key, b"foedus.privacy.shares/v1f", hashlib.sha256)
    assert federation_secret(secret, "f") == NoiseSecret(pinned, secret.version)
    legacy = NoiseSecret(secret.key, NOISE_V1)  # a site secret made before versions were kept
    assert federation_secret(legacy, "f") == NoiseSecret(pinned, NOISE_V1)


def test_a_share_has_the_planned_std_over_the_quorum_and_the_ring_holds_it() -> None:
    """std = noise_multiplier x clip / sqrt(quorum); the bound on one noised value is clip plus
    the generator's largest draw times that std, and the generator's largest draw (u1 at its
    smallest, 2^-53) is LARGEST_NORMAL, 8.57."""
    assert PRIVACY.share_std(3) == pytest.approx(0.8 / math.sqrt(3))
    assert PRIVACY.share_bound(3) == pytest.approx(1 + 8.5717 * 0.8 / math.sqrt(3), rel=1e-4)
    assert PRIVACY.share_bound(3) > 1 + LARGEST_NORMAL * PRIVACY.share_std(3)
    for transform, angle_dtype in [(_box_muller, np.float64), (_box_muller_v2, np.float32)]:
        words = np.zeros(2, dtype=np.uint64)  # the smallest uniform u1, and cos(0) = 1
        normals, radius = np.empty(2), np.empty(1)
        transform(words, normals, radius, np.empty(1, angle_dtype), np.empty(1, angle_dtype))
        assert normals[0] == pytest.approx(LARGEST_NORMAL, rel=1e-15)
        assert normals[0] * PRIVACY.share_std(3) + PRIVACY.clip < PRIVACY.share_bound(3)
    with pytest.raises(ValueError, match="a quorum is 1 or more"):
        PRIVACY.share_std(0)


def dp_secure_plan(certs: CertsLayout, *, privacy: bool = True, secure: bool = True) -> Plan:
    """A test plan of alice, bob and carol with differential privacy and secure aggregation."""
    plan = make_plan(certs)
    return dataclasses.replace(
        plan,
        secure_aggregation=SecureAggregationSettings(enabled=secure, threshold=1),
        differential_privacy=dataclasses.replace(PRIVACY, enabled=privacy),
    )


def test_a_site_has_noise_shares_only_with_both_on(certs: CertsLayout) -> None:
    """Secure aggregation and differential privacy: shares over the plan's quorum (3 sites, a
    threshold of 1: 2), keyed by the federation; either off: none."""
    secret = NoiseSecret(bytes(32))
    shares = NoiseShares.of(dp_secure_plan(certs), secret)
    assert shares is not None and shares.quorum == 2
    assert shares.secret == federation_secret(secret, make_plan(certs).federation.uuid)
    assert secret.key.hex() not in repr(shares) and shares.secret.key.hex() not in repr(shares)
    assert NoiseShares.of(dp_secure_plan(certs, privacy=False), secret) is None
    assert NoiseShares.of(dp_secure_plan(certs, secure=False), secret) is None
