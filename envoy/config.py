"""envoy.yaml: which director, which certificates, what this site holds and agrees to run.

Read as strictly as a plan (with `foedus.plans.reader`): unknown keys are errors, and every
problem is one line `FILE: key.path: what is wrong`, all reported at once. Paths are relative to
the file. An example, every key shown with its default (the four without one are required):

    director: {host: director.example.org, port: 50050}   # required: where the director listens
    certs_dir: certs         # required: a `pki` folder with this site's collaborator certificate
                             #   (collaborators/NAME.crt, .key) and cert_chain.crt
    state_dir: state         # required: the envoy's SQLite state, plans and collaborators' logs
    runners: [digits]        # required: runners this site agrees to run (built-in names or
                             #   package.module:Class installed here); any other is refused
    require_secure_aggregation: false   # true: refuse any plan without secure_aggregation
                             #   enabled (the site's updates never reach an aggregator in clear)
    runner_settings: {}      # this site's runner settings (where its data lives), merged over
                             #   each plan's runner.settings (foedus.plans.site_settings)
    review: auto             # or manual: the site operator runs `envoy approve ID` first
    shard: {description: "", train_samples: 0, valid_samples: 0, labels: {}}
    connection: {deadline_seconds: 30, backoff_initial_seconds: 1, backoff_max_seconds: 60}
    site_api: {enabled: false, host: 127.0.0.1, port: 8780}   # the site's HTTP API
                             #   (foedus.envoy.site_api); its bearer token is
                             #   STATE_DIR/site_api.token, made if missing
    metrics: {redis_url: ""} # e.g. redis://localhost:6379/0: each collaborator's state and
                             #   metrics in Redis (foedus.envoy.redis_metrics); "" sends nothing
    collaborator_log_level: info   # --log-level of the collaborators it starts: debug, info,
                             #   warning or error (debug: a failure's traceback in its log)
    share_with_director:     # what of the collaborators' text leaves the site
                             #   (foedus.envoy.disclosure)
      logs: foedus           #   none | foedus (foedus's own log lines) | all: log lines sent
      errors: category       #   category | line: a failure's reason names a fixed category, or
                             #   also quotes the log's last line
      paths: false           #   true: site paths may leave; false: each becomes <site path>
    share_with_aggregator:   # what of its collaborators' results the aggregator gets
      metrics: true          #   false: they keep their metrics at the site (collaborator start
                             #   --keep-metrics); a plan without secure_aggregation is refused
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from foedus.command.process import LOG_LEVELS
from foedus.pki.layout import CertsLayout
from foedus.plans.loader import read_config
from foedus.plans.reader import Section
from foedus.protos.channel import host_port

REDIS_URL = re.compile(r"^rediss?://[^\s]+$")
SHARED_LOGS = ("none", "foedus", "all")  # share_with_director.logs
SHARED_ERRORS = ("category", "line")  # share_with_director.errors


class ConfigError(ValueError):
    """envoy.yaml cannot be used; `problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Shard:
    """`shard`: what this site holds, as its operator describes it (informative only)."""

    description: str = ""  # shard.description
    train_samples: int = 0  # shard.train_samples
    valid_samples: int = 0  # shard.valid_samples
    labels: Mapping[str, str] = field(default_factory=dict)  # shard.labels: text to text


@dataclass(frozen=True)
class Connection:
    """`connection`: how the envoy calls the director and waits while it is away."""

    deadline_seconds: float = 30.0  # connection.deadline_seconds: per call
    backoff_initial_seconds: float = 1.0  # connection.backoff_initial_seconds
    backoff_max_seconds: float = 60.0  # connection.backoff_max_seconds: the cap


@dataclass(frozen=True)
class SiteApi:
    """`site_api`: the site's HTTP API, off unless the site turns it on."""

    enabled: bool = False  # site_api.enabled
    host: str = "127.0.0.1"  # site_api.host: the address to bind (loopback only by default)
    port: int = 8780  # site_api.port


@dataclass(frozen=True)
class Metrics:
    """`metrics`: where the envoy reports its collaborators' progress."""

    redis_url: str = ""  # metrics.redis_url: redis://[:password@]host:port/db, "" for none


@dataclass(frozen=True)
class ShareWithDirector:
    """`share_with_director`: what of its collaborators' text the site lets the director have."""

    logs: str = "foedus"  # share_with_director.logs: one of SHARED_LOGS
    errors: str = "category"  # share_with_director.errors: one of SHARED_ERRORS
    paths: bool = False  # share_with_director.paths: site paths may leave as they are


@dataclass(frozen=True)
class ShareWithAggregator:
    """`share_with_aggregator`: what of its collaborators' results the site lets the aggregator have."""

    metrics: bool = True  # share_with_aggregator.metrics: false starts them with --keep-metrics


@dataclass(frozen=True)
class EnvoyConfig:
    """A whole envoy.yaml; `path` is the file it came from."""

    path: Path
    director_host: str  # director.host: the name in the director's certificate
    director_port: int  # director.port
    certs: CertsLayout  # certs_dir
    state_dir: Path  # state_dir
    runners: tuple[str, ...]  # runners
    runner_settings: Mapping[str, object]  # runner_settings
    manual_review: bool  # review: manual
    shard: Shard
    connection: Connection
    site_api: SiteApi = SiteApi()
    metrics: Metrics = Metrics()
    collaborator_log_level: str = "info"  # collaborator_log_level: its collaborators' --log-level
    share_with_director: ShareWithDirector = ShareWithDirector()
    share_with_aggregator: ShareWithAggregator = ShareWithAggregator()
    # require_secure_aggregation: refuse a plan whose secure_aggregation is not enabled
    require_secure_aggregation: bool = False

    @property
    def director_target(self) -> str:
        """host:port for gRPC."""
        return host_port(self.director_host, self.director_port)


def load_config(path: str | Path) -> EnvoyConfig:
    """Read and check envoy.yaml at `path`; raise `ConfigError` listing every problem."""
    return read_config(path, parse_config, ConfigError)


def parse_config(data: object, config_path: Path) -> EnvoyConfig:
    """Check an already-parsed envoy.yaml; paths in it are relative to `config_path`."""
    problems: list[str] = []
    root = Section(data, "", problems)
    base = config_path.resolve().parent
    director = root.section("director")
    host = director.text("host")
    port = director.integer("port", low=1, high=65535)
    director.finish()
    certs_dir = root.text("certs_dir")
    state_dir = root.text("state_dir")
    runners = root.runner_names("runners", ())
    require_secure = root.flag("require_secure_aggregation", False)
    settings = _runner_settings(root)
    manual = root.choice("review", "auto", ("auto", "manual")) == "manual"
    shard = _shard(root.section("shard"))
    connection = _connection(root.section("connection"))
    site_api = _site_api(root.section("site_api"))
    metrics = _metrics(root.section("metrics"))
    collaborator_log_level = root.choice("collaborator_log_level", "info", LOG_LEVELS)
    share = _share_with_director(root.section("share_with_director"))
    aggregator = _share_with_aggregator(root.section("share_with_aggregator"))
    root.finish()
    if problems:
        raise ConfigError([f"{config_path}: {problem}" for problem in problems])
    return EnvoyConfig(
        path=config_path,
        director_host=host,
        director_port=port,
        certs=CertsLayout((base / certs_dir).resolve()),
        state_dir=(base / state_dir).resolve(),
        runners=runners,
        runner_settings=settings,
        manual_review=manual,
        shard=shard,
        connection=connection,
        site_api=site_api,
        metrics=metrics,
        collaborator_log_level=collaborator_log_level,
        share_with_director=share,
        share_with_aggregator=aggregator,
        require_secure_aggregation=require_secure,
    )


def _runner_settings(section: Section) -> Mapping[str, object]:
    def check(value: object) -> Mapping[str, object] | None:
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, Mapping):
            return None
        if not all(isinstance(key, str) and key for key in value):
            return None
        return MappingProxyType(dict(value))

    empty: Mapping[str, object] = MappingProxyType({})
    return section.checked(
        "runner_settings", empty, check, "a mapping of runner setting names to values"
    )


def _labels(section: Section) -> Mapping[str, str]:
    def check(value: object) -> Mapping[str, str] | None:
        if not isinstance(value, Mapping):
            return None
        pairs = value.items()
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in pairs):
            return None
        return MappingProxyType(dict(value))

    empty: Mapping[str, str] = MappingProxyType({})
    return section.checked("labels", empty, check, "a mapping of text to text")


def _shard(section: Section) -> Shard:
    shard = Shard(
        description=section.checked(
            "description", "", lambda v: v if isinstance(v, str) else None, "text"
        ),
        train_samples=section.integer("train_samples", 0, low=0, high=2**63 - 1),
        valid_samples=section.integer("valid_samples", 0, low=0, high=2**63 - 1),
        labels=_labels(section),
    )
    section.finish()
    return shard


def _connection(section: Section) -> Connection:
    defaults = Connection()
    initial = section.number(
        "backoff_initial_seconds", defaults.backoff_initial_seconds, low=0.01, high=3600
    )
    connection = Connection(
        deadline_seconds=section.number(
            "deadline_seconds", defaults.deadline_seconds, low=0.1, high=3600
        ),
        backoff_initial_seconds=initial,
        backoff_max_seconds=section.number(
            "backoff_max_seconds", defaults.backoff_max_seconds, low=0.01, high=86400
        ),
    )
    if connection.backoff_max_seconds < connection.backoff_initial_seconds:
        section.problems.append(
            f"{section.key('backoff_max_seconds')}: must be at least backoff_initial_seconds "
            f"({connection.backoff_initial_seconds:g})"
        )
    section.finish()
    return connection


def _site_api(section: Section) -> SiteApi:
    defaults = SiteApi()
    site_api = SiteApi(
        enabled=section.flag("enabled", defaults.enabled),
        host=section.text("host", defaults.host),
        port=section.integer("port", defaults.port, low=1, high=65535),
    )
    section.finish()
    return site_api


def _metrics(section: Section) -> Metrics:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return None
        if value and not REDIS_URL.match(value):
            return None
        return value

    metrics = Metrics(
        redis_url=section.checked(
            "redis_url", "", check, 'a redis:// or rediss:// URL (or "" for none)'
        )
    )
    section.finish()
    return metrics


def _share_with_director(section: Section) -> ShareWithDirector:
    defaults = ShareWithDirector()
    share = ShareWithDirector(
        logs=section.choice("logs", defaults.logs, SHARED_LOGS),
        errors=section.choice("errors", defaults.errors, SHARED_ERRORS),
        paths=section.flag("paths", defaults.paths),
    )
    section.finish()
    return share


def _share_with_aggregator(section: Section) -> ShareWithAggregator:
    defaults = ShareWithAggregator()
    share = ShareWithAggregator(metrics=section.flag("metrics", defaults.metrics))
    section.finish()
    return share
