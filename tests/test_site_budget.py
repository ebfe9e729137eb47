"""A site's own privacy budget as train metrics: the names, the round trip, what is refused."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from foedus.history.rows import MetricsRow
from foedus.privacy.site_budget import (
    DP_DELTA,
    DP_EPSILON,
    DP_MAX_EPSILON,
    SITE_BUDGET_METRICS,
    SiteBudget,
    latest_budgets,
)


@pytest.mark.parametrize(
    ("budget", "metrics", "text"),
    [
        (
            SiteBudget(2.1, 1e-5, 8.0),
            {"dp_epsilon": 2.1, "dp_delta": 1e-5, "dp_max_epsilon": 8.0},
            "epsilon 2.10 of 8 at delta 1e-05",
        ),
        (SiteBudget(0.0, 0.5), {"dp_epsilon": 0.0, "dp_delta": 0.5}, "epsilon 0.00 at delta 0.5"),
    ],
)
def test_a_budget_goes_to_metrics_and_back(
    budget: SiteBudget, metrics: dict[str, float], text: str
) -> None:
    """The metrics carry the cap only when there is one; read back, the same budget; its text."""
    assert budget.to_metrics() == metrics
    assert SiteBudget.from_metrics({**metrics, "loss": 0.25}) == budget
    # As the aggregator keeps them: float32 on the wire, widened to float64.
    travelled = {name: float(np.float32(value)) for name, value in metrics.items()}
    assert SiteBudget.from_metrics(travelled) == budget
    assert budget.text() == text
    assert SITE_BUDGET_METRICS == (DP_EPSILON, DP_DELTA, DP_MAX_EPSILON)


@pytest.mark.parametrize(
    "metrics",
    [
        {},  # a site without DP-SGD
        {"loss": 0.5, "epsilon": 2.0, "delta": 1e-5},  # another runner's own metrics
        {DP_EPSILON: 2.0},
        {DP_DELTA: 1e-5},
        {DP_EPSILON: -0.1, DP_DELTA: 1e-5},
        {DP_EPSILON: math.nan, DP_DELTA: 1e-5},
        {DP_EPSILON: math.inf, DP_DELTA: 1e-5},
        {DP_EPSILON: 1e300, DP_DELTA: 1e-5},  # beyond the float32 metrics travel as
        {DP_EPSILON: None, DP_DELTA: 1e-5},  # a row's value that was not finite
        {DP_EPSILON: "2", DP_DELTA: 1e-5},
        {DP_EPSILON: True, DP_DELTA: 1e-5},
        {DP_EPSILON: 2.0, DP_DELTA: 0.0},
        {DP_EPSILON: 2.0, DP_DELTA: 1.0},
        {DP_EPSILON: 2.0, DP_DELTA: 1e-5, DP_MAX_EPSILON: 0.0},
        {DP_EPSILON: 2.0, DP_DELTA: 1e-5, DP_MAX_EPSILON: None},
        {DP_EPSILON: 2.0, DP_DELTA: 1e-5, DP_MAX_EPSILON: math.inf},
    ],
)
def test_no_budget_or_a_malformed_one_reads_as_none(metrics: dict[str, object]) -> None:
    """Metrics without a budget, or with one that is not a budget, give no budget to show."""
    assert SiteBudget.from_metrics(metrics) is None


def test_each_sites_latest_budget_over_the_rows() -> None:
    """Each site's budget as its latest round reported it (counted from 1); sites without one
    and malformed budgets are left out; a round without the site (it left, or the final
    validation) keeps its last budget."""

    def row(number: int, sites: dict[str, Any], **keys: Any) -> MetricsRow:
        return MetricsRow.parse(json.dumps({"round": number, "sites": sites, **keys}))

    alice = [SiteBudget(epsilon, 1e-5, 8.0) for epsilon in (2.0, 3.0)]
    bob = SiteBudget(5.0, 1e-6)
    rows = [
        row(0, {"alice": {"train": alice[0].to_metrics()}, "bob": {"train": bob.to_metrics()}}),
        row(1, {"alice": {"train": alice[1].to_metrics()}, "carol": {"train": {DP_EPSILON: 1}}}),
        row(2, {"alice": {"aggregated_model_validation": {"accuracy": 0.5}}}),
        MetricsRow(round_number=None, sites={"alice": {"train": alice[0].to_metrics()}}),
        row(3, {}, final_validation=True),
    ]
    assert latest_budgets(rows) == {"alice": (2, alice[1]), "bob": (1, bob)}
    assert latest_budgets([]) == {}
