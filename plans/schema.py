"""The federation plan: frozen, typed settings that both the aggregator and collaborators read.

A plan is loaded once (`plans.load_plan`) and then only read. Every field has a key path in the
YAML file, written beside it, so a person can find what an error message names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from foedus.compression.codes import Code
from foedus.pki.layout import CertsLayout
from foedus.protos.channel import host_port

MIB = 1024 * 1024

# The tasks of a round, named as OpenFL names them; `train` is the one that changes the model.
AGGREGATED_MODEL_VALIDATION = "aggregated_model_validation"
TRAIN = "train"
LOCALLY_TUNED_MODEL_VALIDATION = "locally_tuned_model_validation"
KNOWN_TASKS = (AGGREGATED_MODEL_VALIDATION, TRAIN, LOCALLY_TUNED_MODEL_VALIDATION)


@dataclass(frozen=True)
class FederationSettings:
    """`federation`: who this federation is and how long it runs."""

    name: str  # federation.name
    uuid: str  # federation.uuid, sent in every message header
    aggregator_id: str  # federation.aggregator_id (default: "aggregator_" + uuid, as OpenFL)
    rounds: int  # federation.rounds


@dataclass(frozen=True)
class Address:
    """A host and a TCP port to listen on; an IPv6 host without brackets."""

    host: str
    port: int

    def with_port(self, port: int) -> str:
        """`host:port` with `port` (the one bound, when the plan said 0), IPv6 in brackets."""
        return host_port(self.host, port)

    def __str__(self) -> str:
        return self.with_port(self.port)


@dataclass(frozen=True)
class AggregatorSettings:
    """`aggregator`: where the aggregator is reached and where it listens."""

    host: str  # aggregator.host: the name collaborators dial, and the CN of its certificate
    port: int  # aggregator.port (0 = any free port, for tests)
    listen_address: str  # aggregator.listen_address: 0.0.0.0, [::], 127.0.0.1, ...
    san_dns: tuple[str, ...]  # aggregator.san_dns: DNS names in its certificate
    san_ips: tuple[str, ...]  # aggregator.san_ips: IP addresses in its certificate
    grace_seconds: float  # aggregator.grace_seconds: in-flight calls get this long on stop
    output_dir: Path  # aggregator.output_dir: last and best model, metrics (relative to the plan)
    initial_model: Path | None  # aggregator.initial_model: a model file; None = the runner's
    long_poll_seconds: float  # aggregator.long_poll_seconds: GetTasks waits this long for work
    quit_grace_seconds: float  # aggregator.quit_grace_seconds: wait for quit to reach everyone
    # aggregator.metrics_address: where Prometheus metrics are served over HTTP, "host:port" or
    # a port alone (then 127.0.0.1); None (the default): no metrics server.
    metrics_address: Address | None = None
    # aggregator.common_name: the CN its certificate must have, checked by collaborators in the
    # TLS session (pki.binding); default: aggregator.host
    common_name: str = ""
    # aggregator.fingerprint: SHA-256 of its certificate (64 hex digits, lower-case), pinned by
    # collaborators on a handshake of their own before each connection; None: not pinned
    fingerprint: str | None = None


class StragglerPolicy(Enum):
    """When a round closes without every collaborator."""

    WAIT_FOR_ALL = "wait_for_all"  # only when every collaborator has reported
    CUTOFF = "cutoff"  # after cutoff_seconds, once at least min_reports have reported
    PERCENTAGE = "percentage"  # once `percentage` of the collaborators have reported


@dataclass(frozen=True)
class StragglerSettings:
    """`straggler`: how long a round waits for slow or dead collaborators."""

    policy: StragglerPolicy = StragglerPolicy.WAIT_FOR_ALL  # straggler.policy
    cutoff_seconds: float = 60.0  # straggler.cutoff_seconds (policy cutoff)
    min_reports: int = 1  # straggler.min_reports (policies cutoff and percentage)
    percentage: float = 1.0  # straggler.percentage, 0-1 (policy percentage)
    # straggler.offline_after_seconds: a collaborator silent this long is offline, and a round
    # closes once every collaborator still online has reported (any policy); None: off.
    offline_after_seconds: float | None = None


@dataclass(frozen=True)
class BestModelSettings:
    """`best_model`: the aggregated metric that decides which round's model is the best."""

    task: str = AGGREGATED_MODEL_VALIDATION  # best_model.task
    metric: str = "accuracy"  # best_model.metric
    maximize: bool = True  # best_model.mode: max or min


@dataclass(frozen=True)
class RunnerSettings:
    """`runner`: the task runner plug-in and its own settings, which the runner checks."""

    name: str  # runner.name: a built-in name ("digits") or "package.module:Class"
    seed: int  # runner.seed: the same on every party, so the initial model is the same
    settings: Mapping[str, object]  # runner.settings: passed to the runner as they are
    # The site's own settings file merged over runner.settings (plans.site_settings), if any,
    # and the keys it set: a runner's error then names the file a bad key came from.
    site_file: Path | None = None
    site_keys: frozenset[str] = frozenset()

    def key_path(self, key: str) -> str:
        """Where `key` of `settings` was set, for an error message: the plan or the site file."""
        if self.site_file is not None and key in self.site_keys:
            return f"{self.site_file}: {key}"
        return f"runner.settings.{key}"


@dataclass(frozen=True)
class TLSSettings:
    """`tls`: the certificate folder (see `foedus.pki.layout`), or an explicit insecure switch."""

    certs: CertsLayout | None  # tls.certs_dir, relative to the plan file; None when insecure
    insecure: bool  # tls.insecure: plaintext, only for experiments on one machine

    @property
    def enabled(self) -> bool:
        """Whether the federation talks over mutual TLS."""
        return self.certs is not None


@dataclass(frozen=True)
class Limits:
    """`limits`: sizes the aggregator accepts, applied as gRPC options on both sides."""

    max_message_bytes: int = 128 * MIB  # limits.max_message_bytes: one gRPC message
    max_upload_bytes: int = 1024 * MIB  # limits.max_upload_bytes: one SendLocalTaskResults stream
    max_tensor_bytes: int = 1024 * MIB  # limits.max_tensor_bytes: one decoded tensor
    max_data_size: int = 1_000_000_000  # limits.max_data_size: samples a result may claim
    allow_non_finite: bool = False  # limits.allow_non_finite: accept NaN/Inf in updates
    upload_seconds: float = 600.0  # limits.upload_seconds: one upload stream must end by then
    max_calls_per_collaborator: int = 8  # limits.max_calls_per_collaborator: at once
    # limits.stream_window_bytes: the HTTP/2 window the aggregator gives each stream; None: gRPC
    # sizes it from the bandwidth-delay product it measures (see protos.channel.server_options).
    stream_window_bytes: int | None = None


@dataclass(frozen=True)
class ConnectionSettings:
    """`connection`: how a collaborator's client calls the aggregator and retries."""

    deadline_seconds: float = 60.0  # connection.deadline_seconds: per call
    max_retries: int | None = 10  # connection.max_retries: null = unbounded
    max_wait_seconds: float | None = 300.0  # connection.max_wait_seconds: null = unbounded
    backoff_initial_seconds: float = 0.5  # connection.backoff_initial_seconds
    backoff_max_seconds: float = 30.0  # connection.backoff_max_seconds
    atomic_connections: bool = False  # connection.atomic_connections: a channel per call
    resend_on_reconnect: bool = True  # connection.resend_on_reconnect
    # connection.heartbeat_seconds: while a task runs, a foedus collaborator tells the
    # aggregator it is alive this often (see straggler.offline_after_seconds).
    heartbeat_seconds: float = 10.0


RING_BITS = (16, 32, 64)  # secure_aggregation.bits: the rings a masked update may live in
MIN_VALUE_BITS = 8  # the loader refuses a ring that leaves fewer bits than this to each value


def largest_signed(bits: int) -> int:
    """2^(bits-1) - 1: the largest value a ring of `bits` bits holds read as signed."""
    return (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class SecureAggregationSettings:
    """`secure_aggregation`: the aggregator learns the sum of the sites' updates, never one of them.

    Read `foedus.secure` for the protocol; the loader refuses a section that cannot work.
    """

    enabled: bool = False  # secure_aggregation.enabled
    # secure_aggregation.threshold: how many sites' shares rebuild a dropped site's secrets (and
    # how many must survive a round); None in the file: a majority of the collaborators (or of
    # each site's neighbours, with `neighbours`).
    threshold: int = 1
    # secure_aggregation.clip: each value of an update's delta is cut to +-clip (with
    # differential privacy, by default the bound of a noised value: `share_bound`)
    clip: float = 1.0
    bits: int = 32  # secure_aggregation.bits: the ring of the masked values (16, 32 or 64)
    # secure_aggregation.max_weight: the largest sample count an update is weighted by (a site
    # with more weighs this much); with the collaborators' number it sizes the fixed point.
    # With differential privacy, 1: every site weighs the same (the loader sees to it).
    max_weight: int = 65536
    # secure_aggregation.neighbours: SecAgg+, each site masks with this many peers (a random
    # regular graph the round's number draws) instead of all of them; None: all of them.
    neighbours: int | None = None

    def quorum(self, sites: int) -> int:
        """How many survivors of `sites` collaborators must sign one survivor list before any
        site reveals a share: the threshold, and more than half of them (`RoundContext.quorum`).
        So no sum the aggregator unmasks holds fewer sites than this."""
        return max(self.threshold, sites // 2 + 1)

    def ring_problem(self, sites: int) -> str | None:
        """Why the ring cannot hold the sum of `sites` collaborators' values (one line), or None.

        The ring must leave at least 8 bits to each value: 2^(bits-1) - 1 >= 256 * sites *
        max_weight (`foedus.secure.ring.FixedPoint` divides it among the sites).
        """
        if self.bits not in RING_BITS:
            return f"bits must be one of {', '.join(map(str, RING_BITS))}, not {self.bits}"
        need = (1 << MIN_VALUE_BITS) * sites * self.max_weight
        if largest_signed(self.bits) >= need:
            return None
        enough = [bits for bits in RING_BITS if largest_signed(bits) >= need]
        largest_weight = largest_signed(self.bits) // ((1 << MIN_VALUE_BITS) * sites)
        fixes = [f"bits {enough[0]}"] if enough else []
        if largest_weight >= 1:
            fixes.append(f"max_weight at most {largest_weight}")
        fix = " or ".join(fixes) if fixes else "fewer collaborators"
        return (
            f"a ring of {self.bits} bits is too small for {sites} collaborators with max_weight "
            f"{self.max_weight}: it leaves fewer than {MIN_VALUE_BITS} bits per value "
            f"(2^{self.bits - 1} - 1 < {1 << MIN_VALUE_BITS} x {sites} x {self.max_weight}); "
            f"use {fix}"
        )


DEFAULT_DP_DELTA = 1e-5  # differential_privacy.delta when the plan leaves it out
# The largest |z| `foedus.privacy.noise` ever draws: Box-Muller on 53-bit uniforms,
# sqrt(-2 ln 2^-53) = sqrt(106 ln 2) = 8.57. A site's noise share is bounded by it, so the
# ring of a secure federation can hold every noised value (`share_bound`).
LARGEST_NORMAL = math.sqrt(106 * math.log(2))


@dataclass(frozen=True)
class AdaptiveClippingSettings:
    """`differential_privacy.adaptive_clipping`: the clip follows a quantile of the sites'
    update norms (Andrew et al. 2021), starting at `differential_privacy.clip`.

    Each round the aggregator counts the sites whose update was within the clip, adds Gaussian
    noise of std `count_noise` to that count, and moves the clip geometrically toward the
    `target_quantile` (`foedus.privacy.adaptive`). The count's noise takes its share of the
    round's privacy: the update's noise multiplier rises to `update_noise_multiplier`.
    """

    # differential_privacy.adaptive_clipping.target_quantile: the share of the sites' updates
    # the clip should hold unclipped, 0 < q < 1
    target_quantile: float = 0.5
    # differential_privacy.adaptive_clipping.learning_rate: how far the clip moves in a round
    # (it is multiplied by exp(-learning_rate x (unclipped share - target_quantile)))
    learning_rate: float = 0.2
    # differential_privacy.adaptive_clipping.count_noise: the std of the Gaussian noise on the
    # count of unclipped sites (default: collaborators / 20, as TFF's clipped_count_stddev)
    count_noise: float = 1.0

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """The noise multiplier of the update's noise when the whole round's is
        `noise_multiplier`: (z^-2 - (2 count_noise)^-2)^(-1/2), the count's noise (sensitivity
        1/2 on the centred count) taking the rest; infinite when 2 x count_noise <= z."""
        rest = noise_multiplier**-2 - (2 * self.count_noise) ** -2
        return rest**-0.5 if rest > 0 else math.inf


@dataclass(frozen=True)
class DifferentialPrivacySettings:
    """`differential_privacy`: site-level DP-FedAvg, each site's update clipped and the sum noised.

    Read `foedus.privacy` for the clipping, the noise and the accountant; the loader refuses a
    section that gives no privacy (a noise multiplier of zero, a delta of 1) or cannot work.
    With secure aggregation the sites add the noise in shares (`share_std`, `share_bound`).
    """

    enabled: bool = False  # differential_privacy.enabled
    # differential_privacy.clip: the L2 norm each site's update delta (trained - global) is
    # clipped to, all its tensors together (required when enabled)
    clip: float = 1.0
    # differential_privacy.noise_multiplier: the Gaussian noise added to the sum of the clipped
    # deltas has std noise_multiplier x clip (required when enabled)
    noise_multiplier: float = 1.0
    delta: float = DEFAULT_DP_DELTA  # differential_privacy.delta: 0 < delta < 1
    # differential_privacy.max_epsilon: the federation trains no round past this epsilon (at
    # `delta`); None: no cap, the epsilon spent is still reported
    max_epsilon: float | None = None
    # differential_privacy.adaptive_clipping: the clip adapts to the sites' update norms (None:
    # `clip` is fixed)
    adaptive_clipping: AdaptiveClippingSettings | None = None

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise added to each value of the sum of clipped deltas."""
        return self.noise_multiplier * self.clip

    def share_std(self, quorum: int) -> float:
        """The std of one site's noise share under secure aggregation: noise_std / sqrt(quorum),
        so that any sum of `quorum` or more sites' shares has at least `noise_std`."""
        if quorum < 1:
            raise ValueError(f"a quorum is 1 or more, not {quorum}")
        return self.noise_std / math.sqrt(quorum)

    def share_bound(self, quorum: int) -> float:
        """The largest magnitude one value of a site's clipped delta plus its noise share can
        have: clip (an L2 norm bounds each value) + LARGEST_NORMAL x share_std, a hair above
        (float64's rounding of the site's sum): the `secure_aggregation.clip` that cuts nothing."""
        return (self.clip + LARGEST_NORMAL * self.share_std(quorum)) * (1 + 2**-40)


@dataclass(frozen=True)
class CodeSettings:
    """`compression.upload` or `compression.download`: a code's name, or a mapping with `code`
    and, for `topk` only, its own settings (`foedus.compression.codes`)."""

    code: Code = Code.NONE  # compression.<direction>.code (or the direction's value, a name)
    # compression.<direction>.fraction: topk's share of an update's values kept, 0 < f <= 0.5
    # (required with topk); None for the other codes
    fraction: float | None = None
    # compression.<direction>.values: how topk's kept values travel, float32 or int8
    values: str = "float32"


@dataclass(frozen=True)
class CompressionSettings:
    """`compression`: how the sites' updates (`upload`) and the global model (`download`) are
    coded on the wire; `none` both ways by default. The loader refuses a code that cannot work
    with the plan's protections (`foedus.plans.protections.secure_compression`)."""

    upload: CodeSettings = field(default_factory=CodeSettings)  # compression.upload
    download: CodeSettings = field(default_factory=CodeSettings)  # compression.download


@dataclass(frozen=True)
class Plan:
    """A whole federation plan; `path` is the file it came from."""

    path: Path
    federation: FederationSettings
    aggregator: AggregatorSettings
    tls: TLSSettings
    collaborators: tuple[str, ...]  # collaborators: the authorised collaborator names
    tasks: tuple[str, ...]  # tasks: the tasks of every round, in order
    runner: RunnerSettings
    straggler: StragglerSettings = field(default_factory=StragglerSettings)
    best_model: BestModelSettings | None = None  # None: the plan names no metric, no best model
    limits: Limits = field(default_factory=Limits)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    secure_aggregation: SecureAggregationSettings = field(default_factory=SecureAggregationSettings)
    differential_privacy: DifferentialPrivacySettings = field(
        default_factory=DifferentialPrivacySettings
    )
    compression: CompressionSettings = field(default_factory=CompressionSettings)
