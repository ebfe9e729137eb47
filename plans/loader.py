"""Load a plan file: safe YAML without aliases, check every key, report every problem at once.

Each problem is one line `FILE: key.path: what is wrong`, so a person can fix them all in one go.
Unknown keys are errors (a typo must not silently fall back to a default). The text is read and each
mapping checked by `foedus.plans.reader`, the one strict YAML reader; the services' own YAML files
(director.yaml, envoy.yaml) are read by `read_config`, as strictly as a plan.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from foedus.pki.errors import PkiError
from foedus.pki.layout import CertsLayout
from foedus.pki.requests import normalise_fingerprint, validate_host
from foedus.plans.compression import compression, not_on_the_wire_yet
from foedus.plans.protections import (
    differential_privacy,
    lossy_download,
    secure_aggregation,
    secure_compression,
    site_caps,
)
from foedus.plans.reader import (
    RUNNER_PATTERN,
    Section,
    YamlTextError,
    parse_yaml,
    read_listen_address,
    shown,
    shown_text,
)
from foedus.plans.schema import (
    KNOWN_TASKS,
    TRAIN,
    AggregatorSettings,
    BestModelSettings,
    ConnectionSettings,
    FederationSettings,
    Limits,
    Plan,
    RunnerSettings,
    StragglerPolicy,
    StragglerSettings,
    TLSSettings,
)

T = TypeVar("T")


class PlanError(ValueError):
    """A plan cannot be used; `problems` holds one line per problem, each naming its key."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = [f"{path}: {problem}" for problem in problems]
        super().__init__("\n".join(self.problems))


def load_plan(path: str | Path) -> Plan:
    """Read and check the plan at `path`; raise `PlanError` listing every problem."""
    plan_path = Path(path)
    return parse_plan(read_yaml(plan_path), plan_path)


def read_config(
    path: str | Path,
    parse: Callable[[object, Path], T],
    error: Callable[[list[str]], Exception],
) -> T:
    """Read a service's YAML config (director.yaml, envoy.yaml) and check it with `parse`.

    Read as strictly as a plan; a file that is not YAML raises `error` with its problems.
    """
    config_path = Path(path)
    try:
        data = read_yaml(config_path)
    except PlanError as problem:
        raise error(problem.problems) from None
    return parse(data, config_path)


def read_yaml(plan_path: Path) -> object:
    """The YAML document in a file (with `safe_yaml`); `PlanError` naming the file if not."""
    try:
        text = plan_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(plan_path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PlanError(plan_path, [f"cannot read: {error}"]) from None
    return yaml_document(text, plan_path)


def yaml_document(text: str, plan_path: Path) -> object:
    """The YAML document in `text` (from `plan_path`, named in errors); `PlanError` if not YAML."""
    try:
        return parse_yaml(text)
    except YamlTextError as error:
        line = f"line {error.line}: " if error.line is not None else ""
        raise PlanError(plan_path, [f"{line}not valid YAML: {error.problem}"]) from None


def parse_plan(data: object, plan_path: Path) -> Plan:
    """Check an already-parsed plan document; paths in it are relative to `plan_path`."""
    problems: list[str] = []
    root = Section(data, "", problems)
    base = plan_path.resolve().parent
    federation = _federation(root.section("federation"))
    aggregator = _aggregator(root.section("aggregator"), base)
    tls = _tls(root.section("tls"), base)
    collaborators = root.names("collaborators")
    if root.data.get("collaborators") == []:
        problems.append("collaborators: at least one collaborator is needed")
    tasks = _tasks(root)
    runner = _runner(root.section("runner"))
    known = len(collaborators) if isinstance(collaborators, tuple) else 0  # 0: no cross-check
    straggler = _straggler(root.section("straggler"), known)
    best_model = (
        _best_model(root.section("best_model"), tasks) if "best_model" in root.data else None
    )
    limits = _limits(root.section("limits"))
    connection = _connection(root.section("connection"))
    privacy = differential_privacy(root.section("differential_privacy"), known)
    secure = secure_aggregation(root.section("secure_aggregation"), known, privacy)
    problems.extend(site_caps(runner.settings))
    before = len(problems)
    codes = compression(root.section("compression"))
    problems.extend(secure_compression(codes, secure))
    problems.extend(lossy_download(codes, privacy, secure))
    if len(problems) == before:  # else those problems say what to change
        problems.extend(not_on_the_wire_yet(codes))
    offline_after = straggler.offline_after_seconds
    if offline_after is not None and offline_after < 2 * connection.heartbeat_seconds:
        problems.append(
            f"straggler.offline_after_seconds: {offline_after:g} is less than twice "
            f"connection.heartbeat_seconds ({connection.heartbeat_seconds:g}), so one late "
            "heartbeat would make a busy collaborator offline"
        )
    root.finish()
    if problems:
        raise PlanError(plan_path, problems)
    return Plan(
        path=plan_path,
        federation=federation,
        aggregator=aggregator,
        tls=tls,
        collaborators=collaborators,
        tasks=tasks,
        runner=runner,
        straggler=straggler,
        best_model=best_model,
        limits=limits,
        connection=connection,
        secure_aggregation=secure,
        differential_privacy=privacy,
        compression=codes,
    )


def _federation(section: Section) -> FederationSettings:
    uuid = section.text("uuid", pattern=re.compile(r"^[A-Za-z0-9._-]{1,128}$"))
    settings = FederationSettings(
        name=section.text("name"),
        uuid=uuid,
        aggregator_id=section.text("aggregator_id", f"aggregator_{uuid}"),
        rounds=section.integer("rounds", low=1, high=1_000_000),
    )
    section.finish()
    return settings


def _aggregator(section: Section, base: Path) -> AggregatorSettings:
    host = section.text("host")
    settings = AggregatorSettings(
        host=host,
        port=section.integer("port", low=0, high=65535),
        listen_address=section.text("listen_address", "0.0.0.0"),
        san_dns=section.names("san_dns", ()),
        san_ips=_ip_addresses(section, "san_ips"),
        grace_seconds=section.number("grace_seconds", 5.0, low=0, high=3600),
        output_dir=_resolved(section, "output_dir", section.text("output_dir", "output"), base),
        initial_model=_optional_file(section, "initial_model", base),
        long_poll_seconds=section.number("long_poll_seconds", 5.0, low=0, high=300),
        quit_grace_seconds=section.number("quit_grace_seconds", 30.0, low=0, high=86400),
        metrics_address=read_listen_address(section, "metrics_address"),
        common_name=_common_name(section, host),
        fingerprint=_fingerprint(section),
    )
    section.finish()
    return settings


def _common_name(section: Section, host: str) -> str:
    """The aggregator certificate's common name: a host name or IP address, as pki certifies."""
    name = section.text("common_name", host if isinstance(host, str) else "")
    if "common_name" not in section.data:
        return name  # the host: a name pki would not certify is reported when dialled
    try:
        validate_host(name)
    except PkiError as error:
        section.problems.append(f"{section.key('common_name')}: {shown_text(str(error), 200)}")
    return name


def _fingerprint(section: Section) -> str | None:
    """A pinned SHA-256 certificate fingerprint, normalised (64 hex digits; colons allowed)."""
    if section.data.get("fingerprint") is None:
        section.seen.add("fingerprint")
        return None
    text = section.text("fingerprint", "")
    if not text:
        return None
    try:
        return normalise_fingerprint(text)
    except PkiError as error:
        section.problems.append(f"{section.key('fingerprint')}: {shown_text(str(error), 200)}")
        return None


def _optional_file(section: Section, key: str, base: Path) -> Path | None:
    """An existing file's path relative to the plan, or None when the key is absent or null."""
    if section.data.get(key) is None:
        section.seen.add(key)
        return None
    text = section.text(key, "")
    if not text:
        return None
    problems = len(section.problems)
    path = _resolved(section, key, text, base)
    if len(section.problems) > problems:
        return None
    try:
        found = path.is_file()
    except OSError as error:  # a name too long for the file system
        section.problems.append(f"{section.key(key)}: not a usable path: {error.strerror}")
        return None
    if not found:
        section.problems.append(f"{section.key(key)}: file not found: {shown_text(str(path), 200)}")
    return path


def _resolved(section: Section, key: str, text: str, base: Path) -> Path:
    """`text` as a path relative to the plan, resolved; one the system cannot use is a problem."""
    try:
        return (base / text).resolve()
    except (OSError, ValueError) as error:  # a NUL character in it
        section.problems.append(f"{section.key(key)}: not a usable path: {shown_text(str(error))}")
        return base  # never used: the problem makes the whole plan fail


def _tasks(root: Section) -> tuple[str, ...]:
    tasks = root.names("tasks")
    if not isinstance(tasks, tuple):
        return tasks
    unknown = [task for task in tasks if task not in KNOWN_TASKS]
    if unknown:
        root.problems.append(
            f"tasks: unknown task {shown(', '.join(unknown))}; known: {', '.join(KNOWN_TASKS)}"
        )
    elif TRAIN not in tasks:
        root.problems.append(f"tasks: must include {TRAIN!r}, or the model never changes")
    return tasks


def _runner(section: Section) -> RunnerSettings:
    name = section.text("name", pattern=RUNNER_PATTERN)
    seed = section.integer("seed", 0, low=0, high=2**32 - 1)
    empty: Mapping[str, object] = {}
    settings = section.checked(
        "settings", empty, lambda v: v if isinstance(v, Mapping) else None, "a mapping"
    )
    section.finish()
    return RunnerSettings(name=name, seed=seed, settings=MappingProxyType(dict(settings)))


def _straggler(section: Section, collaborators: int) -> StragglerSettings:
    defaults = StragglerSettings()
    choices = tuple(policy.value for policy in StragglerPolicy)
    settings = StragglerSettings(
        policy=StragglerPolicy(section.choice("policy", defaults.policy.value, choices)),
        cutoff_seconds=section.number(
            "cutoff_seconds", defaults.cutoff_seconds, low=0, high=86400 * 7
        ),
        min_reports=section.integer("min_reports", defaults.min_reports, low=1, high=1_000_000),
        percentage=section.number("percentage", defaults.percentage, low=0.0001, high=1),
        offline_after_seconds=section.optional_number(
            "offline_after_seconds", defaults.offline_after_seconds, low=0.5, high=86400 * 7
        ),
    )
    if collaborators and settings.min_reports > collaborators:
        section.problems.append(
            f"straggler.min_reports: {settings.min_reports} is more than the "
            f"{collaborators} collaborators"
        )
    section.finish()
    return settings


def _best_model(section: Section, tasks: tuple[str, ...]) -> BestModelSettings:
    defaults = BestModelSettings()
    settings = BestModelSettings(
        task=section.choice("task", defaults.task, KNOWN_TASKS),
        metric=section.text("metric", defaults.metric),
        maximize=section.choice("mode", "max", ("max", "min")) == "max",
    )
    if isinstance(tasks, tuple) and settings.task not in tasks:
        section.problems.append(f"best_model.task: {shown(settings.task)} is not in tasks")
    section.finish()
    return settings


def _ip_addresses(section: Section, key: str) -> tuple[str, ...]:
    def check(value: object) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return None
        try:
            return tuple(str(ipaddress.ip_address(item)) for item in value)
        except ValueError:
            return None

    return section.checked(key, (), check, "a list of IP addresses")


def _tls(section: Section, base: Path) -> TLSSettings:
    insecure = section.flag("insecure", False)
    certs_dir = section.text("certs_dir", "")
    section.finish()
    if insecure and certs_dir:
        section.problems.append("tls: give either certs_dir or insecure: true, not both")
    if not insecure and not certs_dir and "certs_dir" not in section.data:
        section.problems.append("tls.certs_dir: required unless tls.insecure is true")
    certs = None
    if not insecure and certs_dir:
        certs = CertsLayout(_resolved(section, "certs_dir", certs_dir, base))
    return TLSSettings(certs=certs, insecure=insecure)


def _limits(section: Section) -> Limits:
    defaults = Limits()
    most = 2**31 - 1  # gRPC's own ceiling for one message
    limits = Limits(
        max_message_bytes=section.integer(
            "max_message_bytes", defaults.max_message_bytes, low=4096, high=most
        ),
        max_upload_bytes=section.integer(
            "max_upload_bytes", defaults.max_upload_bytes, low=4096, high=2**40
        ),
        max_tensor_bytes=section.integer(
            "max_tensor_bytes", defaults.max_tensor_bytes, low=1, high=2**40
        ),
        max_data_size=section.integer(
            "max_data_size", defaults.max_data_size, low=1, high=2**31 - 1
        ),
        allow_non_finite=section.flag("allow_non_finite", defaults.allow_non_finite),
        upload_seconds=section.number(
            "upload_seconds", defaults.upload_seconds, low=0.1, high=86400
        ),
        max_calls_per_collaborator=section.integer(
            "max_calls_per_collaborator", defaults.max_calls_per_collaborator, low=1, high=10_000
        ),
        stream_window_bytes=section.optional_integer(
            "stream_window_bytes", defaults.stream_window_bytes, low=64 * 1024, high=most
        ),
    )
    section.finish()
    return limits


def _connection(section: Section) -> ConnectionSettings:
    defaults = ConnectionSettings()
    settings = ConnectionSettings(
        deadline_seconds=section.number(
            "deadline_seconds", defaults.deadline_seconds, low=0.01, high=86400
        ),
        max_retries=section.optional_integer(
            "max_retries", defaults.max_retries, low=0, high=1_000_000
        ),
        max_wait_seconds=section.optional_number(
            "max_wait_seconds", defaults.max_wait_seconds, low=0, high=30 * 86400
        ),
        backoff_initial_seconds=section.number(
            "backoff_initial_seconds", defaults.backoff_initial_seconds, low=0, high=3600
        ),
        backoff_max_seconds=section.number(
            "backoff_max_seconds", defaults.backoff_max_seconds, low=0, high=86400
        ),
        atomic_connections=section.flag("atomic_connections", defaults.atomic_connections),
        resend_on_reconnect=section.flag("resend_on_reconnect", defaults.resend_on_reconnect),
        heartbeat_seconds=section.number(
            "heartbeat_seconds", defaults.heartbeat_seconds, low=0.1, high=3600
        ),
    )
    section.finish()
    return settings
