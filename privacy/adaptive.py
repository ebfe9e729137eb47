"""Adaptive clipping for DP-FedAvg (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping"; TFF's `DifferentiallyPrivateFactory.gaussian_adaptive`).

A fixed clip is a guess: too low, it cuts every update and slows training; too high, the noise
(proportional to it) drowns the updates. With the plan's `differential_privacy.adaptive_clipping`
the clip follows a quantile of the sites' update norms instead. In round r each reporting
site's update delta is compared with the round's clip C_r (b_i = 1 when its norm is at most
C_r, which is when its clip factor is 1); the aggregator sums b_i - 1/2 over the n sites, adds
Gaussian noise of std `count_noise` (its own stream from the federation's secret,
`foedus.privacy.noise.CLIP_COUNT_STREAM`, so a round computed again draws the same), and moves
the clip geometrically toward the target quantile q:

    unclipped share  = (sum(b_i - 1/2) + N(0, count_noise^2)) / n + 1/2
    C_{r+1}          = C_r x exp(-learning_rate x (unclipped share - q))

The centred count has sensitivity 1/2, so its noise multiplier is 2 x count_noise; the update's
noise multiplier z_delta is raised so that the round as a whole is a Gaussian mechanism of the
plan's `noise_multiplier` z: z^-2 = z_delta^-2 + (2 x count_noise)^-2 (the paper's Theorem 1).
The accountant, the budget and every screen count rounds of noise multiplier z as without
adaptive clipping. Only the noisy count moves the clip, so the clips released (metrics.jsonl)
are a post-processing of the round's private outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from foedus.plans.schema import AdaptiveClippingSettings
from foedus.privacy.noise import CLIP_COUNT_STREAM, NoiseSecret, gaussian

# The clip stays within these factors of the plan's initial clip, so that it and the noise
# (proportional to it) stay finite and positive whatever the count's noise draws: a clip 2^64
# times off its start has long stopped meaning anything.
CLIP_RANGE = 2.0**64


def count_normal(secret: NoiseSecret, round_number: int) -> float:
    """Round `round_number`'s standard normal for the noise on its count of unclipped sites."""
    return float(gaussian(secret, round_number, "", 0, 1, stream=CLIP_COUNT_STREAM)[0])


def unclipped_share(
    settings: AdaptiveClippingSettings, unclipped: int, sites: int, normal: float
) -> float:
    """The noisy share of the `sites` updates that were within the clip, `unclipped` of them,
    with `normal` the round's standard normal (`count_normal`)."""
    if not 0 <= unclipped <= sites or sites < 1:
        raise ValueError(f"{unclipped} unclipped of {sites} sites")
    centred = unclipped - sites / 2 + settings.count_noise * normal
    return centred / sites + 0.5


def moved_clip(
    settings: AdaptiveClippingSettings, clip: float, share: float, *, initial: float
) -> float:
    """The next round's clip from this round's `clip` and unclipped `share`:
    clip x exp(-learning_rate x (share - target_quantile)), kept within `CLIP_RANGE` of
    `initial` (the plan's clip)."""
    logarithm = math.log(clip) - settings.learning_rate * (share - settings.target_quantile)
    low, high = math.log(initial / CLIP_RANGE), math.log(initial * CLIP_RANGE)
    return math.exp(min(max(logarithm, low), high))


def next_clip(
    settings: AdaptiveClippingSettings,
    secret: NoiseSecret,
    round_number: int,
    clip: float,
    factors: Sequence[float],
    *,
    initial: float,
) -> float:
    """The clip of round `round_number` + 1, after round `round_number` clipped its reporters'
    updates to `clip` with `factors` (one per site; 1: within the clip)."""
    unclipped = sum(1 for factor in factors if factor == 1.0)
    share = unclipped_share(settings, unclipped, len(factors), count_normal(secret, round_number))
    return moved_clip(settings, clip, share, initial=initial)
