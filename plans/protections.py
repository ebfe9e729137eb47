"""The plan's privacy protections: `secure_aggregation` and `differential_privacy`, the site
caps a plan may not set, and the compression codes secure aggregation (or, downloads,
differential privacy) rules out.

The two sections are read together, as they meet: with both on, every site weighs 1 and the
ring's clip holds a clipped delta plus the site's noise share (`_noised_ring`); adaptive clipping
is refused beside secure aggregation. `foedus.plans.loader` calls `differential_privacy`, then
`secure_aggregation` with its result, `site_caps` on the runner's settings, and
`secure_compression` and `lossy_download` on the `compression` section; each problem is one line
naming its key, as every section's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from foedus.compression.codes import Code
from foedus.plans.reader import Section
from foedus.plans.schema import (
    LARGEST_NORMAL,
    RING_BITS,
    AdaptiveClippingSettings,
    CompressionSettings,
    DifferentialPrivacySettings,
    SecureAggregationSettings,
)


def site_caps(settings: object) -> list[str]:
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


def secure_compression(
    compression: CompressionSettings, secure: SecureAggregationSettings
) -> list[str]:
    """An upload code under secure aggregation: refused, every one but `none`. The download is
    the unmasked model, which `lossless` may carry (a lossy code not yet: `lossy_download`);
    with differential privacy every upload code is allowed (the site clips, then encodes; the
    aggregator clips the decoded update again)."""
    upload = compression.upload.code
    if not secure.enabled or upload is Code.NONE:
        return []
    return [
        f"compression.upload: {upload} with secure_aggregation.enabled: masked values are "
        "uniform in the ring and do not compress, and a lossy code would break the masks; leave "
        "it none (secure_aggregation.bits is secure aggregation's own quantize-then-mask: 16 "
        "bits halves the upload)"
    ]


def lossy_download(
    compression: CompressionSettings,
    privacy: DifferentialPrivacySettings,
    secure: SecureAggregationSettings,
) -> list[str]:
    """A lossy download code beside differential privacy or secure aggregation: refused, not
    yet (the sites train on the decoded model, while the aggregator clips and unmasks against
    the global model)."""
    download = compression.download.code
    beside = [
        key
        for key, enabled in (
            ("differential_privacy.enabled", privacy.enabled),
            ("secure_aggregation.enabled", secure.enabled),
        )
        if enabled
    ]
    if not download.lossy or not beside:
        return []
    return [
        f"compression.download: {download} with {' and '.join(beside)} is not possible yet: "
        "their clipping and masks are computed against the global model, and the sites would "
        "train on the decoded one; choose lossless or none"
    ]


def secure_aggregation(
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


def differential_privacy(section: Section, collaborators: int) -> DifferentialPrivacySettings:
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
