"""Privacy budgets by Google's RDP accountant: the federation's (DP-FedAvg) and a site's (DP-SGD).

Every round adds Gaussian noise of std noise_multiplier x clip to a sum in which one site moves
at most `clip` (its clipped delta): the Gaussian mechanism with noise multiplier
`noise_multiplier`, once per round, on every site (sampling probability 1, the cross-silo case).
`dp_accounting.rdp.RdpAccountant` composes the rounds in Renyi DP (Mironov 2017) and converts
to (epsilon, delta), under add-or-remove-one-site neighbours. Epsilon is a pure function of
(rounds, noise_multiplier, delta), never of the data: the aggregator recomputes it rather than
storing it, and knows before the first round how many rounds the budget allows.

A site that trains with DP-SGD (sample-level DP: each record of the site is protected) counts
its own rounds with the same library (`dp_sgd_epsilon`): each step samples records by Poisson
sampling and adds Gaussian noise to the sum of their clipped gradients, the subsampled Gaussian
mechanism composed over the steps of every round it released. The same library for both, so the
two budgets read alike; Opacus's own RDP accountant agrees (`make test-torch` checks it).

The library is imported at its first use, not with this module: with scipy it takes 0.65 s,
which every aggregator and collaborator of a federation without DP would pay at its start.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from foedus.plans.schema import DifferentialPrivacySettings


class _Unconverged(logging.Filter):
    """Drops the library's warning that an RDP order of a subsampled Gaussian did not converge:
    that order is left out of the minimum, which stays a valid bound; at small noise multipliers
    (`noise_for`'s trials) it would fill a site's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("_compute_log_a_frac failed to converge")


logging.getLogger("absl").addFilter(_Unconverged())


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
    import dp_accounting  # noqa: PLC0415  (at its first use: see above)

    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    # Past float64's range either way: noise too small to bound anything (infinite epsilon),
    # or so large (above 1e154) that epsilon is 0 to the last bit, as the library gives at 1e150.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        try:
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
            epsilon = float(accountant.get_epsilon(delta))
        except OverflowError:  # noise_multiplier ** 2 in the library
            return 0.0 if noise_multiplier > 1 else math.inf
    return epsilon if not math.isnan(epsilon) else math.inf


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


class SgdRound(Protocol):
    """One round of DP-SGD at a site, as its accountant counts it (`foedus.privacy.ledger`'s
    `SpentRound` is one)."""

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian noise's std over the per-record clipping norm."""
        ...

    @property
    def sample_rate(self) -> float:
        """Each record's Poisson probability of being in a step's batch."""
        ...

    @property
    def steps(self) -> int:
        """The optimizer steps of the round."""
        ...


def dp_sgd_epsilon(rounds: Iterable[SgdRound], delta: float) -> float:
    """Epsilon at `delta` a site has spent after `rounds` of DP-SGD, by Google's RDP accountant.

    Each round is `SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate,
    GaussianDpEvent(noise_multiplier)), steps)` (Abadi et al. 2016's sampled Gaussian
    mechanism, Mironov et al. 2019's RDP of it), all composed; add-or-remove-one-record
    neighbours. 0 after no round; infinite when the noise is too small for a finite epsilon.
    """
    counts: dict[tuple[float, float], int] = {}  # rounds alike compose in one event
    for spent in rounds:
        key = (float(spent.noise_multiplier), float(spent.sample_rate))
        counts[key] = counts.get(key, 0) + spent.steps
    return _dp_sgd_epsilon(tuple(sorted(counts.items())), delta)


@lru_cache(maxsize=4096)
def _dp_sgd_epsilon(steps: tuple[tuple[tuple[float, float], int], ...], delta: float) -> float:
    """Epsilon at `delta` after these (noise_multiplier, sample_rate) -> steps compositions."""
    if not 0 < delta < 1:
        raise ValueError(f"delta is between 0 and 1, not {delta}")
    for (noise_multiplier, sample_rate), count in steps:
        if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier is a finite number > 0, not {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate is above 0 and at most 1, not {sample_rate}")
        if count < 1:
            raise ValueError(f"steps is 1 or more, not {count}")
    if not steps:
        return 0.0
    import dp_accounting  # noqa: PLC0415  (at its first use: see above)

    accountant = dp_accounting.rdp.RdpAccountant()
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        try:
            for (noise_multiplier, sample_rate), count in steps:
                event = dp_accounting.PoissonSampledDpEvent(
                    sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
                )
                accountant.compose(dp_accounting.SelfComposedDpEvent(event, count))
            epsilon = float(accountant.get_epsilon(delta))
        except OverflowError:
            return math.inf
    return epsilon if not math.isnan(epsilon) else math.inf


@dataclass(frozen=True)
class _Round:
    """A round of DP-SGD for `noise_for`'s trials."""

    noise_multiplier: float
    sample_rate: float
    steps: int


MAX_NOISE_MULTIPLIER = (
    1e4  # past this no training signal is left: a target that needs it is refused
)
NOISE_PRECISION = 1e-3  # noise_for's answer is within this fraction of the least noise that fits


def noise_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, rounds: int
) -> float:
    """The noise multiplier with which `rounds` rounds of `steps` DP-SGD steps at `sample_rate`
    spend at most `target_epsilon` at `delta` (bisection; at most 0.1% more than the least).

    `ValueError` saying why when no noise multiplier up to 1e4 fits.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon is a finite number > 0, not {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds is 1 or more, not {rounds}")

    def spent(noise_multiplier: float) -> float:
        return dp_sgd_epsilon([_Round(noise_multiplier, sample_rate, steps * rounds)], delta)

    low, high = 0.0, 1.0  # spent(low) > target (or low is 0), spent(high) <= target
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps {rounds} rounds of "
                f"{steps} steps at sample rate {sample_rate:g} within epsilon "
                f"{target_epsilon:g} at delta {delta:g}"
            )
    while high - low > NOISE_PRECISION * high:
        middle = (low + high) / 2
        if spent(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high
