"""A site's own privacy budget as its train metrics carry it: the names, said once, and the text.

A site that trains with DP-SGD (`foedus.collaborator.private`) sends, beside its runner's
metrics, the epsilon it has spent after the round (`dp_epsilon`), its delta (`dp_delta`) and,
when it has a cap, the cap (`dp_max_epsilon`). They are the site's own: the aggregator keeps them
per site (`metrics.jsonl`'s `sites`) and leaves them out of the round's weighted means (a mean
of budgets says nothing); its round line, the director's dashboard and `plans/demo.sh` read them
back with `SiteBudget.from_metrics`, and `latest_budgets` gives each site's latest from
`metrics.jsonl` (the director's views: `experiment status`, the dashboard). Plain Python, no
socket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from foedus.history.rows import MetricsRow
from foedus.plans.schema import TRAIN

DP_EPSILON = "dp_epsilon"  # the epsilon the site has spent so far, at DP_DELTA
DP_DELTA = "dp_delta"
DP_MAX_EPSILON = "dp_max_epsilon"  # the site's cap; absent: it has none
# The metrics that are a site's own budget: never averaged over sites.
SITE_BUDGET_METRICS = (DP_EPSILON, DP_DELTA, DP_MAX_EPSILON)


@dataclass(frozen=True)
class SiteBudget:
    """What one site has spent by DP-SGD: `epsilon` at `delta`, of its cap `max_epsilon`."""

    epsilon: float
    delta: float
    max_epsilon: float | None = None  # None: the site has no cap

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> SiteBudget | None:
        """The budget a site's train metrics carry; None when they carry none or a malformed
        one (an epsilon not finite or below 0, a delta outside (0, 1), a cap not above 0):
        every reader shows no budget rather than a wrong one."""
        epsilon = _number(metrics.get(DP_EPSILON))
        delta = _number(metrics.get(DP_DELTA))
        if epsilon is None or delta is None or epsilon < 0 or not 0 < delta < 1:
            return None
        if DP_MAX_EPSILON not in metrics:
            return cls(epsilon, delta)
        cap = _number(metrics[DP_MAX_EPSILON])
        return None if cap is None or cap <= 0 else cls(epsilon, delta, cap)

    def to_metrics(self) -> dict[str, float]:
        """The budget as train metrics (the cap only when there is one)."""
        metrics = {DP_EPSILON: self.epsilon, DP_DELTA: self.delta}
        if self.max_epsilon is not None:
            metrics[DP_MAX_EPSILON] = self.max_epsilon
        return metrics

    def text(self) -> str:
        """'epsilon 2.10 of 8 at delta 1e-05' (no cap: no 'of')."""
        cap = "" if self.max_epsilon is None else f" of {self.max_epsilon:g}"
        return f"epsilon {self.epsilon:.2f}{cap} at delta {self.delta:g}"


def _number(value: object) -> float | None:
    """`value` as a finite float, read as the shortest decimal of the float32 metrics travel as
    (a delta of 1e-05, not 9.999999747378752e-06); None when it is not a finite number (a bool
    is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    with np.errstate(over="ignore"):  # beyond float32: inf, refused below
        number = float(str(np.float32(value)))
    return number if math.isfinite(number) else None


def budgets_by_site(
    sites: Mapping[str, Mapping[str, Mapping[str, object]]],
) -> dict[str, SiteBudget]:
    """The budgets a round's per-site metrics (site -> task -> metric -> value) carry, by site,
    sorted; sites without one are left out."""
    budgets = {site: SiteBudget.from_metrics(tasks.get(TRAIN, {})) for site, tasks in sites.items()}
    return {site: budget for site, budget in sorted(budgets.items()) if budget is not None}


def latest_budgets(rows: Iterable[MetricsRow]) -> dict[str, tuple[int, SiteBudget]]:
    """Each site's budget as its latest round in `rows` (metrics.jsonl's) reported it, with that
    round counted from 1 as people count; sites that reported none are left out, sorted."""
    latest: dict[str, tuple[int, SiteBudget]] = {}
    for row in rows:
        if row.round_number is None:
            continue
        for site, budget in budgets_by_site(row.sites).items():
            if site not in latest or row.round_number + 1 >= latest[site][0]:
                latest[site] = (row.round_number + 1, budget)
    return dict(sorted(latest.items()))
