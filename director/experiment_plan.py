"""A submitted plan, checked; and the plan the director writes for the experiment's aggregator.

A person submits a foedus plan (the same schema as `aggregator start` reads) without the fields
the director owns: who the federation is (`federation.uuid`, `federation.aggregator_id`), where
its aggregator runs (`aggregator.host`, `port`, `listen_address`, `san_dns`, `san_ips`,
`metrics_address`: director-run aggregators serve no metrics endpoint of their own), who it is
(`aggregator.common_name`, `fingerprint`: its certificate is the director's), where its
files go (`aggregator.output_dir`, `aggregator.initial_model`) and its certificates (`tls`). A plan
setting any of them is refused, naming each; so is one naming sites not registered. The rest is
checked by `plans.parse_plan` itself, so the director accepts exactly what an aggregator would.

One section is the director's, not the plan schema's: an optional top-level `liveness` (`min_sites`,
`mandatory_sites`, `offline_grace_seconds`, as in director.yaml), this experiment's own liveness
policy, each key it leaves out taken from director.yaml's. It is read here (strictly: unknown keys,
mandatory sites that are not the plan's collaborators, more `min_sites` than collaborators are
refused, naming the key) and left out of the plan the aggregator gets, so `foedus.plans.schema` and
`aggregator start` never see it (`aggregator start` refuses a plan holding it, as any unknown
section).

When the policy lets the experiment go on without some site (`min_sites` below the number of
sites) and the plan sets no `straggler.offline_after_seconds`, the aggregator's plan sets it to
the time after which the director counts a silent site lost (2 x `health_check_seconds` +
`offline_grace_seconds`): the aggregator stops waiting for that site when the director does.

The plan's runner is the last check (`check_runner`): imported, and its settings checked, only if
director.yaml `runners` allows it; otherwise the experiment must bring its initial model.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

from foedus.durable.files import write_yaml
from foedus.plans.director_config import DirectorConfig, SiteLossPolicy, read_liveness
from foedus.plans.loader import PlanError, load_plan, parse_plan, yaml_document
from foedus.plans.reader import Section, safe_yaml
from foedus.plans.runners import RunnerError, check_runner_settings, load_runner
from foedus.plans.schema import (
    ConnectionSettings,
    DifferentialPrivacySettings,
    Plan,
    RunnerSettings,
)
from foedus.privacy.budget import training_rounds
from foedus.refusals.errors import InvalidRequestError, LimitExceededError, StorageError

SUBMITTED = Path("submitted plan")  # how errors name the plan a person sent
PLAN_FILE = "plan.yaml"
LIVENESS = (
    "liveness"  # the submitted plan's section the director reads and the aggregator never gets
)
MAX_OFFLINE_AFTER_SECONDS = 86400 * 7  # straggler.offline_after_seconds' highest
# (section, key) the director sets; key None: the whole section.
OWNED: tuple[tuple[str, str | None], ...] = (
    ("federation", "uuid"),
    ("federation", "aggregator_id"),
    ("aggregator", "host"),
    ("aggregator", "port"),
    ("aggregator", "listen_address"),
    ("aggregator", "san_dns"),
    ("aggregator", "san_ips"),
    ("aggregator", "output_dir"),
    ("aggregator", "initial_model"),
    ("aggregator", "metrics_address"),  # another port on the director's host: not the submitter's
    ("aggregator", "common_name"),  # who the aggregator is: the director's certificate says
    ("aggregator", "fingerprint"),
    ("tls", None),
)
_PLACEHOLDERS: Mapping[str, Mapping[str, object]] = {
    "federation": {"uuid": "submitted"},
    "aggregator": {"host": "localhost", "port": 0},
    "tls": {"insecure": True},
}


@dataclass(frozen=True)
class SubmittedPlan:
    """A submitted plan that passed every check, and what the director reads from it."""

    text: str
    name: str  # federation.name
    sites: tuple[str, ...]  # collaborators
    rounds: int  # federation.rounds


def check_submitted(
    text: str,
    *,
    registered: Collection[str],
    max_bytes: int,
    runners: Collection[str],
    initial_model: bool,
) -> SubmittedPlan:
    """Check a submitted plan's YAML text; `InvalidRequestError` naming every bad field.

    Its runner last (an import): see `check_runner`.
    """
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise LimitExceededError(
            f"the plan is {size} bytes; this director accepts plans of at most {max_bytes} bytes "
            "(director.yaml limits.max_plan_bytes)"
        )
    try:
        document = yaml_document(text, SUBMITTED)
    except PlanError as error:
        raise InvalidRequestError("; ".join(error.problems)) from None
    if not isinstance(document, Mapping):
        raise InvalidRequestError(f"{SUBMITTED}: expected a mapping of plan sections")
    owned = [
        f"{SUBMITTED}: {section}{'.' + key if key else ''}: set by the director; remove it"
        for section, key in OWNED
        if _is_set(document, section, key)
    ]
    if owned:
        raise InvalidRequestError("; ".join(owned))
    try:
        plan = parse_plan(_with_placeholders(_without_liveness(document)), SUBMITTED)
    except PlanError as error:
        raise InvalidRequestError("; ".join(error.problems)) from None
    liveness = _read_plan_liveness(document, SiteLossPolicy())
    problems = liveness_problems(document.get(LIVENESS), liveness, plan.collaborators)
    if problems:
        raise InvalidRequestError("; ".join(f"{SUBMITTED}: {p}" for p in problems))
    unknown = [site for site in plan.collaborators if site not in registered]
    if unknown:
        raise InvalidRequestError(
            f"{SUBMITTED}: collaborators: not registered with this director: "
            f"{', '.join(unknown)} (`experiment envoys` lists the registered sites)"
        )
    check_runner(plan.runner, runners=runners, initial_model=initial_model)
    return SubmittedPlan(
        text=text,
        name=plan.federation.name,
        sites=plan.collaborators,
        rounds=training_rounds(plan),  # with differential privacy, those its budget allows
    )


def check_runner(runner: RunnerSettings, *, runners: Collection[str], initial_model: bool) -> None:
    """An allowed runner is imported to check `runner.settings`; any other needs a model.

    Importing a module runs its code: the director's host imports only the runners its admin
    listed in director.yaml `runners`. A plan naming another runner brings its initial model, so
    that neither the director nor the aggregator it starts imports anything of it (the sites
    check its settings, and refuse it unless their own `runners` allow it).
    """
    if runner.name in runners:
        try:
            check_runner_settings(load_runner(runner), runner)
        except RunnerError as error:
            raise InvalidRequestError(f"{SUBMITTED}: {error}") from None
    elif not initial_model:
        allowed = ", ".join(runners) or "none"
        raise InvalidRequestError(
            f"{SUBMITTED}: runner.name: {runner.name!r} is not a runner this director's host runs "
            f"(director.yaml runners: {allowed}); submit the experiment with its initial model "
            "('experiment submit --initial-model FILE'), or ask an admin to add the runner to "
            "director.yaml runners"
        )


def liveness_problems(
    section: object, liveness: SiteLossPolicy | list[str], sites: tuple[str, ...]
) -> list[str]:
    """What is wrong with a plan's `liveness` section (`liveness`: it read, or its problems)."""
    if isinstance(liveness, list):
        return liveness
    if not isinstance(section, Mapping):
        return []
    problems = []
    unknown = [site for site in liveness.mandatory_sites if site not in sites]
    if "mandatory_sites" in section and unknown:
        problems.append(
            f"{LIVENESS}.mandatory_sites: {', '.join(unknown)} not among the collaborators"
        )
    if (
        "min_sites" in section
        and liveness.min_sites is not None
        and liveness.min_sites > len(sites)
    ):
        problems.append(
            f"{LIVENESS}.min_sites: {liveness.min_sites} is more than the plan's "
            f"{len(sites)} collaborators"
        )
    return problems


def plan_liveness(text: str, defaults: SiteLossPolicy) -> SiteLossPolicy:
    """The liveness policy of an accepted plan's text: its `liveness` keys over `defaults`."""
    try:
        document = yaml_document(text, SUBMITTED)
    except PlanError:
        return defaults  # accepted plans parse; a damaged state row keeps the director's rule
    return _document_liveness(document, defaults)


@dataclass(frozen=True)
class Protections:
    """What an accepted plan protects its sites' updates with, as its aggregator reads it."""

    secure: bool  # secure_aggregation.enabled
    privacy: DifferentialPrivacySettings | None  # None: differential privacy off


def plan_protections(text: str) -> Protections:
    """An accepted plan's secure aggregation and differential privacy (defaults included), from
    one reading of its text, checked as at submit: reading its YAML is most of the cost."""
    try:
        document = yaml_document(text, SUBMITTED)
        if not isinstance(document, Mapping):
            return Protections(secure=False, privacy=None)
        plan = parse_plan(_with_placeholders(_without_liveness(document)), SUBMITTED)
    except PlanError:
        # accepted plans parse; a damaged state row says nothing of them
        return Protections(secure=False, privacy=None)
    privacy = plan.differential_privacy
    return Protections(plan.secure_aggregation.enabled, privacy if privacy.enabled else None)


def _document_liveness(document: object, defaults: SiteLossPolicy) -> SiteLossPolicy:
    """`plan_liveness` of a plan already parsed: `defaults` where its `liveness` is unusable."""
    if not isinstance(document, Mapping):
        return defaults
    liveness = _read_plan_liveness(document, defaults)
    return defaults if isinstance(liveness, list) else liveness


def _read_plan_liveness(
    document: Mapping[Any, Any], defaults: SiteLossPolicy
) -> SiteLossPolicy | list[str]:
    """The plan's `liveness` over `defaults`, or the list of its problems."""
    problems: list[str] = []
    liveness = read_liveness(
        Section({LIVENESS: document.get(LIVENESS)}, "", problems).section(LIVENESS), defaults
    )
    return problems or liveness


def _without_liveness(document: Mapping[Any, Any]) -> dict[Any, Any]:
    return {key: value for key, value in document.items() if key != LIVENESS}


class DirectorFields(TypedDict):
    """What the director sets in an experiment's plan: its id, its aggregator's port and folder."""

    experiment_id: str
    port: int
    config: DirectorConfig
    folder: Path
    initial_model: Path | None


def director_document(text: str, **fields: Unpack[DirectorFields]) -> dict[str, Any]:
    """The submitted plan with the director's fields set, as a YAML document."""
    config, experiment_id = fields["config"], fields["experiment_id"]
    document = safe_yaml(text)  # accepted at submit: valid, without aliases
    if not isinstance(document, dict):
        raise InvalidRequestError(f"{SUBMITTED}: expected a mapping of plan sections")
    liveness = _document_liveness(document, config.liveness)
    document = copy.deepcopy(_without_liveness(document))
    sites = document.get("collaborators")
    straggler = document.get("straggler")
    straggler = dict(straggler) if isinstance(straggler, Mapping) else {}
    if (
        isinstance(sites, list)
        and liveness.min_sites is not None
        and liveness.min_sites < len(sites)
        and straggler.get("offline_after_seconds") is None
    ):
        connection = document.get("connection")
        heartbeat = (connection if isinstance(connection, Mapping) else {}).get(
            "heartbeat_seconds", ConnectionSettings.heartbeat_seconds
        )
        lost_after = 2 * config.health_check_seconds + liveness.offline_grace_seconds
        # No less than the plan allows (two of its collaborators' heartbeats), nor more.
        straggler["offline_after_seconds"] = min(
            max(lost_after, 2 * float(heartbeat)), MAX_OFFLINE_AFTER_SECONDS
        )
        document["straggler"] = straggler
    federation = dict(document.get("federation") or {})
    federation.update(uuid=experiment_id, aggregator_id=f"aggregator_{experiment_id}")
    aggregator = dict(document.get("aggregator") or {})
    aggregator.update(
        host=config.host,
        port=fields["port"],
        listen_address=config.aggregator_listen_address,
        output_dir=str(fields["folder"] / "output"),
    )
    if fields["initial_model"] is not None:
        aggregator["initial_model"] = str(fields["initial_model"])
    document.update(
        federation=federation, aggregator=aggregator, tls={"certs_dir": str(config.certs.root)}
    )
    return document


def write_director_plan(text: str, **fields: Unpack[DirectorFields]) -> tuple[Path, Plan]:
    """Write the experiment's aggregator plan into `folder` (durably) and load it back, checked."""
    document = director_document(text, **fields)
    path = fields["folder"] / PLAN_FILE
    try:
        write_yaml(document, path)
    except OSError as error:
        raise StorageError(f"{path}: cannot write: {error.strerror or error}") from None
    try:
        return path, load_plan(path)
    except PlanError as error:  # the submitted part passed these checks: a fault of the director's
        raise StorageError("; ".join(error.problems)) from None


def _is_set(document: Mapping[Any, Any], section: str, key: str | None) -> bool:
    if section not in document:
        return False
    if key is None:
        return True
    part = document[section]
    return isinstance(part, Mapping) and key in part


def _with_placeholders(document: Mapping[Any, Any]) -> dict[Any, Any]:
    """The document with harmless values in the director's fields, for `parse_plan` to check."""
    filled = dict(document)
    for section, values in _PLACEHOLDERS.items():
        part = filled.get(section)
        if section == "tls" or part is None:
            filled[section] = dict(values)
        elif isinstance(part, Mapping):
            filled[section] = {**part, **values}
    return filled
