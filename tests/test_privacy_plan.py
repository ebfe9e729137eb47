"""The plan's `differential_privacy` section: off by default, read as written, and every setting
that gives no privacy (or cannot work) refused at start in one line naming the file and key;
with secure aggregation, each site weighs 1 and the ring holds the sites' noise shares."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from foedus.plans import PlanError, load_plan, parse_plan
from foedus.plans.schema import (
    LARGEST_NORMAL,
    AdaptiveClippingSettings,
    DifferentialPrivacySettings,
)

from test_plans import DELETE, OTHER_PROBLEM, PLAN_PATH, _document, _problems, _with

DP_ON = [
    ("differential_privacy.enabled", True),
    ("differential_privacy.clip", 0.5),
    ("differential_privacy.noise_multiplier", 1.1),
]
ADAPTIVE_ON = [*DP_ON, ("differential_privacy.adaptive_clipping.count_noise", 1.0)]


def test_differential_privacy_is_off_by_default() -> None:
    """Without the section, or with it empty: off, delta 1e-5, no cap."""
    settings = parse_plan(_document(), PLAN_PATH).differential_privacy
    assert settings == DifferentialPrivacySettings()
    assert (settings.enabled, settings.delta, settings.max_epsilon) == (False, 1e-5, None)
    empty = parse_plan(_with(_document(), ("differential_privacy", None)), PLAN_PATH)
    assert empty.differential_privacy == settings


def test_differential_privacy_values_as_given() -> None:
    """Every key read as written (integers as floats); null max_epsilon is no cap."""
    document = _with(
        _document(),
        ("differential_privacy.enabled", True),
        ("differential_privacy.clip", 2),
        ("differential_privacy.noise_multiplier", 1.3),
        ("differential_privacy.delta", 1e-6),
        ("differential_privacy.max_epsilon", 4),
    )
    settings = parse_plan(document, PLAN_PATH).differential_privacy
    assert settings == DifferentialPrivacySettings(
        enabled=True, clip=2.0, noise_multiplier=1.3, delta=1e-6, max_epsilon=4.0
    )
    assert isinstance(settings.clip, float) and isinstance(settings.max_epsilon, float)
    assert settings.noise_std == pytest.approx(2.6)
    uncapped = _with(document, ("differential_privacy.max_epsilon", None))
    assert parse_plan(uncapped, PLAN_PATH).differential_privacy.max_epsilon is None


def test_with_secure_aggregation_each_site_weighs_one_and_the_ring_holds_its_noise() -> None:
    """Both on, ring settings left out: max_weight 1, and a clip of clip plus LARGEST_NORMAL x the
    share's std (noise_multiplier x clip / sqrt(quorum), the quorum of 3 sites being 2); a
    larger clip and a max_weight of 1 as written; secure aggregation alone is unchanged."""
    document = _with(_document(), *DP_ON, ("secure_aggregation.enabled", True))
    plan = parse_plan(document, PLAN_PATH)
    secure = plan.secure_aggregation
    assert secure.quorum(3) == 2 and secure.max_weight == 1
    share = 1.1 * 0.5 / 2**0.5
    assert secure.clip == pytest.approx(0.5 + LARGEST_NORMAL * share, rel=1e-9)
    assert secure.clip > 0.5 + LARGEST_NORMAL * share
    written = _with(document, ("secure_aggregation.clip", 5), ("secure_aggregation.max_weight", 1))
    assert parse_plan(written, PLAN_PATH).secure_aggregation.clip == 5.0
    alone = _with(_document(), ("secure_aggregation.enabled", True))
    settings = parse_plan(alone, PLAN_PATH).secure_aggregation
    assert (settings.clip, settings.max_weight) == (1.0, 65536)


def test_adaptive_clipping_is_off_by_default_and_read_as_written() -> None:
    """Absent or null: a fixed clip. Given: its keys as written, the defaults for the others
    (quantile 0.5, learning rate 0.2, count noise collaborators / 20); the update's noise
    multiplier is what the count's noise leaves of the round's: z^-2 = z_delta^-2 + (2c)^-2."""
    assert parse_plan(_with(_document(), *DP_ON), PLAN_PATH).differential_privacy == (
        DifferentialPrivacySettings(enabled=True, clip=0.5, noise_multiplier=1.1)
    )
    null = _with(_document(), *DP_ON, ("differential_privacy.adaptive_clipping", None))
    assert parse_plan(null, PLAN_PATH).differential_privacy.adaptive_clipping is None
    given = _with(_document(), *ADAPTIVE_ON)
    adaptive = parse_plan(given, PLAN_PATH).differential_privacy.adaptive_clipping
    assert adaptive == AdaptiveClippingSettings(target_quantile=0.5, learning_rate=0.2)
    written = _with(
        _document(),
        ("differential_privacy.adaptive_clipping.target_quantile", 0.9),
        ("differential_privacy.adaptive_clipping.learning_rate", 1),
    )
    adaptive = parse_plan(written, PLAN_PATH).differential_privacy.adaptive_clipping
    assert adaptive == AdaptiveClippingSettings(0.9, 1.0, count_noise=3 / 20)
    z_delta = AdaptiveClippingSettings(count_noise=1.0).update_noise_multiplier(1.1)
    assert z_delta == pytest.approx((1.1**-2 - 2.0**-2) ** -0.5, rel=1e-15)
    assert (z_delta**-2 + 2.0**-2) ** -0.5 == pytest.approx(1.1, rel=1e-12)
    assert z_delta == pytest.approx(1.3171, abs=1e-4)  # by hand: (0.82645 - 0.25)^-1/2
    assert AdaptiveClippingSettings(count_noise=0.55).update_noise_multiplier(1.1) == math.inf


def _not_positive(key: str, want: str) -> list[Any]:
    """Zero, negative, infinite, NaN, text and a boolean at `key`: each refused as `want`."""
    return [
        pytest.param(
            [*DP_ON, (f"differential_privacy.{key}", value)],
            f"differential_privacy.{key}: expected {want}, got {shown}",
            id=f"{key}-{name}",
        )
        for name, value, shown in [
            ("zero", 0, "0"),
            ("negative", -0.5, "-0.5"),
            ("infinite", float("inf"), "inf"),
            ("nan", float("nan"), "nan"),
            ("text", "1", "'1'"),
            ("boolean", True, "True"),
        ]
    ]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        *_not_positive(
            "noise_multiplier",
            "a finite number > 0 (the noise's std is noise_multiplier x clip: without noise, "
            "no privacy)",
        ),
        *_not_positive(
            "clip", "a finite number > 0 (the L2 norm each site's update delta is clipped to)"
        ),
        *_not_positive("max_epsilon", "a finite number > 0, or null for no cap"),
        *(
            pytest.param(
                [*DP_ON, ("differential_privacy.delta", value)],
                "differential_privacy.delta: expected a number between 0 and 1, both excluded "
                "(the chance the guarantee fails: keep it well below 1 / the number of sites), "
                f"got {shown}",
                id=f"delta-{name}",
            )
            for name, value, shown in [
                ("one", 1, "1"),
                ("above-one", 1.5, "1.5"),
                ("zero", 0.0, "0.0"),
                ("negative", -1e-5, "-1e-05"),
                ("text", "1e-5", "'1e-5'"),
            ]
        ),
        pytest.param(
            [*DP_ON, ("differential_privacy.max_epsilon", 10**400)],
            "differential_privacy.max_epsilon: expected a finite number > 0, or null for no cap",
            id="max-epsilon-past-floats-range",
        ),
        pytest.param(
            [*DP_ON, ("differential_privacy.delta", -(10**400))],
            "differential_privacy.delta: expected a number between 0 and 1",
            id="delta-past-floats-range",
        ),
        pytest.param(
            [*DP_ON, ("differential_privacy.clip", DELETE)],
            "differential_privacy.clip: required when differential_privacy.enabled is true: "
            "the privacy a federation gives is chosen, never a default",
            id="clip-missing",
        ),
        pytest.param(
            [*DP_ON, ("differential_privacy.noise_multiplier", DELETE)],
            "differential_privacy.noise_multiplier: required when differential_privacy.enabled "
            "is true",
            id="noise-multiplier-missing",
        ),
        pytest.param(
            [*DP_ON, ("secure_aggregation.enabled", True), ("secure_aggregation.max_weight", 64)],
            "secure_aggregation.max_weight: 64 with differential_privacy.enabled: every site "
            "weighs 1 under differential privacy (a weight by sample count would let one site "
            "move the model by more than differential_privacy.clip); leave it out",
            id="secure-weighted-with-dp",
        ),
        pytest.param(
            [*DP_ON, ("secure_aggregation.enabled", True), ("secure_aggregation.clip", 3.8)],
            "secure_aggregation.clip: 3.8 would cut the sites' noise: with "
            "differential_privacy.enabled a value of a site's update is at most "
            "differential_privacy.clip (0.5) plus 8.57 x its noise share's std (0.3889, for the "
            "quorum of 2 sites): leave it out (it is then that bound) or make it at least 3.834",
            id="secure-ring-cuts-the-noise",
        ),
        pytest.param(
            [
                *DP_ON,
                ("differential_privacy.clip", 1e200),
                ("differential_privacy.noise_multiplier", 1e200),
                ("secure_aggregation.enabled", True),
            ],
            "secure_aggregation.enabled: differential_privacy.noise_multiplier x clip is past "
            "float64's range: no ring holds such noise; lower them",
            id="secure-ring-for-infinite-noise",
        ),
        pytest.param(
            [*DP_ON, ("runner.settings.max_epsilon", 3)],
            "runner.settings.max_epsilon: a site's privacy cap belongs to the site's settings "
            "(collaborator start --site-settings, an envoy's runner_settings), never the plan: "
            "each site decides its own",
            id="site-cap-in-the-plan",
        ),
        pytest.param(
            [("runner.settings.dp_sgd", {"noise_multiplier": 1.0, "max_epsilon": 8})],
            "runner.settings.dp_sgd.max_epsilon: a site's privacy cap belongs to the site's "
            "settings (collaborator start --site-settings",
            id="dp-sgd-site-cap-in-the-plan",
        ),
        pytest.param(
            [("runner.settings.max_epsilon", 3)],
            "runner.settings.max_epsilon: a site's privacy cap belongs to the site's settings ",
            id="site-cap-in-a-plan-without-dp",
        ),
        pytest.param(
            [("differential_privacy.noise_multiplier", 0)],
            "differential_privacy.noise_multiplier: expected a finite number > 0",
            id="off-but-still-checked",
        ),
        pytest.param(
            [("differential_privacy.enabled", "yes")],
            "differential_privacy.enabled: expected true or false, got 'yes'",
            id="enabled-not-a-boolean",
        ),
        pytest.param(
            [*DP_ON, ("differential_privacy.epsilon", 4)],
            "differential_privacy.epsilon: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            [("differential_privacy", [1])],
            "differential_privacy: expected a mapping, got list",
            id="not-a-mapping",
        ),
        *(
            pytest.param(
                [*ADAPTIVE_ON, (f"differential_privacy.adaptive_clipping.{key}", value)],
                f"differential_privacy.adaptive_clipping.{key}: expected {want}",
                id=f"adaptive-{key}-{shown}",
            )
            for key, value, shown, want in [
                ("target_quantile", 0, "0", "a number between 0 and 1, both excluded"),
                ("target_quantile", 1.0, "1.0", "a number between 0 and 1, both excluded"),
                ("learning_rate", 0, "0", "a finite number > 0 (how far the clip moves"),
                ("learning_rate", -0.2, "-0.2", "a finite number > 0 (how far the clip moves"),
                ("count_noise", 0, "0", "a finite number > 0 (the std of the noise on the count"),
                ("count_noise", "2", "'2'", "a finite number > 0 (the std of the noise on"),
            ]
        ),
        pytest.param(
            [*ADAPTIVE_ON, ("differential_privacy.adaptive_clipping.count_noise", 0.55)],
            "differential_privacy.adaptive_clipping.count_noise: 0.55 leaves the update no "
            "noise: the round's noise_multiplier (1.1) is shared between the update and the "
            "count of unclipped sites, whose own noise multiplier (2 x count_noise) must be "
            "above it; make count_noise more than 0.55",
            id="adaptive-count-noise-takes-all",
        ),
        pytest.param(
            [*DP_ON, ("differential_privacy.adaptive_clipping", {})],
            "differential_privacy.adaptive_clipping.count_noise: 0.15 leaves the update no noise",
            id="adaptive-default-count-noise-of-3-sites-too-low",
        ),
        pytest.param(
            [*ADAPTIVE_ON, ("differential_privacy.adaptive_clipping.quantile", 0.5)],
            "differential_privacy.adaptive_clipping.quantile: unknown key",
            id="adaptive-unknown-key",
        ),
        pytest.param(
            [*ADAPTIVE_ON, ("secure_aggregation.enabled", True)],
            "secure_aggregation.enabled: differential_privacy.adaptive_clipping is not yet "
            "possible with secure aggregation: the sites' clipped-or-not bits would need a "
            "secure sum too; turn one of them off",
            id="adaptive-with-secure-aggregation",
        ),
    ],
)
def test_differential_privacy_problem_names_its_key(
    changes: list[tuple[str, Any]], expected: str
) -> None:
    """Each refusal is one line naming its key, reported with the plan's other problems."""
    other_key, other_value, other_expected = OTHER_PROBLEM
    problems = _problems(_with(_document(), *changes, (other_key, other_value)))
    assert any(line.startswith(expected) for line in problems), problems
    assert any(line.startswith(other_expected) for line in problems), problems
    assert len(problems) == 2, problems


def test_a_refusal_names_the_plans_file(tmp_path: Path) -> None:
    """From a file, as `aggregator start` and `collaborator start` load it: the file's path
    first on the line."""
    document = _with(_document(), *DP_ON, ("differential_privacy.delta", 1))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert caught.value.problems == [
        f"{path}: differential_privacy.delta: expected a number between 0 and 1, both excluded "
        "(the chance the guarantee fails: keep it well below 1 / the number of sites), got 1"
    ]
