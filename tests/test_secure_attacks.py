"""A malicious aggregator (or a peer) against an honest site: each attack refused with one line
naming the site and what failed, and nothing revealed."""

from __future__ import annotations

import dataclasses
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from foedus.pki.files import read_private_key
from foedus.pki.layout import CertsLayout
from foedus.secure.errors import ProtocolViolation, TooFewSites
from foedus.secure.keys import (
    advertised_bytes,
    sign,
    survivors_bytes,
    verify_advertisements,
    x25519_problem,
)
from foedus.secure.records import Advertisement, SealedShare, SurvivorConfirmation
from foedus.secure.site import SiteRound
from foedus.secure.site_secrets import SiteSecrets

from conftest import Identity
from secure_rounds import (
    SITES,
    SiteIdentity,
    context,
    for_receiver,
    sites,
)


@pytest.fixture
def round_sites(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> dict[str, SiteRound]:
    """Five honest sites of round 3, threshold 3."""
    return sites(context(), known, cas)


def advertisements(round_sites: dict[str, SiteRound]) -> list[Advertisement]:
    """What every site posted at KEYS."""
    return [site.advertisement() for site in round_sites.values()]


def replaced(
    posted: list[Advertisement], name: str, advertisement: Advertisement
) -> list[Advertisement]:
    """The KEYS relay with `name`'s advertisement replaced."""
    return [advertisement if ad.collaborator == name else ad for ad in posted]


def forged(identity: Identity, name: str, round_number: int = 3) -> Advertisement:
    """An advertisement for `name` made and signed with `identity`'s certificate and key."""
    site = SiteRound(
        context([*SITES, "mallory"] if name == "mallory" else SITES, round_number=round_number),
        name,
        SiteSecrets.generate(),
        signing_key=read_private_key(identity.key),
        certificate_der=SiteIdentity.load(identity).certificate,
        ca_certificates=[],
    )
    return site.advertisement()


def shared(round_sites: dict[str, SiteRound]) -> list[SealedShare]:
    """Everyone through KEYS; the shares all posted."""
    posted = advertisements(round_sites)
    for site in round_sites.values():
        site.accept_keys(SITES, posted)
    return [share for site in round_sites.values() for share in site.sealed_shares()]


def through_shares(round_sites: dict[str, SiteRound]) -> None:
    """Everyone through SHARES, every share relayed to its holder."""
    sealed = shared(round_sites)
    for name, site in round_sites.items():
        assert site.accept_shares(SITES, for_receiver(sealed, name, SITES)) == ()


@pytest.mark.parametrize("field", ["encryption_key", "mask_key", "seed_commitment"])
def test_a_swapped_key_is_refused(round_sites: dict[str, SiteRound], field: str) -> None:
    """The aggregator puts its own key in bob's advertisement: alice refuses, naming bob."""
    posted = advertisements(round_sites)
    bob = next(ad for ad in posted if ad.collaborator == "bob")
    own = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    swapped = replaced(posted, "bob", dataclasses.replace(bob, **{field: own}))
    with pytest.raises(ProtocolViolation, match=r"^site 'bob': its advertised keys are not signed"):
        round_sites["alice"].accept_keys(SITES, swapped)


@pytest.mark.parametrize(
    ("round_number", "federation"),
    [(2, None), (4, None), (3, "another-federation")],
    ids=["earlier-round", "later-round", "other-federation"],
)
def test_keys_of_another_round_or_federation_are_refused(
    known: dict[str, SiteIdentity],
    cas: list[x509.Certificate],
    round_sites: dict[str, SiteRound],
    round_number: int,
    federation: str | None,
) -> None:
    """bob's real, signed advertisement of another round or federation replayed into round 3."""
    other = context(round_number=round_number, **({"federation": federation} if federation else {}))
    old = SiteRound(
        other,
        "bob",
        SiteSecrets.generate(),
        signing_key=known["bob"].key,
        certificate_der=known["bob"].certificate,
        ca_certificates=cas,
    ).advertisement()
    replayed = replaced(advertisements(round_sites), "bob", old)
    with pytest.raises(
        ProtocolViolation, match=r"^site 'bob': .*\(swapped, forged or replayed keys\)"
    ):
        round_sites["alice"].accept_keys(SITES, replayed)


def test_a_certificate_of_another_ca_is_refused(
    round_sites: dict[str, SiteRound], foreign_alice: Identity
) -> None:
    """An advertisement for alice signed by an 'alice' certificate of a foreign CA."""
    relay = replaced(advertisements(round_sites), "alice", forged(foreign_alice, "alice"))
    with pytest.raises(
        ProtocolViolation, match=r"^site 'alice': its certificate fails verification against"
    ):
        round_sites["bob"].accept_keys(SITES, relay)


def test_an_expired_certificate_is_refused(
    round_sites: dict[str, SiteRound], expired_alice: Identity
) -> None:
    """alice's certificate from our CA, expired: its advertisement is refused."""
    relay = replaced(advertisements(round_sites), "alice", forged(expired_alice, "alice"))
    with pytest.raises(
        ProtocolViolation, match=r"^site 'alice': its certificate fails verification"
    ):
        round_sites["bob"].accept_keys(SITES, relay)


def test_a_persons_certificate_named_like_a_site_is_refused(
    round_sites: dict[str, SiteRound], user_bob: Identity
) -> None:
    """A user certificate 'bob' from our CA signs nothing for site bob."""
    relay = replaced(advertisements(round_sites), "bob", forged(user_bob, "bob"))
    with pytest.raises(
        ProtocolViolation,
        match=r"^site 'bob': certificate 'bob' is a user certificate, but the plan's collaborators",
    ):
        round_sites["alice"].accept_keys(SITES, relay)


def test_an_unmarked_certificate_is_taken_with_the_houses_warning(
    round_sites: dict[str, SiteRound], unmarked_bob: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    """bob's certificate made before role marks signs for bob, as everywhere, with one warning
    naming the command that reissues it."""
    relay = replaced(advertisements(round_sites), "bob", forged(unmarked_bob, "bob"))
    with caplog.at_level(logging.WARNING, logger="foedus.pki.roles"):
        round_sites["alice"].accept_keys(SITES, relay)
    assert "pki certify --role collaborator --name bob" in caplog.text


def test_a_certificate_of_another_name_is_refused(
    round_sites: dict[str, SiteRound], known: dict[str, SiteIdentity]
) -> None:
    """carol's certificate under bob's name (whoever signed): the name is the certificate's."""
    posted = advertisements(round_sites)
    bob = next(ad for ad in posted if ad.collaborator == "bob")
    relay = replaced(
        posted, "bob", dataclasses.replace(bob, certificate=known["carol"].certificate)
    )
    with pytest.raises(
        ProtocolViolation, match=r"^site 'bob': its certificate is issued to 'carol'"
    ):
        round_sites["alice"].accept_keys(SITES, relay)


def test_a_site_not_in_the_plan_is_refused(
    round_sites: dict[str, SiteRound], stranger: Identity, cas: list[x509.Certificate]
) -> None:
    """mallory, certified by our CA but not a collaborator of the plan, among the members, only
    among the advertisements, or checked alone."""
    posted = [*advertisements(round_sites), forged(stranger, "mallory")]
    with pytest.raises(ProtocolViolation, match=r"names \['mallory'\] in KEYS, not collaborators"):
        round_sites["alice"].accept_keys([*SITES, "mallory"], posted)
    with pytest.raises(ProtocolViolation, match=r"relays advertisements of \[.*'mallory'\] for"):
        round_sites["alice"].accept_keys(SITES, posted)
    with pytest.raises(
        ProtocolViolation, match=r"^site 'mallory' is not a collaborator of the plan"
    ):
        verify_advertisements(round_sites["alice"].context, posted, cas)


def test_a_keys_relay_that_does_not_add_up_is_refused(round_sites: dict[str, SiteRound]) -> None:
    """Members below the threshold, without the site, an advertisement twice or missing."""
    posted = advertisements(round_sites)
    alice = round_sites["alice"]
    with pytest.raises(ProtocolViolation, match="closed KEYS with 2 sites, below the threshold 3"):
        alice.accept_keys(["alice", "bob"], posted[:2])
    with pytest.raises(ProtocolViolation, match="closed KEYS without this site"):
        alice.accept_keys(SITES[1:], posted[1:])
    with pytest.raises(ProtocolViolation, match="relays two advertisements of site 'bob'"):
        alice.accept_keys(SITES, [*posted, posted[1]])
    with pytest.raises(ProtocolViolation, match="relays advertisements of"):
        alice.accept_keys(SITES, posted[:-1])


def test_a_share_sealed_for_another_site_is_refused(round_sites: dict[str, SiteRound]) -> None:
    """The aggregator relays to alice bob's share for carol: refused, naming both."""
    sealed = shared(round_sites)
    relay = [*for_receiver(sealed, "alice", SITES), *for_receiver(sealed, "carol", ["bob"])]
    with pytest.raises(
        ProtocolViolation,
        match=r"^site 'alice', round 3: the aggregator relays a share from 'bob' sealed for 'carol'",
    ):
        round_sites["alice"].accept_shares(SITES, relay)


def test_a_share_readdressed_to_another_site_does_not_open(
    round_sites: dict[str, SiteRound],
) -> None:
    """bob's share for carol relabelled as alice's: it does not open for alice (the pair's key and
    the associated data are theirs), and alice says it holds no share of bob."""
    sealed = shared(round_sites)
    for_carol = next(s for s in sealed if (s.sender, s.receiver) == ("bob", "carol"))
    relay = [
        dataclasses.replace(for_carol, receiver="alice") if share.sender == "bob" else share
        for share in for_receiver(sealed, "alice", SITES)
    ]
    assert round_sites["alice"].accept_shares(SITES, relay) == ("bob",)


def test_a_share_from_outside_the_shares_stage_is_refused(
    round_sites: dict[str, SiteRound],
) -> None:
    """A share from erin relayed though the stage closed without erin, or twice from bob."""
    sealed = shared(round_sites)
    members = SITES[:4]
    relay = for_receiver(sealed, "alice", SITES)
    with pytest.raises(ProtocolViolation, match="a share from 'erin', not a SHARES member"):
        round_sites["alice"].accept_shares(members, relay)
    twice = [*for_receiver(sealed, "alice", SITES), *for_receiver(sealed, "alice", ["bob"])]
    with pytest.raises(ProtocolViolation, match="two shares from 'bob'"):
        round_sites["alice"].accept_shares(SITES, twice)


@pytest.mark.parametrize(
    ("survivors", "message"),
    [
        (("alice", "bob"), r"names 2 survivors \['alice', 'bob'\], below the threshold 3"),
        (("bob", "carol", "dave"), "to confirm a survivor list without it"),
        (("alice", "bob", "bob", "carol"), "names a survivor twice"),
        (("alice", "bob", "mallory"), r"survivors \['mallory'\] that are not SHARES members"),
    ],
)
def test_a_bad_survivor_list_is_refused(
    round_sites: dict[str, SiteRound], survivors: tuple[str, ...], message: str
) -> None:
    """alice confirms no list below the threshold, without her, or with strangers; she reveals
    nothing for it either."""
    through_shares(round_sites)
    alice = round_sites["alice"]
    with pytest.raises(ProtocolViolation, match=message) as refused:
        alice.confirmation(survivors)
    # Too few sites need not be malice (the caller may wait for the next round); the rest is.
    assert isinstance(refused.value, TooFewSites) == ("below the threshold" in message)
    with pytest.raises(ProtocolViolation, match=message):
        alice.revealed_shares(survivors, [])
    assert alice.secrets.confirmed is None
    assert alice.secrets.revealed == {}


def test_a_second_survivor_list_and_both_kinds_are_refused(
    round_sites: dict[str, SiteRound],
) -> None:
    """After revealing for all five, the aggregator names four (carol dropped): alice refuses
    (one list a round); even with her record of the list lost, she never gives carol's mask key
    share after its seed's."""
    through_shares(round_sites)
    everyone = [site.confirmation(SITES) for site in round_sites.values()]
    alice = round_sites["alice"]
    alice.revealed_shares(SITES, everyone)
    four = ("alice", "bob", "dave", "erin")
    with pytest.raises(ProtocolViolation, match="after this site confirmed"):
        alice.confirmation(four)
    for site in round_sites.values():
        site.secrets.confirmed = None
    again = [round_sites[name].confirmation(four) for name in four]
    with pytest.raises(
        ProtocolViolation,
        match="asks for the share of 'carol''s mask private key after this site revealed its "
        "self-mask seed's: refused",
    ):
        alice.revealed_shares(four, again)


def test_unsigned_forged_and_mismatched_confirmations_do_not_count(
    round_sites: dict[str, SiteRound], certs: CertsLayout, known: dict[str, SiteIdentity]
) -> None:
    """Only valid confirmations of exactly U3 by distinct survivors count: empty, forged (the
    aggregator's key, another site's), another list's (named, or relayed without a list and
    signed over another), or one survivor's twice do not; with fewer than t valid, nothing is
    revealed; the real ones relayed without their lists do."""
    through_shares(round_sites)
    survivors = ("alice", "bob", "carol", "dave")
    u3 = survivors_bytes(round_sites["alice"].context, survivors)
    all_five = survivors_bytes(round_sites["alice"].context, SITES)
    real = {name: round_sites[name].confirmation(survivors) for name in survivors}
    aggregator_key = read_private_key(certs.aggregator_key)
    bad = [
        real["alice"],
        real["alice"],  # counted once
        SurvivorConfirmation("bob", survivors, b""),
        SurvivorConfirmation("carol", survivors, sign(aggregator_key, u3)),
        dataclasses.replace(real["dave"], collaborator="erin"),  # erin is no survivor
        SurvivorConfirmation("dave", SITES, real["dave"].signature),  # another list
        # As a relay carries them, with no list: dave's signature of another list.
        SurvivorConfirmation("dave", (), sign(known["dave"].key, all_five)),
    ]
    alice = round_sites["alice"]
    with pytest.raises(
        ProtocolViolation, match=r"relays 1 valid confirmations .* fewer than the 3 needed"
    ):
        alice.revealed_shares(survivors, bad)
    assert alice.secrets.revealed == {}
    listless = [dataclasses.replace(real[name], survivors=()) for name in ("bob", "carol")]
    revealed = alice.revealed_shares(survivors, [*bad, *listless])
    assert {share.owner for share in revealed} == set(SITES)


def test_verify_advertisements_checks_each_and_names_each_once(
    round_sites: dict[str, SiteRound], cas: list[x509.Certificate]
) -> None:
    """The honest relay verifies, by name; a second advertisement of one site is refused."""
    posted = advertisements(round_sites)
    round_context = round_sites["alice"].context
    assert verify_advertisements(round_context, posted, cas) == {
        ad.collaborator: ad for ad in posted
    }
    with pytest.raises(ProtocolViolation, match="two advertisements of site 'alice'"):
        verify_advertisements(round_context, [*posted, posted[0]], cas)


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little"), bytes(31)])
def test_a_key_that_agrees_no_secret_is_refused_at_keys(
    round_sites: dict[str, SiteRound], known: dict[str, SiteIdentity], point: bytes
) -> None:
    """bob (malicious) signs a low-order or short X25519 key: refused when the keys arrive, naming
    bob, not later when a share or a mask could not be made."""
    posted = advertisements(round_sites)
    bob = next(ad for ad in posted if ad.collaborator == "bob")
    bad = dataclasses.replace(bob, mask_key=point)
    round_context = round_sites["alice"].context
    bad = dataclasses.replace(
        bad, signature=sign(known["bob"].key, advertised_bytes(round_context, bad))
    )
    assert x25519_problem(point) is not None
    with pytest.raises(
        ProtocolViolation,
        match=r"^site 'bob': its advertised mask key (is a low-order point|is not 32 bytes)",
    ):
        round_sites["alice"].accept_keys(SITES, replaced(posted, "bob", bad))
    assert x25519_problem(bob.mask_key) is None


def test_with_neighbours_a_site_checks_the_keys_it_uses_and_the_confirmations_it_counts(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate], foreign_alice: Identity
) -> None:
    """SecAgg+: a forged advertisement of a neighbour is refused at KEYS; one of a site it never
    masks with is not looked at until its confirmation would count, and then does not count."""
    round_context = context(neighbours=2, threshold=2)
    round_sites = sites(round_context, known, cas)
    posted = advertisements(round_sites)
    victim = next(name for name in SITES if name not in round_context.holders("bob"))
    neighbour = round_context.neighbours("bob")[0]
    forged_for = {
        name: dataclasses.replace(
            next(ad for ad in posted if ad.collaborator == name), signature=b"forged"
        )
        for name in (victim, neighbour)
    }
    with pytest.raises(ProtocolViolation, match=rf"^site '{neighbour}': its advertised keys"):
        round_sites["bob"].accept_keys(SITES, replaced(posted, neighbour, forged_for[neighbour]))
    relay = replaced(posted, victim, forged_for[victim])
    for site in round_sites.values():
        site.accept_keys(SITES, relay if site.name == "bob" else posted)
    sealed = [share for site in round_sites.values() for share in site.sealed_shares()]
    for name, site in round_sites.items():
        assert site.accept_shares(SITES, for_receiver(sealed, name, SITES)) == ()
    confirmations = [round_sites[name].confirmation(SITES) for name in (victim, "bob")]
    with pytest.raises(ProtocolViolation, match="relays 1 valid confirmations"):
        round_sites["bob"].revealed_shares(SITES, confirmations)
    # The quorum is 3 of the 5 (more than half), above the threshold of 2.
    other = next(name for name in SITES if name not in (victim, "bob", neighbour))
    confirmations.append(round_sites[neighbour].confirmation(SITES))
    with pytest.raises(ProtocolViolation, match="relays 2 valid confirmations"):
        round_sites["bob"].revealed_shares(SITES, confirmations)
    confirmations.append(round_sites[other].confirmation(SITES))
    revealed = round_sites["bob"].revealed_shares(SITES, confirmations)
    assert {share.owner for share in revealed} == set(round_context.holders("bob"))


def test_two_survivor_lists_cannot_both_be_confirmed_below_a_majority(
    known: dict[str, SiteIdentity], cas: list[x509.Certificate]
) -> None:
    """Threshold 2 of 5: the aggregator tells alice and bob that erin dropped (to get her mask
    key's shares) and carol and dave that she survived (her seed's), and relays to each pair
    the pair's own two confirmations. Two shares would rebuild either secret, but a quorum of 3
    (more than half the sites) must confirm one list: each pair refuses, erin stays masked."""
    round_context = context(threshold=2)
    assert round_context.quorum == 3
    round_sites = sites(round_context, known, cas)
    through_shares(round_sites)
    dropped = ("alice", "bob", "carol", "dave")
    survived = SITES
    for pair, survivors in ((("alice", "bob"), dropped), (("carol", "dave"), survived)):
        confirmations = [round_sites[name].confirmation(survivors) for name in pair]
        for name in pair:
            with pytest.raises(ProtocolViolation, match="fewer than the 3 needed"):
                round_sites[name].revealed_shares(survivors, confirmations)
            assert round_sites[name].secrets.revealed == {}
