"""A site's side of one secure round: what it posts at each stage, and what it checks.

A site's secrets (`SiteSecrets`, `foedus.secure.site_secrets`: what it must never lose nor
show, and their file) are kept by the caller in the round's state file, written before anything
that depends on them is posted: after `generate()`, and after `confirmation()` and
`revealed_shares()`, which change them.

`SiteRound` checks everything the aggregator relays and refuses (`ProtocolViolation`) what breaks
the protocol. It is deterministic given the secrets and the relays: the advertisement (RFC 6979
signatures), the sealed shares and the masked update come out as the same bytes every time. So
a restarted site needs no more state than its secrets file: it fetches the KEYS and SHARES
relays again (the aggregator keeps them) and replays them into a fresh `SiteRound`
(`accept_keys`, `accept_shares`), and whatever it posts again is a resend of the same bytes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foedus.pki.keys import PrivateKey, PublicKey
from foedus.secure import shamir
from foedus.secure.context import WEIGHT_TENSOR, RoundContext, framed, text
from foedus.secure.errors import ProtocolViolation, TooFewSites
from foedus.secure.keys import (
    advertised_bytes,
    agreed_key,
    derive,
    mask_agreement,
    public_key_of,
    seed_commitment,
    self_mask_key,
    share_agreement,
    share_associated_data,
    sign,
    survivors_bytes,
    verify_advertisement,
    verify_signature,
)
from foedus.secure.masks import VectorLayout, add_masks, keystream
from foedus.secure.records import (
    Advertisement,
    RevealedShare,
    SealedShare,
    SecretKind,
    SurvivorConfirmation,
)
from foedus.secure.ring import FloatArray, RingArray
from foedus.secure.site_secrets import SiteSecrets

logger = logging.getLogger(__name__)

NONCE_BYTES = 12
_POINT_BYTES = 4
_SEALED_PLAINTEXT = _POINT_BYTES + 2 * shamir.SHARE_BYTES
_COEFFICIENT_BYTES = 80  # drawn per field element: 640 bits reduced mod 2^521 - 1, bias < 2^-118


class SiteRound:
    """Site `name`'s part of one secure round, stage by stage (see the module's docstring)."""

    def __init__(
        self,
        context: RoundContext,
        name: str,
        secrets: SiteSecrets,
        *,
        signing_key: PrivateKey,
        certificate_der: bytes,
        ca_certificates: Sequence[x509.Certificate],
    ) -> None:
        """`signing_key` and `certificate_der` are the site's TLS identity; `ca_certificates` the
        federation's CA bundle, every peer's certificate is checked against."""
        if name not in context.collaborators:
            raise ValueError(f"{name!r} is not one of the plan's collaborators")
        self.context = context
        self.name = name
        self.secrets = secrets
        self._signing_key = signing_key
        self._certificate = certificate_der
        self._cas = tuple(ca_certificates)
        self._members_u1: tuple[str, ...] = ()  # U1
        self._relayed: dict[str, Advertisement] = {}  # U1's advertisements as relayed
        self._keys: dict[str, Advertisement] | None = None  # the holders', verified
        self._signers: dict[str, PublicKey] = {}  # certificate keys of verified advertisements
        self._sharers: tuple[str, ...] | None = None  # U2
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (share of b, share of s)

    @property
    def keys(self) -> Mapping[str, Advertisement]:
        """The verified advertisements this site uses: its holders' among KEYS's members (all of
        them without `neighbours`), its own included (after `accept_keys`)."""
        return dict(self._require_keys())

    @property
    def sharers(self) -> tuple[str, ...]:
        """The SHARES stage's members, U2 (after `accept_shares`)."""
        return self._require_sharers()

    def _violation(self, what: str) -> ProtocolViolation:
        return ProtocolViolation(
            f"site {self.name!r}, round {self.context.round_number}: the aggregator {what}"
        )

    def _too_few(self, what: str) -> TooFewSites:
        return TooFewSites(
            f"site {self.name!r}, round {self.context.round_number}: the aggregator {what}"
        )

    def advertisement(self) -> Advertisement:
        """KEYS: this site's public keys and seed commitment, signed by its certificate's key."""
        unsigned = Advertisement(
            collaborator=self.name,
            encryption_key=public_key_of(self.secrets.encryption_private),
            mask_key=public_key_of(self.secrets.mask_private),
            seed_commitment=seed_commitment(self.context, self.name, self.secrets.seed),
            certificate=self._certificate,
            signature=b"",
        )
        signature = sign(self._signing_key, advertised_bytes(self.context, unsigned))
        return Advertisement(**{**unsigned.__dict__, "signature": signature})

    def _members(self, stage: str, members: Sequence[str]) -> tuple[str, ...]:
        """A stage's member list checked: known names, once each, this site among them, t or more."""
        names = tuple(sorted(members))
        strangers = sorted(set(names) - set(self.context.collaborators))
        if strangers:
            raise self._violation(f"names {strangers} in {stage}, not collaborators of the plan")
        if len(set(names)) != len(names):
            raise self._violation(f"names a site twice among {stage}'s members")
        if self.name not in names:
            raise self._violation(f"closed {stage} without this site but relays it")
        if len(names) < self.context.threshold:
            raise self._too_few(
                f"closed {stage} with {len(names)} sites, below the threshold "
                f"{self.context.threshold}"
            )
        return names

    def accept_keys(self, members: Sequence[str], advertisements: Sequence[Advertisement]) -> None:
        """KEYS relay: one advertisement per member, and those this site uses (its neighbours'
        and its own: everyone's without `neighbours`) verified now (certificate, name, signature).

        With `neighbours` the others' are verified only if their confirmation is needed (at
        UNMASK): a site of a large federation does not check hundreds of certificates it never
        uses.
        """
        names = self._members("KEYS", members)
        relayed: dict[str, Advertisement] = {}
        for advertisement in advertisements:
            name = advertisement.collaborator
            if name in relayed:
                raise self._violation(f"relays two advertisements of site {name!r}")
            relayed[name] = advertisement
        if sorted(relayed) != list(names):
            raise self._violation(
                f"relays advertisements of {sorted(relayed)} for the KEYS members {list(names)}"
            )
        used = [name for name in self.context.holders(self.name) if name in relayed]
        signers = {
            name: verify_advertisement(self.context, relayed[name], self._cas) for name in used
        }
        mine = self.advertisement()
        own = relayed[self.name]
        if (own.encryption_key, own.mask_key, own.seed_commitment) != (
            mine.encryption_key,
            mine.mask_key,
            mine.seed_commitment,
        ):
            raise self._violation("relays keys of this site that are not the ones it advertised")
        self._members_u1 = names
        self._relayed = relayed
        self._signers = signers
        self._keys = {name: relayed[name] for name in used}

    def _signer(self, name: str) -> PublicKey | None:
        """The certificate key of `name`'s advertisement, verified now if not yet; None (logged)
        when it does not verify or was not relayed."""
        if name in self._signers:
            return self._signers[name]
        if name not in self._relayed:
            return None
        try:
            signer = verify_advertisement(self.context, self._relayed[name], self._cas)
        except ProtocolViolation as error:
            logger.warning("round %d: site %r: %s", self.context.round_number, self.name, error)
            return None
        self._signers[name] = signer
        return signer

    def _require_keys(self) -> dict[str, Advertisement]:
        if self._keys is None:
            raise RuntimeError("accept_keys first: the KEYS relay is not in yet")
        return self._keys

    def _require_sharers(self) -> tuple[str, ...]:
        if self._sharers is None:
            raise RuntimeError("accept_shares first: the SHARES relay is not in yet")
        return self._sharers

    def _coefficients(self, kind: SecretKind) -> list[int]:
        """The Shamir coefficients of one secret, drawn from the sharing seed (the same on restart)."""
        count = self.context.threshold - 1
        key = derive(self.secrets.sharing_seed, framed(self.context.label, b"coefficients"))
        stream = keystream(
            derive(key, bytes([kind.value])), 0, count * _COEFFICIENT_BYTES, np.uint8
        ).tobytes()
        return [
            int.from_bytes(stream[i : i + _COEFFICIENT_BYTES], "big") % shamir.PRIME
            for i in range(0, len(stream), _COEFFICIENT_BYTES)
        ]

    def sealed_shares(self) -> list[SealedShare]:
        """SHARES: one sealed pair of shares (of b and of s) for each holder among KEYS's members."""
        keys = self._require_keys()
        holders = [name for name in self.context.holders(self.name) if name in keys]
        if len(holders) < self.context.threshold:
            logger.warning(
                "round %d: only %d of site %s's holders are in the round (threshold %d): its "
                "secrets cannot be rebuilt, and the round cannot close trained if it is needed",
                self.context.round_number,
                len(holders),
                self.name,
                self.context.threshold,
            )
        points = [self.context.point(name) for name in holders]
        seed_shares = shamir.split(
            self.secrets.seed,
            self.context.threshold,
            points,
            coefficients=self._coefficients(SecretKind.SELF_MASK_SEED),
        )
        key_shares = shamir.split(
            self.secrets.mask_private,
            self.context.threshold,
            points,
            coefficients=self._coefficients(SecretKind.MASK_PRIVATE_KEY),
        )
        sealed: list[SealedShare] = []
        for holder, point in zip(holders, points, strict=True):
            try:
                key = agreed_key(
                    self.secrets.encryption_private,
                    keys[holder].encryption_key,
                    share_agreement(self.context, self.name, holder),
                )
            except ValueError:
                raise ProtocolViolation(
                    f"site {holder!r}: its advertised encryption key agrees no secret with "
                    f"site {self.name!r} (a low-order point)"
                ) from None
            nonce = derive(
                self.secrets.sharing_seed, framed(self.context.label, b"nonce", text(holder))
            )[:NONCE_BYTES]
            plaintext = point.to_bytes(_POINT_BYTES, "big") + seed_shares[point] + key_shares[point]
            ciphertext = AESGCM(key).encrypt(
                nonce, plaintext, share_associated_data(self.context, self.name, holder)
            )
            sealed.append(SealedShare(self.name, holder, nonce + ciphertext))
        return sealed

    def accept_shares(
        self, members: Sequence[str], sealed: Sequence[SealedShare]
    ) -> tuple[str, ...]:
        """SHARES relay: open the shares sealed for this site; returns the members sharing with it
        whose share it does not hold (it did not open, or was not relayed), each logged."""
        keys = self._require_keys()
        names = self._members("SHARES", members)
        outside = sorted(set(names) - set(self._members_u1))
        if outside:
            raise self._violation(f"names {outside} in SHARES who are not KEYS members")
        held: dict[str, tuple[bytes, bytes]] = {}
        seen: set[str] = set()
        for share in sealed:
            if share.receiver != self.name:
                raise self._violation(
                    f"relays a share from {share.sender!r} sealed for {share.receiver!r}"
                )
            if share.sender not in names:
                raise self._violation(f"relays a share from {share.sender!r}, not a SHARES member")
            if share.sender in seen:
                raise self._violation(f"relays two shares from {share.sender!r}")
            if self.name not in self.context.holders(share.sender):
                raise self._violation(
                    f"relays a share from {share.sender!r}, which does not share with this site"
                )
            seen.add(share.sender)
            opened = self._open(share, keys[share.sender])
            if opened is not None:
                held[share.sender] = opened
        missing = tuple(
            sender
            for sender in names
            if sender not in held and self.name in self.context.holders(sender)
        )
        for sender in missing:
            logger.warning(
                "round %d: site %r holds no share of %s's secrets (%s); the other holders' suffice "
                "while %d of them take part",
                self.context.round_number,
                self.name,
                sender,
                "its share does not open" if sender in seen else "none was relayed",
                self.context.threshold,
            )
        self._sharers = names
        self._held = held
        return missing

    def _open(self, share: SealedShare, sender: Advertisement) -> tuple[bytes, bytes] | None:
        """The (b, s) shares in `share`, or None when it does not open or holds the wrong point."""
        try:
            key = agreed_key(
                self.secrets.encryption_private,
                sender.encryption_key,
                share_agreement(self.context, share.sender, self.name),
            )
            plaintext = AESGCM(key).decrypt(
                share.ciphertext[:NONCE_BYTES],
                share.ciphertext[NONCE_BYTES:],
                share_associated_data(self.context, share.sender, self.name),
            )
        except (ValueError, InvalidTag):
            return None
        if len(plaintext) != _SEALED_PLAINTEXT:
            return None
        if int.from_bytes(plaintext[:_POINT_BYTES], "big") != self.context.point(self.name):
            return None
        middle = _POINT_BYTES + shamir.SHARE_BYTES
        return plaintext[_POINT_BYTES:middle], plaintext[middle:]

    def _mask_keys(self) -> list[tuple[bytes, bool]]:
        """(key, subtract) of every mask this site adds: its own, then one per sharing neighbour."""
        keys = self._require_keys()
        sharers = self._require_sharers()
        masks = [(self_mask_key(self.context, self.name, self.secrets.seed), False)]
        for peer in self.context.neighbours(self.name):
            if peer not in sharers:
                continue
            try:
                key = agreed_key(
                    self.secrets.mask_private,
                    keys[peer].mask_key,
                    mask_agreement(self.context, self.name, peer),
                )
            except ValueError:
                raise ProtocolViolation(
                    f"site {peer!r}: its advertised mask key agrees no secret with site "
                    f"{self.name!r} (a low-order point)"
                ) from None
            masks.append((key, peer < self.name))  # +PRG(k) when this site's name is the lower
        return masks

    def masked_update(
        self,
        delta: Mapping[str, npt.NDArray[Any]],
        weight: int,
        *,
        reference: Mapping[str, npt.NDArray[Any]] | None = None,
        factor: float = 1.0,
        noise: Callable[[str, int, int], FloatArray] | None = None,
    ) -> dict[str, RingArray]:
        """MASKED UPLOAD: the delta (trained - global) weighted, encoded and masked, each tensor in
        its shape and the ring's dtype, plus WEIGHT_TENSOR (the masked weight, shape (1,)).

        With `reference` (the global model), `delta` is the trained model and the delta is taken
        a chunk at a time as it is encoded (`FixedPoint.encode`), never whole in float64.
        `weight` is the sample count (at least 1); above max_weight it counts as max_weight.
        With differential privacy, the delta is scaled by `factor` (its clipping) and
        `noise(tensor, start, stop)` added (the site's noise share) before it is encoded.
        Raises ValueError for a delta with NaN or infinite values (nothing can be uploaded).
        """
        if weight < 1:
            raise ValueError(f"an update's weight is at least 1, not {weight}")
        weight = min(weight, self.context.settings.max_weight)
        fixed = self.context.fixed_point
        layout = VectorLayout.of_arrays(delta)
        masks = self._mask_keys()
        masked: dict[str, RingArray] = {}
        for name, (start, _stop) in layout.slices.items():
            values = np.asarray(delta[name])
            base = None if reference is None else np.asarray(reference[name]).reshape(-1)
            noised = None if noise is None else functools.partial(noise, name)
            try:
                flat = fixed.encode(
                    values.reshape(-1), weight, reference=base, factor=factor, noise=noised
                )
            except ValueError as error:
                raise ValueError(f"tensor {name!r}: {error}") from None
            add_masks(flat, masks, start)
            masked[name] = flat.reshape(values.shape)
        flat = fixed.encode_weight(weight)
        add_masks(flat, masks, layout.weight)
        masked[WEIGHT_TENSOR] = flat
        return masked

    def _survivors(self, survivors: Sequence[str]) -> tuple[str, ...]:
        """U3 checked: members of U2, once each, t or more, this site among them, one list ever."""
        sharers = self._require_sharers()
        names = tuple(sorted(survivors))
        if len(set(names)) != len(names):
            raise self._violation("names a survivor twice")
        strangers = sorted(set(names) - set(sharers))
        if strangers:
            raise self._violation(f"names survivors {strangers} that are not SHARES members")
        if len(names) < self.context.threshold:
            raise self._too_few(
                f"names {len(names)} survivors {list(names)}, below the threshold "
                f"{self.context.threshold}: nothing is revealed"
            )
        if self.name not in names:
            raise self._violation("asks this site to confirm a survivor list without it")
        if self.secrets.confirmed is not None and self.secrets.confirmed != names:
            raise self._violation(
                f"names survivors {list(names)} after this site confirmed "
                f"{list(self.secrets.confirmed)}: refused (one survivor list a round)"
            )
        return names

    def confirmation(self, survivors: Sequence[str]) -> SurvivorConfirmation:
        """SURVIVORS: this site's signature of U3 once checked; marks `secrets.confirmed` (write the
        secrets file before posting it)."""
        names = self._survivors(survivors)
        self.secrets.confirmed = names
        signature = sign(self._signing_key, survivors_bytes(self.context, names))
        return SurvivorConfirmation(self.name, names, signature)

    def revealed_shares(
        self, survivors: Sequence[str], confirmations: Sequence[SurvivorConfirmation]
    ) -> list[RevealedShare]:
        """UNMASK: the shares the unmasking needs, once a quorum of survivors
        (`RoundContext.quorum`) confirmed exactly U3: of each owner it holds, the seed's share
        when the owner survived, else the mask key's; never both kinds for one owner. Marks
        `secrets.revealed` (write the secrets file before posting)."""
        names = self._survivors(survivors)
        signed = self._confirmed_by(names, confirmations)
        if len(signed) < self.context.quorum:
            raise self._violation(
                f"relays {len(signed)} valid confirmations of survivors {list(names)}, fewer than "
                f"the {self.context.quorum} needed (the threshold, and more than half the "
                "collaborators): nothing is revealed"
            )
        wanted = {
            owner: SecretKind.SELF_MASK_SEED if owner in names else SecretKind.MASK_PRIVATE_KEY
            for owner in self._held
        }
        for owner, kind in sorted(wanted.items()):
            before = self.secrets.revealed.get(owner)
            if before is not None and before is not kind:
                raise self._violation(
                    f"asks for the share of {owner!r}'s {_describe(kind)} after this site "
                    f"revealed its {_describe(before)}'s: refused (never both kinds of a site)"
                )
        self.secrets.confirmed = names
        revealed: list[RevealedShare] = []
        for owner, kind in sorted(wanted.items()):
            self.secrets.revealed[owner] = kind
            seed_share, key_share = self._held[owner]
            share = seed_share if kind is SecretKind.SELF_MASK_SEED else key_share
            revealed.append(RevealedShare(owner, kind, share))
        return revealed

    def _confirmed_by(
        self, survivors: tuple[str, ...], confirmations: Sequence[SurvivorConfirmation]
    ) -> set[str]:
        """The survivors whose confirmation of exactly `survivors` verifies (the first quorum of
        them are enough); the others logged. A confirmation relayed without its list
        (`foedus.secure.wire.relay_to_proto`) is verified against `survivors`: its signature
        holds only if that is the list it signed."""
        signed: set[str] = set()
        for confirmation in confirmations:
            if len(signed) >= self.context.quorum:
                break
            who = confirmation.collaborator
            problem = None
            if who not in survivors:
                problem = "it is not a survivor"
            elif who in signed:
                continue
            elif confirmation.survivors and tuple(sorted(confirmation.survivors)) != survivors:
                problem = "it confirms another survivor list"  # a list-less one: its signature
            else:
                signer = self._signer(who)
                if signer is None:
                    problem = "its advertisement does not verify"
                elif not verify_signature(
                    signer, confirmation.signature, survivors_bytes(self.context, survivors)
                ):
                    problem = "its signature does not verify"
            if problem is None:
                signed.add(who)
            else:
                logger.warning(
                    "round %d: site %r ignores the confirmation relayed as %s's: %s",
                    self.context.round_number,
                    self.name,
                    who,
                    problem,
                )
        return signed


def _describe(kind: SecretKind) -> str:
    return "self-mask seed" if kind is SecretKind.SELF_MASK_SEED else "mask private key"
