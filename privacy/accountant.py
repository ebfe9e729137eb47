"""The federation's privacy budget: epsilon after r rounds of DP-FedAvg, by Google's RDP accountant.

Every round adds Gaussian noise of std noise_multiplier x clip to a sum in which one site moves
at most `clip` (its clipped delta): the Gaussian mechanism with noise multiplier
`noise_multiplier`, once per round, on every site (sampling probability 1, the cross-silo case).
`dp_accounting.rdp.RdpAccountant` composes the rounds in Renyi DP (Mironov 2017) and converts
to (epsilon, delta), under add-or-remove-one-site neighbours. Epsilon is a pure function of
(rounds, noise_multiplier, delta), never of the data: the aggregator recomputes it rather than
storing it, and knows before the first round how many rounds the budget allows.
"""

from __future__ import annotations

import math
from functools import lru_cache

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from foedus.plans.schema import DifferentialPrivacySettings


@lru_cache(maxsize=4096)
def epsilon_after(rounds: int, noise_multiplier: float, delta: float) -> float:
    """Epsilon spent at `delta` after `rounds` rounds with noise std `noise_multiplier` x clip.

    0 after no round; infinite when the noise is too small for any finite epsilon.
    """
    if rounds < 0:
        raise ValueError(f"rounds is 0 or more, not {rounds}")
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier is a finite number > 0, not {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"delta is between 0 and 1, not {delta}")
    if rounds == 0:
        return 0.0
    accountant = RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
    )
    return float(accountant.get_epsilon(delta))


def rounds_within(
    max_epsilon: float | None, noise_multiplier: float, delta: float, limit: int
) -> int:
    """The most rounds, at most `limit`, whose epsilon at `delta` is at most `max_epsilon`.

    `limit` when there is no cap (None); 0 when even one round would spend more.
    """
    if limit < 0:
        raise ValueError(f"limit is 0 or more, not {limit}")
    if max_epsilon is None:
        return limit
    low, high = 0, limit  # epsilon_after(low) <= max_epsilon; grows with the rounds
    if epsilon_after(high, noise_multiplier, delta) <= max_epsilon:
        return high
    while high - low > 1:  # epsilon_after(high) > max_epsilon
        middle = (low + high) // 2
        if epsilon_after(middle, noise_multiplier, delta) <= max_epsilon:
            low = middle
        else:
            high = middle
    return low


def budget_line(
    settings: DifferentialPrivacySettings, rounds: int, *, epsilon: float | None = None
) -> str:
    """'privacy budget: epsilon 3.71 of 4 at delta 1e-05 after 12 rounds' (no cap: no 'of')."""
    if epsilon is None:
        epsilon = epsilon_after(rounds, settings.noise_multiplier, settings.delta)
    cap = "" if settings.max_epsilon is None else f" of {settings.max_epsilon:g}"
    noun = "round" if rounds == 1 else "rounds"
    return (
        f"privacy budget: epsilon {epsilon:.2f}{cap} at delta {settings.delta:g} "
        f"after {rounds} {noun}"
    )


def budget_problem(settings: DifferentialPrivacySettings) -> str | None:
    """Why the budget allows no round at all (one line naming the key), or None.

    Checked where the plan runs, beside the loader's checks: the loader (in `plans`) cannot
    ask the accountant.
    """
    if not settings.enabled or settings.max_epsilon is None:
        return None
    first = epsilon_after(1, settings.noise_multiplier, settings.delta)
    if first <= settings.max_epsilon:
        return None
    return (
        f"differential_privacy.max_epsilon: {settings.max_epsilon:g} is less than one round "
        f"spends (epsilon {first:.2f} at delta {settings.delta:g} with noise_multiplier "
        f"{settings.noise_multiplier:g}), so no round could train; raise max_epsilon or "
        "noise_multiplier"
    )
