"""director.yaml: who may do what, where the director listens and keeps its state, its limits.

Read as strictly as a plan (with `foedus.plans.reader`): unknown keys are errors, and every
problem is one line `FILE: key.path: what is wrong`, all reported at once. Beside the plan, below
the director and `pki setup --director`, which both read it. Paths are relative to
the file. An example, every key shown with its default (the four without one are required):

    listen: {address: 0.0.0.0, port: 50050}
    host: localhost              # required: the name envoys and people dial, and aggregators'
    certs_dir: certs             # required: a `pki` folder; the director serves with its
                                 #   aggregator certificate (CN = host), as its aggregators do
    state_dir: state             # required: SQLite state, experiments' plans, models and logs
    aggregator: {listen_address: 0.0.0.0, ports: [50100, 50199]}
    envoys: [alice, bob, carol]  # required: site names (certificate CNs) allowed to register
    runners: [digits]            # runners this host imports (built-in names or package.module:
                                 #   Class installed here) to check a plan's runner.settings at
                                 #   submit and make its initial model; [] imports none. A plan
                                 #   naming another runner must bring its initial model
    users: []                    # certificate CNs of people who submit experiments
    admins: []                   # people who see and act on every experiment, and review
    review: auto                 # or manual: an admin approves each experiment
    health_check_seconds: 10     # envoys heartbeat this often; offline after twice as long
    max_running_experiments: 2   # experiments running at once; the others wait in the queue
    max_running_per_user: null   # experiments one owner runs at once; null (or absent): a fair
                                 #   share, ceil(max_running_experiments / people in users and
                                 #   admins), at least 1. Never above max_running_experiments
                                 #   (refused). Queue order: see director.state.queue
    limits: {max_plan_bytes: 1048576, max_model_bytes: 4294967296, chunk_bytes: 1048576,
             max_calls_per_identity: 8,     # one certificate name's calls at once (an envoy's
                                            #   heartbeats and registrations counted apart)
             max_people_calls: 64,          # all users' and admins' calls at once, together
             idle_stream_seconds: 30}       # a stream sent to the director that sends nothing
                                            #   this long is ended (DEADLINE_EXCEEDED)
    liveness: {min_sites: null, mandatory_sites: [], offline_grace_seconds: 300}
    dashboard: {address: null}   # the web dashboard over HTTPS: "host:port" or a port alone
                                 #   (on 127.0.0.1); null: off (see foedus.director.dashboard)
    metrics_address: null        # Prometheus metrics over HTTP, "host:port" or a port alone
                                 #   (on 127.0.0.1); null: off (see foedus.director.metrics)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from foedus.pki.layout import CertsLayout
from foedus.plans.loader import read_config
from foedus.plans.reader import Section, read_listen_address
from foedus.plans.runners import BUILTIN_RUNNERS
from foedus.plans.schema import Address

MIB = 1024 * 1024


class ConfigError(ValueError):
    """director.yaml cannot be used; `problems` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class DirectorLimits:
    """`limits`: the sizes the director accepts, and how much of it one caller may hold."""

    max_plan_bytes: int = MIB  # limits.max_plan_bytes: one submitted plan's YAML text
    max_model_bytes: int = 4096 * MIB  # limits.max_model_bytes: one submitted initial model
    chunk_bytes: int = MIB  # limits.chunk_bytes: the pieces models and logs are streamed in
    # limits.max_calls_per_identity: one certificate name's calls in progress at once; an envoy's
    # heartbeats, registrations and reports have as many again of their own
    max_calls_per_identity: int = 8
    max_people_calls: int = 64  # limits.max_people_calls: all users' and admins' calls at once
    idle_stream_seconds: float = 30.0  # limits.idle_stream_seconds: a silent client stream ends


@dataclass(frozen=True)
class SiteLossPolicy:
    """`liveness`: when an experiment fails because its sites are away (a plan may set its own)."""

    min_sites: int | None = None  # liveness.min_sites: None = every site of the experiment
    mandatory_sites: tuple[str, ...] = ()  # liveness.mandatory_sites
    offline_grace_seconds: float = 300.0  # liveness.offline_grace_seconds


@dataclass(frozen=True)
class DirectorConfig:
    """A whole director.yaml; `path` is the file it came from."""

    path: Path
    listen_address: str  # listen.address
    port: int  # listen.port (0: any free port, for tests)
    host: str  # host: the name envoys, people and collaborators dial
    certs: CertsLayout  # certs_dir
    state_dir: Path  # state_dir
    aggregator_listen_address: str  # aggregator.listen_address
    aggregator_ports: range  # aggregator.ports: [first, last], both included
    envoys: tuple[str, ...]  # envoys
    runners: tuple[str, ...]  # runners: the only runners the director's host imports
    users: tuple[str, ...]  # users
    admins: tuple[str, ...]  # admins
    manual_review: bool  # review: manual
    health_check_seconds: float  # health_check_seconds
    max_running_experiments: int  # max_running_experiments
    max_running_per_user: int  # max_running_per_user, the fair share when absent (fair_share)
    limits: DirectorLimits
    liveness: SiteLossPolicy
    dashboard_address: Address | None = None  # dashboard.address: None = no dashboard
    metrics_address: Address | None = None  # metrics_address: None = no metrics endpoint


def load_config(path: str | Path) -> DirectorConfig:
    """Read and check director.yaml at `path`; raise `ConfigError` listing every problem."""
    return read_config(path, parse_config, ConfigError)


def parse_config(data: object, config_path: Path) -> DirectorConfig:
    """Check an already-parsed director.yaml; paths in it are relative to `config_path`."""
    problems: list[str] = []
    root = Section(data, "", problems)
    base = config_path.resolve().parent
    listen = root.section("listen")
    listen_address = listen.text("address", "0.0.0.0")
    port = listen.integer("port", 50050, low=0, high=65535)
    listen.finish()
    host = root.text("host")
    certs_dir = root.text("certs_dir")
    state_dir = root.text("state_dir")
    aggregator = root.section("aggregator")
    aggregator_listen = aggregator.text("listen_address", "0.0.0.0")
    ports = _port_range(aggregator)
    aggregator.finish()
    envoys = root.names("envoys")
    runners = root.runner_names("runners", tuple(BUILTIN_RUNNERS), empty=True)
    users = root.names("users", ())
    admins = root.names("admins", ())
    manual = root.choice("review", "auto", ("auto", "manual")) == "manual"
    health = root.number("health_check_seconds", 10.0, low=0.05, high=86400)
    most = root.integer("max_running_experiments", 2, low=1, high=10_000)
    per_user = root.optional_integer("max_running_per_user", None, low=1, high=10_000)
    limits = _limits(root.section("limits"))
    liveness = read_liveness(root.section("liveness"))
    dashboard = root.section("dashboard")
    dashboard_address = read_listen_address(dashboard, "address")
    dashboard.finish()
    metrics_address = read_listen_address(root, "metrics_address")
    root.finish()
    _cross_check(
        problems,
        port=port,
        ports=ports,
        envoys=envoys,
        users=users,
        admins=admins,
        liveness=liveness,
    )
    most_is_bad = any(problem.startswith("max_running_experiments:") for problem in problems)
    if per_user is not None and per_user > most and not most_is_bad:
        # Refused, not clamped: a limit that can never apply is a mistake the operator should see.
        problems.append(
            f"max_running_per_user: {per_user} is above max_running_experiments {most}; "
            f"one owner can never run more than all of them (at most {most}, or leave it out "
            "for the fair share)"
        )
    if problems:
        raise ConfigError([f"{config_path}: {problem}" for problem in problems])
    return DirectorConfig(
        path=config_path,
        listen_address=listen_address,
        port=port,
        host=host,
        certs=CertsLayout((base / certs_dir).resolve()),
        state_dir=(base / state_dir).resolve(),
        aggregator_listen_address=aggregator_listen,
        aggregator_ports=ports,
        envoys=envoys,
        runners=runners,
        users=users,
        admins=admins,
        manual_review=manual,
        health_check_seconds=health,
        max_running_experiments=most,
        max_running_per_user=fair_share(most, users, admins) if per_user is None else per_user,
        limits=limits,
        liveness=liveness,
        dashboard_address=dashboard_address,
        metrics_address=metrics_address,
    )


def fair_share(max_running: int, users: tuple[str, ...], admins: tuple[str, ...]) -> int:
    """The default per-owner limit: the running places shared evenly by the people, rounded up.

    At least 1 and at most `max_running` (ceil of a positive share); with no people listed no one
    can submit, and it is `max_running`.
    """
    people = len(set(users) | set(admins))
    return math.ceil(max_running / max(1, people))


def _port_range(section: Section) -> range:
    def check(value: object) -> range | None:
        if not isinstance(value, list) or len(value) != 2:
            return None
        first, last = value
        numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not numbers or not 1 <= first <= last <= 65535:
            return None
        return range(first, last + 1)

    return section.checked(
        "ports", range(50100, 50200), check, "[first, last]: two ports 1-65535, first <= last"
    )


def _limits(section: Section) -> DirectorLimits:
    defaults = DirectorLimits()
    limits = DirectorLimits(
        max_plan_bytes=section.integer(
            "max_plan_bytes", defaults.max_plan_bytes, low=1024, high=64 * MIB
        ),
        max_model_bytes=section.integer(
            "max_model_bytes", defaults.max_model_bytes, low=1024, high=2**40
        ),
        chunk_bytes=section.integer("chunk_bytes", defaults.chunk_bytes, low=1024, high=64 * MIB),
        max_calls_per_identity=section.integer(
            "max_calls_per_identity", defaults.max_calls_per_identity, low=1, high=1000
        ),
        max_people_calls=section.integer(
            "max_people_calls", defaults.max_people_calls, low=1, high=10_000
        ),
        idle_stream_seconds=section.number(
            "idle_stream_seconds", defaults.idle_stream_seconds, low=0.05, high=86400
        ),
    )
    section.finish()
    return limits


def read_liveness(section: Section, defaults: SiteLossPolicy = SiteLossPolicy()) -> SiteLossPolicy:
    """A `liveness` section; each key it leaves out keeps its value in `defaults`."""
    liveness = SiteLossPolicy(
        min_sites=section.optional_integer("min_sites", defaults.min_sites, low=1, high=100_000),
        mandatory_sites=section.names("mandatory_sites", defaults.mandatory_sites),
        offline_grace_seconds=section.number(
            "offline_grace_seconds", defaults.offline_grace_seconds, low=0, high=30 * 86400
        ),
    )
    section.finish()
    return liveness


def _cross_check(
    problems: list[str],
    *,
    port: int,
    ports: range,
    envoys: tuple[str, ...],
    users: tuple[str, ...],
    admins: tuple[str, ...],
    liveness: SiteLossPolicy,
) -> None:
    """What no single key shows: overlapping roles, ports, mandatory sites that cannot register."""
    if not all(isinstance(names, tuple) for names in (envoys, users, admins)):
        return  # already reported
    people = set(users) | set(admins)
    both = sorted(set(envoys) & people)
    if both:
        problems.append(
            f"envoys: {', '.join(both)} also listed as users or admins; a certificate name has "
            "one role"
        )
    if port in ports:
        problems.append(
            f"listen.port: {port} is in aggregator.ports {ports.start}-{ports.stop - 1}"
        )
    unknown = sorted(set(liveness.mandatory_sites) - set(envoys))
    if unknown:
        problems.append(f"liveness.mandatory_sites: {', '.join(unknown)} not in envoys")
