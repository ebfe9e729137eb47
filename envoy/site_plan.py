"""The director's plan made this site's: checked against what the site agreed to, then written.

The plan is YAML text (never code): the envoy reads it with `safe_yaml`, refuses a runner not in its
`runners` (and, when the site sets `require_secure_aggregation`, a plan whose secure aggregation is
not on; and when it keeps its metrics, `share_with_aggregator.metrics: false`, a plan without
secure aggregation, whose aggregator would refuse its validations), points `tls` at its own certificate folder, drops the aggregator's files (paths on the
director's host), and checks the result as `collaborator start` will. Its own runner settings
(envoy.yaml `runner_settings`) are written beside the plan (`site-settings.yaml`), and the
collaborator merges them over `runner.settings` (`collaborator start --site-settings`,
`foedus.plans.site_settings`): they stay the site's, so they may hold what a plan may not, such
as the site's privacy cap (`dp_sgd.max_epsilon`). A collaborator the site starts itself (its
API) keeps the request's runner settings the same way (`own-settings.yaml`, `keep_own_settings`),
envoy.yaml's over them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from foedus.durable.files import write_yaml
from foedus.envoy.config import EnvoyConfig
from foedus.envoy.errors import StateError
from foedus.plans.loader import PlanError, parse_plan, yaml_document
from foedus.plans.reader import shown
from foedus.refusals.errors import InvalidRequestError

PLAN_FILE = "plan.yaml"
SITE_SETTINGS_FILE = "site-settings.yaml"  # the site's runner settings, for --site-settings
OWN_SETTINGS_FILE = "own-settings.yaml"  # the site API's runner_settings of its own collaborator
RECEIVED = Path("the director's plan")  # how refusals name the plan the director sent
# An experiment id becomes a folder name: no separators, no leading dot.
EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Aggregator files on the director's host: a collaborator never reads them, and must not fail
# because they are not here.
_AGGREGATOR_FILES = ("initial_model", "output_dir")


class RefusedPlanError(InvalidRequestError, ValueError):
    """This site will not run the plan; the message is the reason reported to the director."""


def plan_sections(plan_yaml: str, source: Path) -> dict[str, Any]:
    """The plan's YAML as a mapping of its sections; `RefusedPlanError` naming `source` if not."""
    try:
        document = yaml_document(plan_yaml, source)
    except PlanError as error:
        raise RefusedPlanError("; ".join(error.problems)) from None
    if not isinstance(document, dict):
        raise RefusedPlanError(f"{source}: expected a mapping of plan sections")
    return document


def site_document(plan_yaml: str, site: str, config: EnvoyConfig, folder: Path) -> dict[str, Any]:
    """The plan for this site's collaborator, checked; `RefusedPlanError` with the reason if not."""
    document = plan_sections(plan_yaml, RECEIVED)
    runner = document.get("runner")
    name = runner.get("name") if isinstance(runner, Mapping) else None
    if name not in config.runners:
        raise RefusedPlanError(
            f"runner {shown(name)} is not one this site agreed to run ({config.path}: runners: "
            f"{', '.join(config.runners)})"
        )
    document = dict(document)
    document["tls"] = {"certs_dir": str(config.certs.root)}
    aggregator = document.get("aggregator")
    if isinstance(aggregator, Mapping):
        document["aggregator"] = {
            key: value for key, value in aggregator.items() if key not in _AGGREGATOR_FILES
        }
    try:
        plan = parse_plan(document, folder / PLAN_FILE)
    except PlanError as error:
        raise RefusedPlanError("; ".join(error.problems)) from None
    if site not in plan.collaborators:
        raise RefusedPlanError(
            f"{RECEIVED}: collaborators: this site {site!r} is not listed "
            f"(listed: {shown(', '.join(plan.collaborators))})"
        )
    if config.require_secure_aggregation and not plan.secure_aggregation.enabled:
        raise RefusedPlanError(
            f"{RECEIVED}: secure_aggregation.enabled: not true, and this site requires secure "
            f"aggregation ({config.path}: require_secure_aggregation: true)"
        )
    if not config.share_with_aggregator.metrics and not plan.secure_aggregation.enabled:
        raise RefusedPlanError(
            f"{RECEIVED}: secure_aggregation.enabled: not true, and this site keeps its metrics, "
            f"which only a secure federation accepts ({config.path}: share_with_aggregator: "
            "metrics: false)"
        )
    return document


def write_site_plan(document: Mapping[str, Any], folder: Path) -> Path:
    """Write the site's plan into `folder` durably and atomically; its path."""
    return _written(document, folder / PLAN_FILE)


def keep_own_settings(settings: Mapping[str, Any], folder: Path) -> None:
    """Keep the runner settings the site's API gave its own collaborator in `folder`, durably,
    before the collaborator is kept (`write_site_settings` reads them at each start)."""
    if settings:
        _written(settings, folder / OWN_SETTINGS_FILE)


def write_site_settings(config: EnvoyConfig, folder: Path) -> Path | None:
    """Write the site's own runner settings into `folder` for `--site-settings`: those its API
    kept (`keep_own_settings`), envoy.yaml's `runner_settings` over them; their path, or None when
    the site has none (a file left by an older envoy.yaml is then not used)."""
    own = folder / OWN_SETTINGS_FILE
    try:
        kept = yaml.safe_load(own.read_text(encoding="utf-8")) if own.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise StateError(f"{own}: cannot read the settings the site's API kept: {error}") from None
    settings = {**(kept if isinstance(kept, Mapping) else {}), **config.runner_settings}
    if not settings:
        return None
    return _written(settings, folder / SITE_SETTINGS_FILE)


def _written(document: Mapping[str, Any], path: Path) -> Path:
    """`document` written to `path` as YAML, durably and atomically; `StateError` if it cannot."""
    try:
        write_yaml(dict(document), path)
    except (OSError, yaml.YAMLError) as error:
        raise StateError(f"{path}: cannot write: {error}") from None
    return path
