"""Load a plan file: safe YAML without aliases, check every key, report every problem at once.

Each problem is one line `FILE: key.path: what is wrong`, so a person can fix them all in one go.
Unknown keys are errors (a typo must not silently fall back to a default). The text is read and each
mapping checked by `foedus.plans.reader`, the one strict YAML reader; the services' own YAML files
(director.yaml, envoy.yaml) are read by `read_config`, as strictly as a plan.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from foedus.pki.errors import PkiError
from foedus.pki.layout import CertsLayout
from foedus.pki.requests import normalise_fingerprint, validate_host
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
    LARGEST_NORMAL,
    RING_BITS,
    TRAIN,
    AdaptiveClippingSettings,
    AggregatorSettings,
    BestModelSettings,
    ConnectionSettings,
    DifferentialPrivacySettings,
    FederationSettings,
    Limits,
    Plan,
    RunnerSettings,
    SecureAggregationSettings,
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


def _site_caps(settings: object) -> list[str]:
    """A site's privacy cap set in the plan (`runner.settings.max_epsilon`, or inside its
    `dp_sgd`): refused, each site decides its own."""
    if not isinstance(settings, Mapping):
        return []
    found = ["runner.settings.max_epsilon"] if "max_epsilon" in settings else []
    dp_sgd = settings.get("dp_sgd")
    if isinstance(dp_sgd, Mapping) and "max_epsilon" in dp_sgd:
        found.append("runner.settings.dp_sgd.max_epsilon")
    return [
        f"{key}: a site's privacy cap belongs to the site's settings (collaborator start "
        "--site-settings, an envoy's runner_settings), never the plan: each site decides its own"
        for key in found
    ]


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
    privacy = _differential_privacy(root.section("differential_privacy"), known)
    secure = _secure_aggregation(root.section("secure_aggregation"), known, privacy)
    problems.extend(_site_caps(runner.settings))
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


def _secure_aggregation(
    section: Section, collaborators: int, privacy: DifferentialPrivacySettings
) -> SecureAggregationSettings:
    """`secure_aggregation`, each key checked; what needs the collaborators only when it is on.

    A plan that leaves it off is not refused for a ring or a threshold it never uses (a
    federation of 500 sites would not fit the default ring without `neighbours`). That it needs
    TLS is checked where the plan runs (`aggregator start`): a director checks a submitted plan
    with placeholder `tls`, and gives the aggregator its own. With `privacy` on too, each site
    weighs 1 and the ring holds its noised update (`_noised_ring`).
    """
    defaults = SecureAggregationSettings()
    problems = len(section.problems)
    enabled = section.flag("enabled", defaults.enabled)
    threshold = section.optional_integer("threshold", None, low=1, high=1_000_000)
    bits = section.checked("bits", defaults.bits, _ring_bits, f"one of {_listed(RING_BITS)}")
    clip = section.checked("clip", defaults.clip, _positive_finite, "a finite number > 0")
    max_weight = section.integer("max_weight", defaults.max_weight, low=1, high=2**31 - 1)
    neighbours = section.optional_integer("neighbours", None, low=2, high=1_000_000)
    section.finish()
    if neighbours is not None and neighbours % 2:
        section.problems.append(
            f"{section.key('neighbours')}: {neighbours} is odd; each site is joined to half "
            "of them on each side of the round's circle of sites, so it must be even"
        )
    if enabled and collaborators:
        _check_secure_federation(section, collaborators, threshold, neighbours)
    if threshold is None:
        threshold = _majority(collaborators, neighbours)
    settings = SecureAggregationSettings(
        enabled=enabled,
        threshold=threshold,
        clip=clip,
        bits=bits,
        max_weight=max_weight,
        neighbours=neighbours,
    )
    if enabled and privacy.enabled and privacy.adaptive_clipping is not None:
        section.problems.append(
            f"{section.key('enabled')}: differential_privacy.adaptive_clipping is not yet "
            "possible with secure aggregation: the sites' clipped-or-not bits would need a "
            "secure sum too; turn one of them off"
        )
    if enabled and privacy.enabled:
        settings = _noised_ring(section, settings, privacy, collaborators)
    if (
        enabled and collaborators and len(section.problems) == problems
    ):  # else: defaults, misleading
        problem = settings.ring_problem(collaborators)
        if problem is not None:
            section.problems.append(f"{section.key('bits')}: {problem}")
    return settings


def _noised_ring(
    section: Section,
    settings: SecureAggregationSettings,
    privacy: DifferentialPrivacySettings,
    collaborators: int,
) -> SecureAggregationSettings:
    """A secure federation's ring under differential privacy, where each site adds its noise
    share before it masks (`foedus.privacy.shares`): every site weighs 1 (`max_weight` 1, as
    DP-FedAvg weighs them), and `clip` holds a clipped delta plus a noise share whole
    (`DifferentialPrivacySettings.share_bound`): left out, it is that bound; below it, refused,
    since the ring would cut the noise."""
    max_weight, clip = 1, settings.clip
    if "max_weight" in section.data and settings.max_weight != 1:
        section.problems.append(
            f"{section.key('max_weight')}: {settings.max_weight} with "
            "differential_privacy.enabled: every site weighs 1 under differential privacy (a "
            "weight by sample count would let one site move the model by more than "
            "differential_privacy.clip); leave it out"
        )
    quorum = settings.quorum(collaborators)
    bound = privacy.share_bound(quorum)
    if not math.isfinite(bound):
        section.problems.append(
            f"{section.key('enabled')}: differential_privacy.noise_multiplier x clip is past "
            "float64's range: no ring holds such noise; lower them"
        )
    elif "clip" not in section.data:
        clip = bound
    elif settings.clip < bound:
        section.problems.append(
            f"{section.key('clip')}: {settings.clip:g} would cut the sites' noise: with "
            f"differential_privacy.enabled a value of a site's update is at most "
            f"differential_privacy.clip ({privacy.clip:g}) plus {LARGEST_NORMAL:.2f} x its noise "
            f"share's std ({privacy.share_std(quorum):.4g}, for the quorum of {quorum} sites): "
            f"leave it out (it is then that bound) or make it at least "
            f"{math.ceil(bound * 1000) / 1000:g}"
        )
    return dataclasses.replace(settings, clip=clip, max_weight=max_weight)


def _differential_privacy(section: Section, collaborators: int) -> DifferentialPrivacySettings:
    """`differential_privacy`, each key checked; `clip` and `noise_multiplier` required when on.

    Refused: settings that give no privacy (no noise, a delta of 1 or more). With secure
    aggregation on too, the sites add the noise in shares (`_noised_ring` sizes the ring for
    it). Whether the cap allows a first round needs the accountant:
    `foedus.privacy.budget_problem`, where the plan runs. `collaborators` (0: unknown) gives
    `adaptive_clipping.count_noise` its default.
    """
    defaults = DifferentialPrivacySettings()
    problems = len(section.problems)
    enabled = section.flag("enabled", defaults.enabled)
    clip = section.checked(
        "clip",
        defaults.clip,
        _positive_finite,
        "a finite number > 0 (the L2 norm each site's update delta is clipped to)",
    )
    noise_multiplier = section.checked(
        "noise_multiplier",
        defaults.noise_multiplier,
        _positive_finite,
        "a finite number > 0 (the noise's std is noise_multiplier x clip: without noise, no "
        "privacy)",
    )
    delta = section.checked(
        "delta",
        defaults.delta,
        _probability,
        "a number between 0 and 1, both excluded (the chance the guarantee fails: keep it well "
        "below 1 / the number of sites)",
    )
    max_epsilon = defaults.max_epsilon
    if section.data.get("max_epsilon") is None:
        section.seen.add("max_epsilon")
    else:
        max_epsilon = section.checked(
            "max_epsilon",
            defaults.max_epsilon,
            _positive_finite,
            "a finite number > 0, or null for no cap",
        )
    adaptive = None
    if section.data.get("adaptive_clipping") is None:
        section.seen.add("adaptive_clipping")
    else:
        adaptive = _adaptive_clipping(section.section("adaptive_clipping"), collaborators)
    section.finish()
    if (
        enabled
        and adaptive is not None
        and len(section.problems) == problems  # else: defaults, misleading
        and not adaptive.update_noise_multiplier(noise_multiplier) < math.inf
    ):
        section.problems.append(
            f"{section.key('adaptive_clipping')}.count_noise: {adaptive.count_noise:g} leaves "
            f"the update no noise: the round's noise_multiplier ({noise_multiplier:g}) is "
            "shared between the update and the count of unclipped sites, whose own noise "
            "multiplier (2 x count_noise) must be above it; make count_noise more than "
            f"{noise_multiplier / 2:g}"
        )
    if enabled:
        for key in ("clip", "noise_multiplier"):
            if key not in section.data:
                section.problems.append(
                    f"{section.key(key)}: required when {section.key('enabled')} is true: the "
                    "privacy a federation gives is chosen, never a default"
                )
    return DifferentialPrivacySettings(
        enabled=enabled,
        clip=clip,
        noise_multiplier=noise_multiplier,
        delta=delta,
        max_epsilon=max_epsilon,
        adaptive_clipping=adaptive,
    )


def _adaptive_clipping(section: Section, collaborators: int) -> AdaptiveClippingSettings:
    """`differential_privacy.adaptive_clipping`, each key checked; `count_noise` defaults to
    collaborators / 20 (TFF's clipped_count_stddev)."""
    defaults = AdaptiveClippingSettings()
    quantile = section.checked(
        "target_quantile",
        defaults.target_quantile,
        _probability,
        "a number between 0 and 1, both excluded (the share of the sites' updates the clip "
        "should leave unclipped)",
    )
    learning_rate = section.checked(
        "learning_rate",
        defaults.learning_rate,
        _positive_finite,
        "a finite number > 0 (how far the clip moves in a round)",
    )
    count_noise = section.checked(
        "count_noise",
        collaborators / 20 if collaborators else defaults.count_noise,
        _positive_finite,
        "a finite number > 0 (the std of the noise on the count of unclipped sites: without "
        "noise, the count gives the sites' norms away)",
    )
    section.finish()
    return AdaptiveClippingSettings(
        target_quantile=quantile, learning_rate=learning_rate, count_noise=count_noise
    )


def _check_secure_federation(
    section: Section, collaborators: int, threshold: int | None, neighbours: int | None
) -> None:
    """The threshold and the neighbours against the number of collaborators."""
    if collaborators < 2:
        section.problems.append(
            f"{section.key('enabled')}: needs at least 2 collaborators; the sum of one site's "
            "update is that update"
        )
        return
    if neighbours is not None and neighbours >= collaborators:
        section.problems.append(
            f"{section.key('neighbours')}: {neighbours} is not fewer than the {collaborators} "
            "collaborators; leave it out to mask with every other site"
        )
        return
    if threshold is None:
        return
    if threshold > collaborators:
        section.problems.append(
            f"{section.key('threshold')}: {threshold} is more than the {collaborators} "
            "collaborators, so no round could ever be unmasked"
        )
    elif neighbours is not None and threshold > neighbours + 1:
        section.problems.append(
            f"{section.key('threshold')}: {threshold} is more than a site's {neighbours} "
            f"neighbours and itself ({neighbours + 1}), who alone hold its shares"
        )


def _majority(collaborators: int, neighbours: int | None) -> int:
    """The default threshold: a majority of those who hold a site's shares (it and its peers)."""
    holders = collaborators if neighbours is None else neighbours + 1
    return holders // 2 + 1


def _ring_bits(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value in RING_BITS
    return value if ok else None  # type: ignore[return-value]


def _positive_finite(value: object) -> float | None:
    number = _float(value)
    return number if number is not None and math.isfinite(number) and number > 0 else None


def _probability(value: object) -> float | None:
    number = _float(value)
    return number if number is not None and 0 < number < 1 else None


def _float(value: object) -> float | None:
    """A YAML number as a float; None for anything else, or an integer past float's range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer of 400 digits
        return None


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(str(value) for value in values)
