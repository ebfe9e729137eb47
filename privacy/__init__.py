"""Differential privacy for the federation: DP-FedAvg's clipping and noise, and its accountant.

Site-level DP-FedAvg (McMahan et al. 2018), on when the plan's `differential_privacy` says so:
each reporting site's update delta (trained - global) is clipped to L2 norm `clip`, all its
tensors together (`clipping`: by the site before it uploads, and again by the aggregator, so
the guarantee does not rest on a site's honesty); the clipped deltas are summed, Gaussian noise
of std noise_multiplier x clip is added to the sum (`noise`: standard normals from AES-256-CTR
under a secret the aggregator keeps, the same for any slice and after a resume), and the sum is
divided by the number of reporters: new = global + (sum + noise) / n. Under secure aggregation
the aggregator sees no update to clip nor a sum to noise before it is unmasked: each site clips
its own and adds its share of the noise before it masks it (`shares`). The epsilon the rounds
spend at the plan's delta, and the most rounds a cap allows, come from Google's RDP accountant
(`accountant`). With adaptive clipping the clip follows a quantile of the sites' update norms,
moved each round by a noisy count of the unclipped ones (`adaptive`). Plain Python and numpy,
no socket: the aggregator and the collaborator call it.

Sample-level DP-SGD at a site, on when a site's runner settings say `dp_sgd` (`dp_sgd`): the
runner clips each record's gradient and adds noise drawn from the site's secret (`secret`) and
the round; the site's accountant (`accountant.dp_sgd_epsilon`) counts the rounds it released,
kept durably in its ledger (`ledger`) before each update is sent. What it has spent travels with
its train metrics under the names of `site_budget`, which every screen reads back.
"""

from foedus.privacy.accountant import budget_line, budget_problem, epsilon_after, rounds_within
from foedus.privacy.clipping import (
    SLICE_ELEMENTS,
    Clip,
    ClippedValues,
    SliceReader,
    add_clipped,
    clip_factor,
    clipped_model,
    delta_norm,
    factor_for,
    model_clip_factor,
    source_clip_factor,
    update_clips,
)
from foedus.privacy.noise import (
    NOISE_VERSION,
    SECRET_BYTES,
    NoiseSecret,
    gaussian,
    new_secret,
    not_noisable,
    stream_key,
)

__all__ = [
    "NOISE_VERSION",
    "SECRET_BYTES",
    "SLICE_ELEMENTS",
    "Clip",
    "ClippedValues",
    "NoiseSecret",
    "SliceReader",
    "add_clipped",
    "budget_line",
    "budget_problem",
    "clip_factor",
    "clipped_model",
    "delta_norm",
    "epsilon_after",
    "factor_for",
    "gaussian",
    "model_clip_factor",
    "new_secret",
    "not_noisable",
    "rounds_within",
    "source_clip_factor",
    "stream_key",
    "update_clips",
]
