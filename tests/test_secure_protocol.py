"""A whole secure round in memory with real certificates: the unmasked mean, dropouts, restarts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from cryptography import x509

from foedus.secure.context import WEIGHT_TENSOR, RoundContext
from foedus.secure.errors import ProtocolViolation
from foedus.secure.records import RevealedShare, SecretKind
from foedus.secure.site import SiteRound
from foedus.secure.site_secrets import SiteSecrets
from foedus.secure.unmask import Unmasking

from secure_rounds import (
    SITES,
    SiteIdentity,
    context,
    fedavg,
    for_receiver,
    run_round,
    sites,
    updates,
)

WEIGHTS = {"alice": 120, "bob": 45, "carol": 2000, "dave": 1, "erin": 700}
MODEL = {
    "conv.weight": np.linspace(-1.0, 1.0, 24, dtype=np.float64).reshape(2, 3, 4),
    "conv.bias": np.zeros(3, dtype=np.float64),
    "fc": np.full((5, 7), 0.25, dtype=np.float64),
}


def bound(round_context: RoundContext, survivors: int, total_weight: int) -> float:
    """The quantization bound of the unmasked mean: half a unit per survivor (the deltas stay
    inside the clip), over the weight; and float64's own rounding."""
    return survivors * 0.5 / (round_context.fixed_point.scale * total_weight) + 1e-12


def capped(name: str, round_context: RoundContext) -> int:
    """A site's weight as the protocol counts it (at most max_weight)."""
    return min(WEIGHTS[name], round_context.settings.max_weight)


@pytest.mark.parametrize(
    ("bits", "threshold", "dropouts"),
    [
        (32, 3, {}),
        (16, 3, {}),
        (64, 3, {}),
        (32, 3, {"before_shares": {"erin"}}),
        (32, 3, {"before_upload": {"dave"}}),
        (32, 3, {"before_unmask": {"bob"}}),
        # threshold 2: two sites' shares rebuild a secret, but 3 of the 5 (the quorum) confirm
        (32, 2, {"before_shares": {"erin"}, "before_unmask": {"bob"}}),
        (32, 2, {"before_shares": {"erin"}, "before_upload": {"dave"}}),
    ],
)
def test_the_unmasked_mean_is_the_survivors_fedavg_within_the_quantization(
    known: dict[str, SiteIdentity],
    cas: list[x509.Certificate],
    bits: int,
    threshold: int,
    dropouts: dict[str, set[str]],
) -> None:
    """Whoever drops (after KEYS, after SHARES, after uploading), the survivors' weighted mean
    comes out, off by no more than the fixed point's rounding."""
    max_weight = 25 if bits == 16 else 1000  # 16 bits hold 5 sites of weight 25 at most
    round_context = context(bits=bits, max_weight=max_weight, threshold=threshold)
    deltas = updates(MODEL, SITES)
    new, relays = run_round(sites(round_context, known, cas), MODEL, deltas, WEIGHTS, **dropouts)
    weights = {name: capped(name, round_context) for name in SITES}
    expected = fedavg(MODEL, deltas, weights, relays.u3)
    gone = set(dropouts.get("before_shares", ())) | set(dropouts.get("before_upload", ()))
    assert relays.u3 == tuple(name for name in SITES if name not in gone)
    total = sum(weights[name] for name in relays.u3)
    for tensor, values in expected.items():
        assert new[tensor].dtype == np.float64
        error = np.abs(new[tensor] - values).max()
        assert error <= bound(round_context, len(relays.u3), total), (tensor, error)
        # Not the model unchanged: the deltas moved it by far more than the rounding.
        assert np.abs(new[tensor] - MODEL[tensor]).max() > 100 * bound(
            round_context, len(relays.u3), total
        )


def test_secagg_plus_neighbours_give_the_same_mean_with_dropouts(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """With neighbours 2 each site masks with two peers; a site that drops after SHARES has its
    masks with its neighbours removed, and the mean is the survivors'."""
    round_context = context(neighbours=2, threshold=2)
    deltas = updates(MODEL, SITES, seed=11)
    new, relays = run_round(
        sites(round_context, known, cas), MODEL, deltas, WEIGHTS, before_upload={"carol"}
    )
    weights = {name: capped(name, round_context) for name in SITES}
    expected = fedavg(MODEL, deltas, weights, relays.u3)
    total = sum(weights[name] for name in relays.u3)
    for tensor, values in expected.items():
        assert np.abs(new[tensor] - values).max() <= bound(round_context, 4, total)


def test_tensors_keep_their_dtypes_floats_rounded_to_nearest_integers_half_to_even(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """float32, bfloat16 and int64 tensors come back in their dtype: the float64 mean cast."""
    model: dict[str, npt.NDArray[Any]] = {
        "f32": np.linspace(-2, 2, 10, dtype=np.float32),
        "bf16": np.linspace(-2, 2, 10).astype(ml_dtypes.bfloat16),
        "steps": np.arange(10, dtype=np.int64),
    }
    names = SITES[:3]
    round_context = context(names)
    deltas = updates(model, names, scale=0.3)
    new, relays = run_round(sites(round_context, known, cas), model, deltas, WEIGHTS)
    weights = {name: capped(name, round_context) for name in names}
    expected = fedavg(model, deltas, weights, relays.u3)
    for tensor in ("f32", "bf16"):
        assert new[tensor].dtype == model[tensor].dtype
        step = np.abs(expected[tensor]) * (2.0**-7 if tensor == "bf16" else 2.0**-23)
        assert (np.abs(new[tensor].astype(np.float64) - expected[tensor]) <= step + 1e-6).all()
    assert new["steps"].dtype == np.int64
    np.testing.assert_array_equal(new["steps"], np.rint(expected["steps"]).astype(np.int64))


def test_a_masked_upload_is_not_the_encoded_update(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """What a site uploads looks nothing like its encoded delta (the masks are there), in the
    ring's dtype, in the model's shapes, with the masked weight."""
    round_context = context(SITES[:3])
    round_sites = sites(round_context, known, cas)
    advertisements = [site.advertisement() for site in round_sites.values()]
    for site in round_sites.values():
        site.accept_keys(list(round_context.collaborators), advertisements)
    sealed = [share for site in round_sites.values() for share in site.sealed_shares()]
    alice = round_sites["alice"]
    alice.accept_shares(round_context.collaborators, for_receiver(sealed, "alice", SITES))
    delta = updates(MODEL, ["alice"])["alice"]
    upload = alice.masked_update(delta, 120)
    assert sorted(upload) == sorted([*MODEL, WEIGHT_TENSOR])
    for tensor, values in MODEL.items():
        assert upload[tensor].dtype == np.dtype("<u4")
        assert upload[tensor].shape == values.shape
        plain = round_context.fixed_point.encode(delta[tensor], 120)
        assert (upload[tensor] != plain.reshape(values.shape)).mean() > 0.9
    assert upload[WEIGHT_TENSOR].shape == (1,)
    assert int(upload[WEIGHT_TENSOR][0]) != 120


def test_a_restarted_site_posts_the_same_bytes_again(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """A site rebuilt from its secrets file and the relays makes the same advertisement, shares,
    upload and confirmation, byte for byte (its resends are resends)."""
    round_context = context()
    round_sites = sites(round_context, known, cas)
    deltas = updates(MODEL, SITES)
    _new, relays = run_round(round_sites, MODEL, deltas, WEIGHTS, before_unmask={"alice"})
    before = round_sites["alice"]
    again = SiteRound(
        round_context,
        "alice",
        SiteSecrets.from_bytes(before.secrets.to_bytes()),
        signing_key=known["alice"].key,
        certificate_der=known["alice"].certificate,
        ca_certificates=cas,
    )
    assert again.advertisement() == before.advertisement()
    again.accept_keys(relays.u1, relays.keys)
    assert again.sealed_shares() == before.sealed_shares()
    assert again.accept_shares(relays.u2, for_receiver(relays.shares, "alice", relays.u2)) == ()
    first = before.masked_update(deltas["alice"], WEIGHTS["alice"])
    second = again.masked_update(deltas["alice"], WEIGHTS["alice"])
    for tensor, values in first.items():
        assert values.tobytes() == second[tensor].tobytes()
    assert again.confirmation(relays.u3) == before.confirmation(relays.u3)


def test_a_share_that_does_not_open_is_skipped_and_the_others_suffice(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """A share whose ciphertext was changed is named (not a refusal): its receiver holds no share
    of that sender, and the round still unmasks from the other holders' shares."""
    round_context = context()
    round_sites = sites(round_context, known, cas)
    advertisements = [site.advertisement() for site in round_sites.values()]
    for site in round_sites.values():
        site.accept_keys(SITES, advertisements)
    sealed = [share for site in round_sites.values() for share in site.sealed_shares()]
    broken = [
        dataclasses.replace(share, ciphertext=share.ciphertext[:-1] + b"\x00")
        if (share.sender, share.receiver) == ("bob", "alice")
        else share
        for share in sealed
    ]
    missing = {
        name: site.accept_shares(SITES, for_receiver(broken, name, SITES))
        for name, site in round_sites.items()
    }
    assert missing == {name: ("bob",) if name == "alice" else () for name in SITES}
    deltas = updates(MODEL, SITES)
    uploads = {
        name: site.masked_update(deltas[name], WEIGHTS[name]) for name, site in round_sites.items()
    }
    confirmations = [site.confirmation(SITES) for site in round_sites.values()]
    revealed = {
        name: site.revealed_shares(SITES, confirmations) for name, site in round_sites.items()
    }
    assert "bob" not in {share.owner for share in revealed["alice"]}
    unmasking = Unmasking.rebuild(
        round_context, {ad.collaborator: ad for ad in advertisements}, SITES, SITES, revealed
    )
    summed = {
        tensor: np.sum([upload[tensor] for upload in uploads.values()], axis=0, dtype=np.uint32)
        for tensor in uploads["alice"]
    }
    new = unmasking.next_model(MODEL, summed)
    weights = {name: capped(name, round_context) for name in SITES}
    expected = fedavg(MODEL, deltas, weights, SITES)
    total = sum(weights.values())
    for tensor, values in expected.items():
        assert np.abs(new[tensor] - values).max() <= bound(round_context, 5, total)


def test_fewer_survivors_than_the_threshold_unmask_nothing(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """Two survivors of threshold 3: no site confirms, and the aggregator cannot unmask."""
    round_context = context()
    with pytest.raises(ProtocolViolation, match="below the threshold 3"):
        run_round(
            sites(round_context, known, cas),
            MODEL,
            updates(MODEL, SITES),
            WEIGHTS,
            before_upload={"alice", "bob", "carol"},
        )
    with pytest.raises(ProtocolViolation, match="2 survivors, below the threshold 3"):
        Unmasking.rebuild(round_context, {}, SITES, ["dave", "erin"], {})


def test_corrupt_revealed_shares_are_outvoted_or_the_secret_is_lost(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """A wrong revealed share is found by the owner's commitment (other t-subsets are tried);
    with too few right ones the aggregator says whose secret is lost."""
    round_context = context()
    _new, relays = run_round(
        sites(round_context, known, cas), MODEL, updates(MODEL, SITES), WEIGHTS
    )
    advertisements = {ad.collaborator: ad for ad in relays.keys}

    def corrupt(revealers: set[str]) -> dict[str, list[RevealedShare]]:
        return {
            name: [
                dataclasses.replace(share, share=bytes(66)) if share.owner == "carol" else share
                for share in shares
            ]
            if name in revealers
            else shares
            for name, shares in relays.revealed.items()
        }

    one_bad = Unmasking.rebuild(
        round_context, advertisements, relays.u2, relays.u3, corrupt({"bob"})
    )
    good = Unmasking.rebuild(round_context, advertisements, relays.u2, relays.u3, relays.revealed)
    np.testing.assert_array_equal(one_bad.mask(0, 50), good.mask(0, 50))
    with pytest.raises(ProtocolViolation, match="cannot rebuild 'carol''s self-mask seed"):
        Unmasking.rebuild(
            round_context, advertisements, relays.u2, relays.u3, corrupt({"bob", "dave", "erin"})
        )


def test_mask_slices_add_up_to_the_whole_mask(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """The aggregator may unmask a slice at a time: slices of the mask are the whole mask's."""
    round_context = context()
    _new, relays = run_round(
        sites(round_context, known, cas),
        MODEL,
        updates(MODEL, SITES),
        WEIGHTS,
        before_upload={"erin"},
    )
    unmasking = Unmasking.rebuild(
        round_context,
        {ad.collaborator: ad for ad in relays.keys},
        relays.u2,
        relays.u3,
        relays.revealed,
    )
    whole = unmasking.mask(0, 1001)
    pieces = [unmasking.mask(start, min(start + 37, 1001)) for start in range(0, 1001, 37)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    assert unmasking.mask(5, 5).size == 0


def test_a_summed_weight_out_of_range_fails_the_unmasking(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """Survivors whose masked weights sum outside |U3| .. |U3| x max_weight: the round cannot
    close trained (a site lied about its weight)."""
    round_context = context(SITES[:3], threshold=2)
    _new, relays = run_round(
        sites(round_context, known, cas), MODEL, updates(MODEL, SITES[:3]), WEIGHTS
    )
    unmasking = Unmasking.rebuild(
        round_context,
        {ad.collaborator: ad for ad in relays.keys},
        relays.u2,
        relays.u3,
        relays.revealed,
    )
    offset = sum(values.size for values in MODEL.values())
    weight = relays.summed[WEIGHT_TENSOR]
    assert unmasking.total_weight(weight, offset) == 120 + 45 + 1000
    tampered = weight + np.uint32(3 * 1000)
    with pytest.raises(ProtocolViolation, match=r"outside 3\.\.3000"):
        unmasking.total_weight(tampered, offset)


def test_a_site_refuses_a_weight_below_one_and_nan(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """A weight of 0 or a delta with NaN cannot be uploaded (ValueError naming the tensor)."""
    round_context = context(SITES[:3], threshold=2)
    round_sites = sites(round_context, known, cas)
    advertisements = [site.advertisement() for site in round_sites.values()]
    for site in round_sites.values():
        site.accept_keys(SITES[:3], advertisements)
    sealed = [share for site in round_sites.values() for share in site.sealed_shares()]
    alice = round_sites["alice"]
    alice.accept_shares(SITES[:3], for_receiver(sealed, "alice", SITES))
    with pytest.raises(ValueError, match="at least 1, not 0"):
        alice.masked_update({"w": np.zeros(3)}, 0)
    with pytest.raises(ValueError, match="tensor 'w': an update holds NaN"):
        alice.masked_update({"w": np.array([0.0, np.nan])}, 3)


def test_revealed_kinds_follow_the_survivor_list(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """A survivor reveals seeds of survivors and mask keys of those who dropped after SHARES,
    of every owner it holds a share of, and records them."""
    round_context = context()
    round_sites = sites(round_context, known, cas)
    _new, relays = run_round(
        round_sites, MODEL, updates(MODEL, SITES), WEIGHTS, before_upload={"erin"}
    )
    kinds = {share.owner: share.kind for share in relays.revealed["alice"]}
    assert kinds == {
        name: SecretKind.MASK_PRIVATE_KEY if name == "erin" else SecretKind.SELF_MASK_SEED
        for name in SITES
    }
    assert round_sites["alice"].secrets.revealed == kinds
    assert round_sites["alice"].secrets.confirmed == ("alice", "bob", "carol", "dave")


def test_the_secrets_file_keeps_what_a_site_revealed(tmp_path: Path) -> None:
    """to_bytes and from_bytes round-trip every field, the revealed kinds and the confirmed list."""
    secrets = SiteSecrets.generate()
    secrets.revealed = {"bob": SecretKind.MASK_PRIVATE_KEY, "carol": SecretKind.SELF_MASK_SEED}
    secrets.confirmed = ("alice", "carol")
    assert SiteSecrets.from_bytes(secrets.to_bytes()) == secrets
    assert SiteSecrets.generate() != SiteSecrets.generate()


def test_a_tensor_larger_than_every_slice_comes_out_whole(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """A tensor of 1.3 million elements after an odd-sized one: encoded, masked and unmasked in
    pieces (chunks, keystream pieces, slices) whose seams fall mid-tensor, and still the mean."""
    model = {"a": np.zeros(7, dtype=np.float32), "big": np.zeros(1_300_001, dtype=np.float32)}
    names = SITES[:3]
    round_context = context(names, threshold=2)
    deltas = updates(model, names)
    new, relays = run_round(sites(round_context, known, cas), model, deltas, WEIGHTS)
    weights = {name: capped(name, round_context) for name in names}
    expected = fedavg(model, deltas, weights, relays.u3)
    for tensor, values in expected.items():
        assert new[tensor].dtype == np.float32
        step = np.abs(values) * 2.0**-23 + bound(round_context, 3, sum(weights.values()))
        assert (np.abs(new[tensor].astype(np.float64) - values) <= step).all(), tensor
