"""A site's sample-level DP-SGD budget: its ledger before each round, its cap, its epsilon.

The runner trains privately (`foedus.plans.runners.PrivateTraining`); this module counts. Before
the site trains a round it has not released yet, `PrivateRounds.before_train` asks the
accountant (`foedus.privacy.accountant.dp_sgd_epsilon`) what the ledger's rounds and this one
would spend: past the site's cap (`max_epsilon`), it raises `BudgetSpentError` with the one line
the collaborator logs before it leaves the federation and exits 0; within it, the round goes in
the ledger (`foedus.privacy.ledger`), durably, before the update can leave the site. A round the
ledger holds with the same parameters is the same release again (the runner draws it from the
site's secret and the round): it costs nothing, and the cap is not asked again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from foedus.plans.runners import PrivateTraining
from foedus.privacy.accountant import dp_sgd_epsilon
from foedus.privacy.ledger import SiteLedger, SpentRound
from foedus.privacy.noise import NoiseSecret
from foedus.privacy.secret import privacy_secret
from foedus.privacy.site_budget import SiteBudget

logger = logging.getLogger(__name__)

# What a site whose budget is spent tells the aggregator (Leave): fixed, no data of the site.
BUDGET_SPENT_REASON = "the site's privacy budget is spent"


class BudgetSpentError(Exception):
    """The next round would take the site past its cap: it trains no more (the message says so)."""

    def __init__(self, message: str, round_number: int) -> None:
        super().__init__(message)
        self.round_number = round_number


def site_secret(path: Path, made: bytes) -> NoiseSecret:
    """The site's privacy secret in `path`, made from `made` when not there yet (0600)."""
    return privacy_secret(
        path,
        remedy="move it away only if this site has released no private round with it",
        made=made,
    )


class PrivateRounds:
    """What one site spends, round by round, under `training` (the runner's), in `ledger`."""

    def __init__(self, training: PrivateTraining, ledger: SiteLedger) -> None:
        self.training = training
        self.ledger = ledger

    def spent_round(self, round_number: int) -> SpentRound:
        """Round `round_number` as the ledger records it."""
        training = self.training
        return SpentRound(
            round_number, training.noise_multiplier, training.sample_rate, training.steps
        )

    def epsilon(self) -> float:
        """Epsilon at the site's delta spent by every round in the ledger."""
        return dp_sgd_epsilon(self.ledger.rounds, self.training.delta)

    def before_train(self, round_number: int) -> None:
        """Record round `round_number` before the site trains it, or raise `BudgetSpentError`
        when it would take the site past its cap (nothing recorded then)."""
        spent = self.spent_round(round_number)
        if self.ledger.holds(spent):
            logger.info(
                "round %d: trained again as released before (the same secret, the same "
                "update): it costs no more privacy",
                round_number,
            )
            return
        cap = self.training.max_epsilon
        if cap is not None:
            after = dp_sgd_epsilon((*self.ledger.rounds, spent), self.training.delta)
            if after > cap:
                raise BudgetSpentError(
                    f"round {round_number} would spend epsilon {after:.2f} of this site's cap "
                    f"{cap:g} (max_epsilon) at delta {self.training.delta:g}: this site trains "
                    "no more",
                    round_number,
                )
        self.ledger.record(spent)

    def budget(self) -> SiteBudget:
        """What the site has spent so far, at its delta, of its cap."""
        training = self.training
        return SiteBudget(self.epsilon(), training.delta, training.max_epsilon)

    def metrics(self) -> dict[str, float]:
        """The train result's privacy metrics (`foedus.privacy.site_budget`): the site's budget."""
        return self.budget().to_metrics()

    def budget_line(self) -> str:
        """ "this site's privacy budget: epsilon 2.10 of 8 at delta 1e-05 after 3 rounds"."""
        rounds = len(self.ledger.rounds)
        return (
            f"this site's privacy budget: {self.budget().text()} "
            f"after {rounds} {'round' if rounds == 1 else 'rounds'}"
        )

    def settings_line(self) -> str:
        """What the site's first lines say of its DP-SGD."""
        training = self.training
        return (
            f"this site trains with DP-SGD (sample-level differential privacy): noise "
            f"multiplier {training.noise_multiplier:.4g}, sample rate "
            f"{training.sample_rate:.4g}, {training.steps} steps a round; its ledger is "
            f"{self.ledger.path}"
        )
