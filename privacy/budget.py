"""What a plan's `differential_privacy` budget means for a federation: the training rounds it
runs, and what its first line says of them.

Epsilon after r rounds is a pure function of the plan (`foedus.privacy.accountant`), so the
aggregator, its collaborators, the director and a restart all agree on the rounds without
keeping anything.
"""

from __future__ import annotations

from foedus.plans.schema import Plan
from foedus.privacy.accountant import budget_line, rounds_within


def training_rounds(plan: Plan) -> int:
    """The training rounds the federation runs: the plan's `federation.rounds`, or fewer when
    `differential_privacy.max_epsilon` allows fewer."""
    settings = plan.differential_privacy
    if not settings.enabled:
        return plan.federation.rounds
    return rounds_within(
        settings.max_epsilon, settings.noise_multiplier, settings.delta, plan.federation.rounds
    )


def plan_text(plan: Plan) -> str:
    """What the first line says of a DP federation: its settings (under secure aggregation, that
    the sites add the noise; under adaptive clipping, the quantile the clip follows), the rounds
    its budget allows and what they will spend."""
    settings = plan.differential_privacy
    rounds = training_rounds(plan)
    capped = (
        f"; its budget allows {rounds} of the plan's {plan.federation.rounds} rounds"
        if rounds < plan.federation.rounds
        else ""
    )
    secure = plan.secure_aggregation
    shared = (
        f", added by the sites in shares (quorum {secure.quorum(len(plan.collaborators))})"
        if secure.enabled
        else ""
    )
    adaptive = settings.adaptive_clipping
    clip, split = f"clip {settings.clip:g}", ""
    if adaptive is not None:
        clip += (
            f" at first, adapting to the {adaptive.target_quantile:g} quantile of the sites' "
            "update norms"
        )
        update = adaptive.update_noise_multiplier(settings.noise_multiplier)
        split = f" (the update's {update:.4g}, with the noise on the count of unclipped sites)"
    return (
        f"differential privacy ({clip}, noise multiplier "
        f"{settings.noise_multiplier:g}{split}{shared}{capped}; {budget_line(settings, rounds)})"
    )
