"""The privacy budget: epsilon after r rounds of DP-FedAvg, the rounds a cap allows, the lines.

Epsilon is checked three ways: against dp-accounting's own value reached by another road (the
closed-form Renyi DP of the Gaussian mechanism, Mironov 2017 Proposition 7, converted by the
library's `compute_epsilon`); against a published figure (dp-accounting's own test
`test_compute_epsilon_delta_gaussian`: noise multiplier 4.530877117 gives (1, 1e-6)-DP in one
step); and between the exact privacy curve of the Gaussian mechanism (Balle and Wang 2018,
Theorem 8) below and Mironov's closed-form bound above.
"""

from __future__ import annotations

import itertools
import math

import pytest
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

from foedus.plans.schema import DifferentialPrivacySettings
from foedus.privacy import budget_line, budget_problem, epsilon_after, rounds_within

CASES = [  # (rounds, noise_multiplier, delta)
    (1, 1.0, 1e-5),
    (12, 1.1, 1e-5),
    (50, 3.0, 1e-6),
    (300, 10.0, 1e-5),
    (1000, 25.0, 1e-8),
]


def _closed_form_epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """Rounds x alpha / (2 sigma^2) at each of the library's orders, converted by the library."""
    orders = list(DEFAULT_RDP_ORDERS)
    rdp = [rounds * order / (2 * noise_multiplier**2) for order in orders]
    epsilon, _ = compute_epsilon(orders, rdp, delta)
    return float(epsilon)


def _exact_delta(epsilon: float, sigma: float) -> float:
    """The least delta of the Gaussian mechanism of sensitivity 1 and std `sigma` at `epsilon`
    (Balle and Wang 2018, Theorem 8): Phi(1/(2 sigma) - epsilon sigma) - e^epsilon Phi(-1/(2
    sigma) - epsilon sigma)."""

    def phi(x: float) -> float:
        return math.erfc(-x / math.sqrt(2)) / 2

    a, b = 1 / (2 * sigma), epsilon * sigma
    return phi(a - b) - math.exp(epsilon) * phi(-a - b)


@pytest.mark.parametrize(("rounds", "noise_multiplier", "delta"), CASES)
def test_epsilon_is_the_accountants_own(rounds: int, noise_multiplier: float, delta: float) -> None:
    """epsilon_after equals the library's conversion of the Gaussian's closed-form RDP."""
    expected = _closed_form_epsilon(rounds, noise_multiplier, delta)
    assert epsilon_after(rounds, noise_multiplier, delta) == pytest.approx(expected, rel=1e-9)


def test_a_published_figure_one_step_of_4_53_is_epsilon_1_at_delta_1e_6() -> None:
    """dp-accounting's test: noise multiplier 4.530877117 is exactly (1, 1e-6)-DP on its fine
    grid of orders; the default orders give it within 0.1%. r rounds at sqrt(r) times the noise
    are the same Gaussian mechanism, so the same epsilon."""
    assert epsilon_after(1, 4.530877117, 1e-6) == pytest.approx(1.0, abs=1e-3)
    assert epsilon_after(16, 4 * 4.530877117, 1e-6) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(("rounds", "noise_multiplier", "delta"), CASES)
def test_epsilon_lies_between_the_exact_curve_and_mironovs_bound(
    rounds: int, noise_multiplier: float, delta: float
) -> None:
    """Sound: at our epsilon the exact Gaussian mechanism (r rounds = one of std sigma / sqrt(r))
    fails with probability at most delta. Not wasteful: no more than Mironov 2017's closed form
    r / (2 sigma^2) + sqrt(2 r ln(1 / delta)) / sigma."""
    epsilon = epsilon_after(rounds, noise_multiplier, delta)
    assert _exact_delta(epsilon, noise_multiplier / math.sqrt(rounds)) <= delta
    bound = rounds / (2 * noise_multiplier**2) + math.sqrt(2 * rounds * math.log(1 / delta)) / (
        noise_multiplier
    )
    assert epsilon <= bound


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_delta() -> None:
    """Spent budget adds up round by round; more noise or a larger delta costs less."""
    spent = [epsilon_after(rounds, 2.0, 1e-5) for rounds in range(0, 40)]
    assert spent[0] == 0.0
    assert all(later > earlier for earlier, later in itertools.pairwise(spent))
    assert epsilon_after(10, 3.0, 1e-5) < epsilon_after(10, 2.0, 1e-5)
    assert epsilon_after(10, 2.0, 1e-3) < epsilon_after(10, 2.0, 1e-5)


@pytest.mark.parametrize("cap", [1.0, 3.7, 8.0, 20.0])
def test_rounds_within_is_the_last_round_under_the_cap(cap: float) -> None:
    """r rounds spend at most the cap; one more would pass it."""
    rounds = rounds_within(cap, 5.0, 1e-5, 10_000)
    assert 0 < rounds < 10_000
    assert epsilon_after(rounds, 5.0, 1e-5) <= cap < epsilon_after(rounds + 1, 5.0, 1e-5)


def test_rounds_within_keeps_to_the_limit_and_to_no_cap() -> None:
    """No cap, or a cap the plan's rounds never reach: the plan's rounds; a cap one round
    passes: none."""
    assert rounds_within(None, 1.0, 1e-5, 7) == 7
    assert rounds_within(1e6, 1.0, 1e-5, 7) == 7
    assert rounds_within(0.01, 1.0, 1e-5, 7) == 0
    assert rounds_within(5.0, 1.0, 1e-5, 0) == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: epsilon_after(-1, 1.0, 1e-5), "rounds is 0 or more"),
        (lambda: epsilon_after(1, 0.0, 1e-5), "noise_multiplier is a finite number > 0"),
        (lambda: epsilon_after(1, math.inf, 1e-5), "noise_multiplier is a finite number > 0"),
        (lambda: epsilon_after(1, 1.0, 1.0), "delta is between 0 and 1"),
        (lambda: rounds_within(1.0, 1.0, 1e-5, -1), "limit is 0 or more"),
    ],
)
def test_arguments_that_mean_nothing_are_refused(call: object, message: str) -> None:
    """A negative count, no noise, a delta of 1: a ValueError naming the argument."""
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


def test_the_budget_line_names_epsilon_cap_delta_and_rounds() -> None:
    """The line the federation ends with; without a cap there is no 'of'."""
    capped = DifferentialPrivacySettings(enabled=True, noise_multiplier=1.1, max_epsilon=4)
    assert (
        budget_line(capped, 12, epsilon=3.7071)
        == "privacy budget: epsilon 3.71 of 4 at delta 1e-05 after 12 rounds"
    )
    uncapped = DifferentialPrivacySettings(enabled=True, noise_multiplier=4.530877117, delta=1e-6)
    assert budget_line(uncapped, 1) == "privacy budget: epsilon 1.00 at delta 1e-06 after 1 round"


def test_a_cap_no_round_fits_in_is_a_problem_naming_max_epsilon() -> None:
    """A cap below one round's epsilon would train nothing: refused where the plan runs."""
    settings = DifferentialPrivacySettings(
        enabled=True, clip=1.0, noise_multiplier=1.0, max_epsilon=0.5
    )
    first = epsilon_after(1, 1.0, 1e-5)
    assert budget_problem(settings) == (
        f"differential_privacy.max_epsilon: 0.5 is less than one round spends (epsilon "
        f"{first:.2f} at delta 1e-05 with noise_multiplier 1), so no round could train; raise "
        "max_epsilon or noise_multiplier"
    )
    enough = DifferentialPrivacySettings(enabled=True, noise_multiplier=1.0, max_epsilon=first)
    assert budget_problem(enough) is None
    off = DifferentialPrivacySettings(enabled=False, noise_multiplier=1.0, max_epsilon=0.5)
    assert budget_problem(off) is None
