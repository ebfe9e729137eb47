"""Load a plan file: safe YAML without aliases, check every key, report every problem at once.

Each problem is one line `FILE: key.path: what is wrong`, so a person can fix them all in one go.
Unknown keys are errors (a typo must not silently fall back to a default). Every YAML file and
text foedus reads (plans, director.yaml, envoy.yaml, experiment configs, site settings, plans
sent over the network) goes through `safe_yaml`, which refuses aliases before expanding them.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import re
import reprlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import yaml

from pki.errors import PkiError
from pki.layout import CertsLayout
from pki.requests import normalise_fingerprint, validate_host
from plans.schema import (
    KNOWN_TASKS,
    TRAIN,
    Address,
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
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RUNNER_PATTERN = re.compile(
    r"^([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$"
)
_MISSING: Any = object()


class PlanError(ValueError):
    """A plan cannot be used; `problems` holds one line per problem, each naming its key."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = [f"{path}: {problem}" for problem in problems]
        super().__init__("\n".join(self.problems))


class _Section:
    """One mapping of the plan, read key by key; problems go to a shared list."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.problems.append(f"{path or 'plan'}: expected a mapping, got {_kind(data)}")
            data = {}
        self.data: Mapping[Any, Any] = data

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: object) -> object:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            self.problems.append(f"{self._key(key)}: required, but missing")
        return default

    def _checked(self, key: str, default: T, check: Callable[[object], T | None], want: str) -> T:
        """The checked value at `key`; `default` (already reported if required) when absent or bad."""
        value = self._get(key, default)
        if key not in self.data:
            return default
        result = check(value)
        if result is None:
            self.problems.append(f"{self._key(key)}: expected {want}, got {_shown(value)}")
            return default
        return result

    def section(self, key: str) -> _Section:
        """The nested mapping under `key` (empty when absent)."""
        return _Section(self._get(key, None), self._key(key), self.problems)

    def text(
        self, key: str, default: str = _MISSING, *, pattern: re.Pattern[str] | None = None
    ) -> str:
        """A non-empty string, matching `pattern` if given."""

        def check(value: object) -> str | None:
            if not isinstance(value, str) or not value.strip():
                return None
            return value if pattern is None or pattern.match(value) else None

        want = f"a name matching {pattern.pattern}" if pattern else "a non-empty string"
        return self._checked(key, default, check, want)

    def integer(self, key: str, default: int = _MISSING, *, low: int, high: int) -> int:
        """An integer in [low, high] (YAML booleans are not integers)."""

        def check(value: object) -> int | None:
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            return value if ok else None  # type: ignore[return-value]

        return self._checked(key, default, check, f"an integer {low}-{high}")

    def optional_integer(self, key: str, default: int | None, *, low: int, high: int) -> int | None:
        """An integer in [low, high], or null for "no bound"."""
        if self.data.get(key, 0) is None:
            self.seen.add(key)
            return None
        return self.integer(key, default, low=low, high=high)  # type: ignore[arg-type]

    def number(self, key: str, default: float = _MISSING, *, low: float, high: float) -> float:
        """A number in [low, high]."""

        def check(value: object) -> float | None:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            return float(value) if ok and low <= value <= high else None  # type: ignore[operator, arg-type]

        return self._checked(key, default, check, f"a number {low:g}-{high:g}")

    def optional_number(
        self, key: str, default: float | None, *, low: float, high: float
    ) -> float | None:
        """A number in [low, high], or null for "no bound"."""
        if self.data.get(key, 0) is None:
            self.seen.add(key)
            return None
        return self.number(key, default, low=low, high=high)  # type: ignore[arg-type]

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """One of `choices`."""
        return self._checked(
            key, default, lambda v: v if v in choices else None, f"one of {', '.join(choices)}"
        )

    def flag(self, key: str, default: bool = _MISSING) -> bool:
        """A boolean."""
        return self._checked(
            key, default, lambda v: v if isinstance(v, bool) else None, "true or false"
        )

    def names(
        self, key: str, default: tuple[str, ...] = _MISSING, *, unique: bool = True
    ) -> tuple[str, ...]:
        """A list of names (letters, digits, '.', '_', '-'), without duplicates if `unique`."""

        def check(value: object) -> tuple[str, ...] | None:
            if not isinstance(value, list):
                return None
            if not all(isinstance(item, str) and NAME_PATTERN.match(item) for item in value):
                return None
            return tuple(value)

        result = self._checked(
            key, default, check, f"a list of names matching {NAME_PATTERN.pattern}"
        )
        if unique and isinstance(result, tuple) and len(set(result)) != len(result):
            duplicates = sorted({name for name in result if result.count(name) > 1})
            self.problems.append(
                f"{self._key(key)}: listed more than once: {_shown_text(', '.join(duplicates), 200)}"
            )
        return result

    def runner_names(
        self, key: str, default: tuple[str, ...] = _MISSING, *, empty: bool = False
    ) -> tuple[str, ...]:
        """A list of runner names a host agrees to import (built-in or package.module:Class)."""

        def check(value: object) -> tuple[str, ...] | None:
            if not isinstance(value, list) or not (value or empty):
                return None
            if not all(isinstance(item, str) and RUNNER_PATTERN.match(item) for item in value):
                return None
            return tuple(value)

        kind = "a list" if empty else "a non-empty list"
        return self._checked(
            key, default, check, f"{kind} of runner names (built-in or package.module:Class)"
        )

    def finish(self) -> None:
        """Report keys this reader never asked for: they are typos or unsupported settings."""
        for key in self.data:
            if key not in self.seen:
                self.problems.append(f"{self._key(_cut(str(key)))}: unknown key")


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


ALIASES_REFUSED = "YAML aliases (*name) are not accepted: write the value out"


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` refusing every alias (`*name`, `<<: *name`) before composing it.

    An alias makes a small text a huge value (a "billion laughs"), flat in memory until a
    message, a dump or a check walks it. Plans and configs have no need of them, so they are
    refused outright (not counted): nothing is expanded, and the rule is one line to explain.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Any node but an alias, composed as `SafeLoader` does."""
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None,
                None,
                ALIASES_REFUSED,
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """`yaml.safe_load` refusing aliases: `yaml.YAMLError` (and the errors of `yaml_document`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader: no Python objects built


def yaml_document(text: str, plan_path: Path) -> object:
    """The YAML document in `text` (from `plan_path`, named in errors); `PlanError` if not YAML."""
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f"line {where.line + 1}: " if where is not None else ""
        problem = getattr(error, "problem", None) or error
        raise PlanError(
            plan_path, [f"{line}not valid YAML: {_yaml_problem(str(problem))}"]
        ) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise PlanError(plan_path, ["not valid YAML: nested too deeply"]) from None
    except ValueError as error:  # a scalar PyYAML cannot build: 2020-13-45, !!int x, 5000 digits
        raise PlanError(plan_path, [f"not valid YAML: {_shown_text(str(error), 120)}"]) from None
    return data


def parse_plan(data: object, plan_path: Path) -> Plan:
    """Check an already-parsed plan document; paths in it are relative to `plan_path`."""
    problems: list[str] = []
    root = _Section(data, "", problems)
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
    )


def _federation(section: _Section) -> FederationSettings:
    uuid = section.text("uuid", pattern=re.compile(r"^[A-Za-z0-9._-]{1,128}$"))
    settings = FederationSettings(
        name=section.text("name"),
        uuid=uuid,
        aggregator_id=section.text("aggregator_id", f"aggregator_{uuid}"),
        rounds=section.integer("rounds", low=1, high=1_000_000),
    )
    section.finish()
    return settings


def _aggregator(section: _Section, base: Path) -> AggregatorSettings:
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
        metrics_address=_listen_address(section, "metrics_address"),
        common_name=_common_name(section, host),
        fingerprint=_fingerprint(section),
    )
    section.finish()
    return settings


# A host name as DNS allows it (letters, digits, '-', dots between labels).
HOST_PATTERN = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
LOOPBACK = "127.0.0.1"


def _listen_address(section: _Section, key: str) -> Address | None:
    """`host:port`, `[v6]:port`, or a port alone (on loopback); None when absent or null."""
    if section.data.get(key) is None:
        section.seen.add(key)
        return None

    def check(value: object) -> Address | None:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return None
        host, colon, port = value.rpartition(":")
        if not colon:
            host, port = LOOPBACK, value
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if not _is_ip(host, version=6):
                return None
        elif not _is_ip(host, version=4) and not _is_host_name(host):
            return None
        if not (port.isascii() and port.isdigit() and 0 <= int(port) <= 65535):
            return None
        return Address(host, int(port))

    return section._checked(
        key,
        None,
        check,
        "host:port, [IPv6]:port, or a port alone (on 127.0.0.1), with a port 0-65535",
    )


def _is_host_name(text: str) -> bool:
    """A DNS name, not a mistyped address: its last label is not all digits."""
    return bool(HOST_PATTERN.match(text)) and not text.rsplit(".", 1)[-1].isdigit()


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _common_name(section: _Section, host: str) -> str:
    """The aggregator certificate's common name: a host name or IP address, as pki certifies."""
    name = section.text("common_name", host if isinstance(host, str) else "")
    if "common_name" not in section.data:
        return name  # the host: a name pki would not certify is reported when dialled
    try:
        validate_host(name)
    except PkiError as error:
        section.problems.append(f"{section._key('common_name')}: {_shown_text(str(error), 200)}")
    return name


def _fingerprint(section: _Section) -> str | None:
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
        section.problems.append(f"{section._key('fingerprint')}: {_shown_text(str(error), 200)}")
        return None


def _optional_file(section: _Section, key: str, base: Path) -> Path | None:
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
        section.problems.append(f"{section._key(key)}: not a usable path: {error.strerror}")
        return None
    if not found:
        section.problems.append(
            f"{section._key(key)}: file not found: {_shown_text(str(path), 200)}"
        )
    return path


def _resolved(section: _Section, key: str, text: str, base: Path) -> Path:
    """`text` as a path relative to the plan, resolved; one the system cannot use is a problem."""
    try:
        return (base / text).resolve()
    except (OSError, ValueError) as error:  # a NUL character in it
        section.problems.append(
            f"{section._key(key)}: not a usable path: {_shown_text(str(error))}"
        )
        return base  # never used: the problem makes the whole plan fail


def _tasks(root: _Section) -> tuple[str, ...]:
    tasks = root.names("tasks")
    if not isinstance(tasks, tuple):
        return tasks
    unknown = [task for task in tasks if task not in KNOWN_TASKS]
    if unknown:
        root.problems.append(
            f"tasks: unknown task {_shown(', '.join(unknown))}; known: {', '.join(KNOWN_TASKS)}"
        )
    elif TRAIN not in tasks:
        root.problems.append(f"tasks: must include {TRAIN!r}, or the model never changes")
    return tasks


def _runner(section: _Section) -> RunnerSettings:
    name = section.text("name", pattern=RUNNER_PATTERN)
    seed = section.integer("seed", 0, low=0, high=2**32 - 1)
    empty: Mapping[str, object] = {}
    settings = section._checked(
        "settings", empty, lambda v: v if isinstance(v, Mapping) else None, "a mapping"
    )
    section.finish()
    return RunnerSettings(name=name, seed=seed, settings=MappingProxyType(dict(settings)))


def _straggler(section: _Section, collaborators: int) -> StragglerSettings:
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


def _best_model(section: _Section, tasks: tuple[str, ...]) -> BestModelSettings:
    defaults = BestModelSettings()
    settings = BestModelSettings(
        task=section.choice("task", defaults.task, KNOWN_TASKS),
        metric=section.text("metric", defaults.metric),
        maximize=section.choice("mode", "max", ("max", "min")) == "max",
    )
    if isinstance(tasks, tuple) and settings.task not in tasks:
        section.problems.append(f"best_model.task: {_shown(settings.task)} is not in tasks")
    section.finish()
    return settings


def _ip_addresses(section: _Section, key: str) -> tuple[str, ...]:
    def check(value: object) -> tuple[str, ...] | None:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return None
        try:
            return tuple(str(ipaddress.ip_address(item)) for item in value)
        except ValueError:
            return None

    return section._checked(key, (), check, "a list of IP addresses")


def _tls(section: _Section, base: Path) -> TLSSettings:
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


def _limits(section: _Section) -> Limits:
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


def _connection(section: _Section) -> ConnectionSettings:
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


# Public for other YAML files read the same way (director.yaml): one reader, one kind of message.
Section = _Section
read_listen_address = _listen_address


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


# Bounded, so a value built from YAML aliases (a "billion laughs") is not printed whole.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


# Set while a plan is read from a file a request named (the site API's plan_path): its problems
# then name keys and what is wrong, never a value, so no request reads a file through errors.
_HIDE_VALUES: contextvars.ContextVar[bool] = contextvars.ContextVar("hide_values", default=False)
HIDDEN = "(a value of the file, not shown)"


@contextlib.contextmanager
def values_hidden() -> Iterator[None]:
    """Within it, problems quote no value of the plan (`shown` says `HIDDEN` instead)."""
    token = _HIDE_VALUES.set(True)
    try:
        yield
    finally:
        _HIDE_VALUES.reset(token)


def _shown(value: object) -> str:
    return HIDDEN if _HIDE_VALUES.get() else _cut(_REPR.repr(value))


def _shown_text(text: str, limit: int = 60) -> str:
    """A message quoting the plan's values (a path, a library's error), cut, or hidden."""
    return HIDDEN if _HIDE_VALUES.get() else _cut(text, limit)


def _yaml_problem(problem: str) -> str:
    """PyYAML's problem, cut; hidden, without what it quotes of the text ('...')."""
    if _HIDE_VALUES.get():
        return _cut(re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", problem), 120)
    return _cut(problem, 120)


def _cut(text: str, limit: int = 60) -> str:
    """`text`, cut to `limit` characters: a message quotes a value, never all of a big one."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Public: a runner quoting a bad `runner.settings` value cuts it the same way.
shown = _shown
cut = _cut
