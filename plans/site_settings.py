"""A site's own runner settings, merged over the plan's `runner.settings`.

The plan is shared by every party, but where a site's data lives, its batch size or its device
are the site's own. They sit in a small YAML mapping at the site (`collaborator start
--site-settings FILE`, or an envoy's `runner_settings`); each of its keys replaces the plan's key
of the same name, whole (a nested mapping is not merged key by key, so what the site wrote is
exactly what its runner sees). The runner checks every key, as it checks the plan's, and names
the file a bad key came from (`RunnerSettings.key_path`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from foedus.plans.reader import ALIASES_REFUSED, YamlTextError, parse_yaml
from foedus.plans.schema import Plan, RunnerSettings


class SiteSettingsError(ValueError):
    """A site settings file cannot be read; the message names the file (and the key)."""


def load_site_settings(path: str | Path) -> Mapping[str, object]:
    """Read a site settings file: a YAML mapping of runner setting names to values."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise SiteSettingsError(f"{path}: cannot read site settings: {reason}") from None
    try:
        data = parse_yaml(text)
    except YamlTextError as error:
        # The line, and the alias rule, but never PyYAML's problem: it quotes the site's text.
        where = f" (line {error.line})" if error.line is not None else ""
        why = f": {ALIASES_REFUSED}" if error.problem == ALIASES_REFUSED else ""
        raise SiteSettingsError(f"{path}: not valid YAML{where}{why}") from None
    if data is None:
        return MappingProxyType({})
    if not isinstance(data, Mapping):
        raise SiteSettingsError(
            f"{path}: expected a mapping of runner settings, got {type(data).__name__}"
        )
    for key in data:
        if not isinstance(key, str) or not key:
            raise SiteSettingsError(f"{path}: {key!r}: setting names must be non-empty text")
    return MappingProxyType(dict(data))


def merge_site_settings(
    runner: RunnerSettings, site: Mapping[str, object], *, source: Path
) -> RunnerSettings:
    """`runner` with `site`'s keys replacing the plan's; `source` names the site's file."""
    merged = {**runner.settings, **site}
    return replace(
        runner,
        settings=MappingProxyType(merged),
        site_file=source,
        site_keys=runner.site_keys | frozenset(site),
    )


def plan_with_site_settings(plan: Plan, path: str | Path) -> Plan:
    """`plan` whose runner settings have this site's file merged over them."""
    site = load_site_settings(path)
    return replace(plan, runner=merge_site_settings(plan.runner, site, source=Path(path)))
