"""Sites of a secure round in memory, with real certificates from our `pki`; the test plays the
aggregator (relays what each stage's members posted, sums the uploads, unmasks)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from foedus.pki.files import read_certificate, read_certificates, read_private_key
from foedus.pki.keys import PrivateKey
from foedus.pki.layout import CertsLayout
from foedus.pki.local import load_signing_ca
from foedus.pki.requests import Role
from foedus.plans.schema import SecureAggregationSettings
from foedus.privacy.clipping import clip_factor
from foedus.privacy.shares import NoiseShares
from foedus.secure.context import WEIGHT_TENSOR, RoundContext
from foedus.secure.records import Advertisement, RevealedShare, SealedShare
from foedus.secure.ring import RingArray
from foedus.secure.site import SiteRound
from foedus.secure.site_secrets import SiteSecrets
from foedus.secure.unmask import Unmasking

from conftest import COLLABORATORS, Identity, issue_identity

FEDERATION = "0b6f2d1e-4c1a-4d0e-9a57-2f3c5e7d9b11"
SITES = (*COLLABORATORS, "dave", "erin")  # conftest's three, and two more from the same CA


@dataclass(frozen=True)
class SiteIdentity:
    """A site's certificate (DER) and its private key, as its collaborator loads them."""

    key: PrivateKey
    certificate: bytes

    @classmethod
    def load(cls, identity: Identity) -> SiteIdentity:
        """Read a certificate and key that `pki` wrote."""
        der = read_certificate(identity.cert).public_bytes(serialization.Encoding.DER)
        return cls(read_private_key(identity.key), der)


def identities(certs: CertsLayout, folder: Path) -> dict[str, SiteIdentity]:
    """conftest's alice, bob and carol, and dave and erin certified by the same signing CA."""
    found = {
        name: SiteIdentity.load(
            Identity(cert=certs.collaborator_cert(name), key=certs.collaborator_key(name))
        )
        for name in COLLABORATORS
    }
    signing_key, signing_cert = load_signing_ca(certs)
    for name in SITES[len(COLLABORATORS) :]:
        issued = issue_identity(
            folder, Role.COLLABORATOR, name, signing_key=signing_key, signing_cert=signing_cert
        )
        found[name] = SiteIdentity.load(issued)
    return found


def ca_certificates(certs: CertsLayout) -> list[x509.Certificate]:
    """The federation's CA bundle, as every site checks its peers against it."""
    return read_certificates(certs.ca_bundle)


@pytest.fixture(scope="session")
def known(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SiteIdentity]:
    """Five sites' keys and certificates, all from the federation's CA (`identities`)."""
    return identities(certs, tmp_path_factory.mktemp("secure_sites"))


@pytest.fixture(scope="session")
def cas(certs: CertsLayout) -> list[x509.Certificate]:
    """The federation's CA bundle (`ca_certificates`)."""
    return ca_certificates(certs)


def context(
    names: Sequence[str] = SITES,
    *,
    round_number: int = 3,
    federation: str = FEDERATION,
    **settings: Any,
) -> RoundContext:
    """A round of `names` with secure aggregation on (threshold 3, clip 1, 32 bits by default)."""
    values: dict[str, Any] = {"enabled": True, "threshold": 3, "clip": 1.0, "max_weight": 1000}
    values.update(settings)
    return RoundContext(federation, round_number, tuple(names), SecureAggregationSettings(**values))


def sites(
    round_context: RoundContext,
    known: Mapping[str, SiteIdentity],
    cas: Sequence[x509.Certificate],
) -> dict[str, SiteRound]:
    """A fresh SiteRound with fresh secrets for every collaborator of the round."""
    return {
        name: SiteRound(
            round_context,
            name,
            SiteSecrets.generate(),
            signing_key=known[name].key,
            certificate_der=known[name].certificate,
            ca_certificates=cas,
        )
        for name in round_context.collaborators
    }


def updates(
    model: Mapping[str, npt.NDArray[Any]], names: Sequence[str], seed: int = 7, scale: float = 0.1
) -> dict[str, dict[str, npt.NDArray[np.float64]]]:
    """A float64 delta for each site (normal, `scale`), tensor by tensor."""
    rng = np.random.default_rng(seed)
    return {
        name: {tensor: rng.normal(0.0, scale, array.shape) for tensor, array in model.items()}
        for name in names
    }


def fedavg(
    model: Mapping[str, npt.NDArray[Any]],
    deltas: Mapping[str, Mapping[str, npt.NDArray[np.float64]]],
    weights: Mapping[str, int],
    survivors: Collection[str],
) -> dict[str, npt.NDArray[np.float64]]:
    """The float64 FedAvg of the survivors' deltas added to the model (the reference)."""
    total = sum(weights[name] for name in survivors)
    return {
        tensor: np.asarray(array, dtype=np.float64)
        + sum(deltas[name][tensor] * weights[name] for name in survivors) / total
        for tensor, array in model.items()
    }


@dataclass
class Relays:
    """What the test's aggregator relayed, stage by stage (for a restarted site to replay)."""

    keys: list[Advertisement] = field(default_factory=list)
    u1: tuple[str, ...] = ()
    shares: list[SealedShare] = field(default_factory=list)
    u2: tuple[str, ...] = ()
    u3: tuple[str, ...] = ()
    revealed: dict[str, list[RevealedShare]] = field(default_factory=dict)
    summed: dict[str, RingArray] = field(default_factory=dict)


def run_round(
    round_sites: Mapping[str, SiteRound],
    model: Mapping[str, npt.NDArray[Any]],
    deltas: Mapping[str, Mapping[str, npt.NDArray[np.float64]]],
    weights: Mapping[str, int],
    *,
    before_shares: Collection[str] = (),
    before_upload: Collection[str] = (),
    before_unmask: Collection[str] = (),
    shares: Mapping[str, NoiseShares] | None = None,
) -> tuple[dict[str, npt.NDArray[Any]], Relays]:
    """One whole round, honest aggregator; sites in each set drop out at that point (after KEYS,
    after SHARES, after their upload). With `shares` (differential privacy), each site clips
    its delta and adds its noise share as a collaborator does. Returns the next model and the
    relays."""
    relays = Relays()
    names = sorted(round_sites)
    round_context = round_sites[names[0]].context
    relays.keys = [round_sites[name].advertisement() for name in names]
    relays.u1 = tuple(names)
    for name in relays.u1:
        round_sites[name].accept_keys(relays.u1, relays.keys)
    posting = [name for name in relays.u1 if name not in before_shares]
    relays.shares = [share for name in posting for share in round_sites[name].sealed_shares()]
    relays.u2 = tuple(posting)
    for name in relays.u2:
        round_sites[name].accept_shares(relays.u2, for_receiver(relays.shares, name, relays.u2))
    relays.u3 = tuple(name for name in relays.u2 if name not in before_upload)

    def masked(name: str) -> dict[str, RingArray]:
        if shares is None:
            return round_sites[name].masked_update(deltas[name], weights[name])
        share = shares[name]
        return round_sites[name].masked_update(
            deltas[name],
            weights[name],
            factor=clip_factor(deltas[name], share.settings.clip),
            noise=share.noise(round_context.round_number),
        )

    uploads = {name: masked(name) for name in relays.u3}
    relays.summed = summed(uploads)
    confirming = [name for name in relays.u3 if name not in before_unmask]
    confirmations = [round_sites[name].confirmation(relays.u3) for name in confirming]
    relays.revealed = {
        name: round_sites[name].revealed_shares(relays.u3, confirmations) for name in confirming
    }
    unmasking = Unmasking.rebuild(
        round_context,
        {advertisement.collaborator: advertisement for advertisement in relays.keys},
        relays.u2,
        relays.u3,
        relays.revealed,
    )
    return unmasking.next_model(model, relays.summed), relays


def for_receiver(
    shares: Sequence[SealedShare], receiver: str, members: Collection[str]
) -> list[SealedShare]:
    """The SHARES relay to `receiver`: the shares members sealed for it."""
    return [share for share in shares if share.receiver == receiver and share.sender in members]


def summed(uploads: Mapping[str, Mapping[str, RingArray]]) -> dict[str, RingArray]:
    """The survivors' masked uploads summed in the ring, tensor by tensor (numpy wraps)."""
    first = next(iter(uploads.values()))
    total = {name: np.zeros_like(array) for name, array in first.items()}
    for upload in uploads.values():
        for name, array in upload.items():
            np.add(total[name], array, out=total[name])
    assert WEIGHT_TENSOR in total
    return total
