"""DP-FedAvg under secure aggregation: each site clips its own update and adds its share of the noise.

The aggregator cannot clip or noise what it cannot see, so a site does both before it masks
(`foedus.secure.SiteRound.masked_update`): it scales its delta (trained - global, all tensors
together) to L2 norm at most `clip` and adds Gaussian noise of std noise_multiplier x clip /
sqrt(t) to every value, t being the round's quorum (`SecureAggregationSettings.quorum`: the
threshold, and more than half the collaborators). An honest site reveals its shares only for a
survivor list that a quorum of survivors signed, so every sum the aggregator can unmask holds
k >= t sites, and their shares add up to noise of std noise_multiplier x clip x sqrt(k / t),
at least the planned noise_multiplier x clip: the accountant's epsilon (from the plan) is an
upper bound. Fewer than t survivors: nothing is revealed, the round closes untrained. Every
site weighs 1 (the loader makes `max_weight` 1), so the unmasked sum divided by the survivors'
summed weight is DP-FedAvg's (sum + noise) / k.

The guarantee rests on the sites: each must clip and add its share honestly, which nobody can
check while the updates stay hidden; a site colluding with the aggregator tells it its own
share, and the noise left is that of the others.

A site's noise is `foedus.privacy.noise`'s stream under a key of its own: HMAC-SHA256 of its
32-byte secret (`privacy.secret` in its state folder, `foedus.privacy.secret`) over
"foedus.privacy.shares/v1" and the federation's uuid, drawn with the noise version the site's
secret was made with. The same round of the same federation
gets the same noise after a restart (the very same masked update, as secure aggregation needs);
a second federation run from the same folder gets other noise (two federations with the same
noise would let their sums be subtracted, and the noise with them).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from foedus.plans.schema import DifferentialPrivacySettings, Plan
from foedus.privacy.clipping import model_clip_factor
from foedus.privacy.noise import NoiseSecret, gaussian

Float64Array = npt.NDArray[np.float64]
Noise = Callable[[str, int, int], Float64Array]  # (tensor, start, stop) -> those noise values
_LABEL = b"foedus.privacy.shares/v1"


def federation_secret(site_secret: NoiseSecret, federation_uuid: str) -> NoiseSecret:
    """The secret of a site's noise shares in one federation, from the site's secret (its
    noise version too)."""
    key = hmac.digest(site_secret.key, _LABEL + federation_uuid.encode("utf-8"), hashlib.sha256)
    return NoiseSecret(key, site_secret.version)


@dataclass(frozen=True)
class NoiseShares:
    """One site's clipping and noise shares in a federation with both secure aggregation and
    differential privacy (see the module's docstring)."""

    settings: DifferentialPrivacySettings
    quorum: int  # t: the fewest sites in a sum the aggregator can unmask
    secret: NoiseSecret  # `federation_secret`: its key never in a log line, nor a repr

    @classmethod
    def of(cls, plan: Plan, site_secret: NoiseSecret) -> NoiseShares | None:
        """The site's noise shares under `plan`; None unless it has both secure aggregation
        and differential privacy on."""
        privacy, secure = plan.differential_privacy, plan.secure_aggregation
        if not (privacy.enabled and secure.enabled):
            return None
        return cls(
            privacy,
            secure.quorum(len(plan.collaborators)),
            federation_secret(site_secret, plan.federation.uuid),
        )

    @property
    def std(self) -> float:
        """The std of each value of this site's share: noise_multiplier x clip / sqrt(quorum)."""
        return self.settings.share_std(self.quorum)

    def clip_factor(
        self,
        global_model: Mapping[str, npt.NDArray[np.generic]],
        trained: Mapping[str, npt.NDArray[np.generic]],
    ) -> float:
        """What scales trained - global to L2 norm at most `clip` (0 for values not finite)."""
        return model_clip_factor(global_model, trained, self.settings.clip)

    def noise(self, round_number: int) -> Noise:
        """Round `round_number`'s share: elements [start, stop) of each tensor's noise, in float64."""

        def values(tensor: str, start: int, stop: int) -> Float64Array:
            drawn = gaussian(self.secret, round_number, tensor, start, stop)
            drawn *= self.std
            return drawn

        return values
