"""A site's runner settings file: read strictly, merged over the plan's, its keys traced to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from foedus.plans import load_plan
from foedus.plans.site_settings import (
    SiteSettingsError,
    load_site_settings,
    plan_with_site_settings,
)

LOCAL_PLAN = Path(__file__).resolve().parents[1] / "plans" / "local.yaml"


def test_site_keys_replace_the_plans_and_are_traced_to_the_file(tmp_path: Path) -> None:
    """A key the site sets wins over the plan's; others stay; errors name the right source."""
    site = tmp_path / "site.yaml"
    site.write_text("batch_size: 7\ndata_path: /srv/data\n")
    plan = load_plan(LOCAL_PLAN)
    merged = plan_with_site_settings(plan, site)
    assert merged.runner.settings["batch_size"] == 7
    assert merged.runner.settings["data_path"] == "/srv/data"
    for key, value in plan.runner.settings.items():
        if key not in ("batch_size", "data_path"):
            assert merged.runner.settings[key] == value
    assert merged.runner.key_path("data_path") == f"{site}: data_path"
    assert merged.runner.key_path("epochs") == "runner.settings.epochs"
    assert plan.runner.settings.get("data_path") is None  # the plan itself is unchanged


def test_an_empty_file_changes_nothing(tmp_path: Path) -> None:
    """An empty site file is an empty mapping: the plan's settings as they are."""
    site = tmp_path / "site.yaml"
    site.write_text("")
    plan = load_plan(LOCAL_PLAN)
    assert dict(plan_with_site_settings(plan, site).runner.settings) == dict(plan.runner.settings)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "expected a mapping of runner settings, got list"),
        ("a: [1\n", "not valid YAML (line 2)"),
        ("1: x\n", "1: setting names must be non-empty text"),
    ],
)
def test_bad_files_are_refused_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    """A file that is not a mapping of names is refused with its path and the reason."""
    site = tmp_path / "site.yaml"
    site.write_text(text)
    with pytest.raises(SiteSettingsError) as refused:
        load_site_settings(site)
    assert str(refused.value) == f"{site}: {message}"


def test_a_missing_file_is_an_error_not_empty(tmp_path: Path) -> None:
    """A site file that does not exist is refused, never read as no settings."""
    with pytest.raises(SiteSettingsError, match="cannot read site settings: No such file"):
        load_site_settings(tmp_path / "absent.yaml")
