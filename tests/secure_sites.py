"""Test helpers: honest sites of a secure federation (`foedus.secure.SiteRound` with pki's real
certificates), playing their part against a `Federation` in plain Python, and the posts they make."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.serialization import Encoding

from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Array, ResultTensor, TaskResult
from foedus.pki.files import read_certificate, read_certificates, read_private_key
from foedus.pki.layout import CertsLayout
from foedus.plans.schema import SecureAggregationSettings
from foedus.privacy.clipping import clip_factor
from foedus.privacy.shares import NoiseShares
from foedus.secure import RoundContext
from foedus.secure.site import SiteRound
from foedus.secure.site_secrets import SiteSecrets
from foedus.secure.wire import Post, Relay, Stage, post_bytes

SETTINGS = SecureAggregationSettings(enabled=True, threshold=2, clip=1.0, bits=32, max_weight=100)


def certificate_der(certs: CertsLayout, name: str) -> bytes:
    """`name`'s collaborator certificate, DER."""
    return read_certificate(certs.collaborator_cert(name)).public_bytes(Encoding.DER)


def site_round(
    certs: CertsLayout,
    context: RoundContext,
    name: str,
    *,
    secrets: SiteSecrets | None = None,
) -> SiteRound:
    """`name`'s part of the round `context` says, with its real certificate and key."""
    return SiteRound(
        context,
        name,
        secrets or SiteSecrets.generate(),
        signing_key=read_private_key(certs.collaborator_key(name)),
        certificate_der=certificate_der(certs, name),
        ca_certificates=read_certificates(certs.ca_bundle),
    )


def post(fed: Federation, name: str, message: Post) -> bool:
    """`name` posts `message` as the servicer hands it over (with its stored bytes)."""
    return fed.post_secure(name, message, post_bytes(message))


def relay(fed: Federation, name: str, round_number: int, stage: Stage) -> Relay:
    """What `stage` relays to `name` now."""
    return fed.secure_relay(name, round_number, stage, 0)


def masked_result(
    name: str, round_number: int, masked: Mapping[str, Array], *, loss: float | None = 0.5
) -> TaskResult:
    """A masked `train` result as a site uploads it: ring tensors, the weight, a metric (none
    when `loss` is None: the site keeps its metrics)."""
    tensors = [ResultTensor(t, frozenset({"trained"}), array) for t, array in masked.items()]
    if loss is not None:
        tensors.append(ResultTensor("loss", frozenset({"metric"}), np.array(loss, np.float32)))
    return TaskResult(name, round_number, "train", 1, tuple(tensors))


@dataclass
class Sites:
    """Honest sites of one round of a secure federation, driven stage by stage."""

    fed: Federation
    certs: CertsLayout
    round_number: int
    rounds: dict[str, SiteRound]

    @classmethod
    def of(
        cls,
        fed: Federation,
        certs: CertsLayout,
        names: Iterable[str],
        *,
        round_number: int = 0,
        uuid: str,
        settings: SecureAggregationSettings = SETTINGS,
    ) -> Sites:
        """Fresh secrets for each of `names` in `round_number` of `fed`."""
        context = RoundContext(uuid, round_number, fed.collaborators, settings)
        return cls(
            fed, certs, round_number, {name: site_round(certs, context, name) for name in names}
        )

    def keys(self, names: Sequence[str] | None = None) -> None:
        """Each site posts its signed keys."""
        for name in names or sorted(self.rounds):
            assert post(
                self.fed,
                name,
                Post(self.round_number, Stage.KEYS, keys=self.rounds[name].advertisement()),
            )

    def shares(self, names: Sequence[str] | None = None) -> None:
        """Each site takes the KEYS relay and posts its sealed shares."""
        for name in names or sorted(self.rounds):
            site = self.rounds[name]
            got = relay(self.fed, name, self.round_number, Stage.KEYS)
            assert got.ready and not got.excluded, got
            site.accept_keys(got.members, got.keys)
            sealed = tuple(site.sealed_shares())
            assert post(self.fed, name, Post(self.round_number, Stage.SHARES, shares=sealed))

    def upload(
        self,
        name: str,
        delta: Mapping[str, Array],
        weight: int,
        *,
        loss: float | None = 0.5,
        shares: NoiseShares | None = None,
    ) -> TaskResult:
        """`name` takes the SHARES relay and uploads its masked update (with `loss`, unless
        None; with `shares`, clipped and noised as under differential privacy); the result it
        sent."""
        site = self.rounds[name]
        got = relay(self.fed, name, self.round_number, Stage.SHARES)
        assert got.ready and not got.excluded, got
        site.accept_shares(got.members, got.shares)
        if shares is None:
            masked = site.masked_update(delta, weight)
        else:
            masked = site.masked_update(
                delta,
                weight,
                factor=clip_factor(delta, shares.settings.clip),
                noise=shares.noise(self.round_number),
            )
        result = masked_result(name, self.round_number, masked, loss=loss)
        assert self.fed.submit(result)
        return result

    def confirm(self, names: Sequence[str]) -> None:
        """Each site takes the SURVIVORS relay and posts its confirmation."""
        for name in names:
            got = relay(self.fed, name, self.round_number, Stage.SURVIVORS)
            assert got.ready and not got.excluded, got
            confirmation = self.rounds[name].confirmation(got.members)
            assert post(
                self.fed, name, Post(self.round_number, Stage.SURVIVORS, confirmation=confirmation)
            )

    def reveal(self, names: Sequence[str]) -> None:
        """Each site takes the UNMASK relay and posts the shares the unmasking needs."""
        survivors = relay(self.fed, names[0], self.round_number, Stage.SURVIVORS).members
        for name in names:
            got = relay(self.fed, name, self.round_number, Stage.UNMASK)
            assert got.ready and not got.excluded, got
            shares = tuple(self.rounds[name].revealed_shares(survivors, got.confirmations))
            assert post(self.fed, name, Post(self.round_number, Stage.UNMASK, revealed=shares))
