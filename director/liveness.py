"""The liveness rule, as plain functions of what the state says: which sites an experiment lost,
and whether it can go on without them.

A site is lost to an experiment when its envoy has been offline for longer than
`offline_grace_seconds` (offline once its last heartbeat is older than two health periods), or
when its envoy reports its collaborator refused, rejected by the site or given up (`LOST`). The
experiment goes on without its lost sites while at least `min_sites` of its sites (all of them
by default) are not lost and none of `mandatory_sites` is; otherwise it fails, its reason naming
each lost site and why. The plan its aggregator gets stops waiting for a silent site by then
(`foedus.director.experiment_plan`).
"""

from __future__ import annotations

from collections.abc import Mapping

from foedus.director.records import Envoy, Experiment, SiteReport
from foedus.lifecycle.states import CollaboratorState
from foedus.plans.director_config import SiteLossPolicy

OFFLINE = "offline"  # why a site is lost when its envoy has been offline past the grace
# A site whose collaborator is in one of these has ended for good: lost to the experiment.
LOST = {
    CollaboratorState.REFUSED: "refused",
    CollaboratorState.SITE_REJECTED: "rejected by its operator",
    CollaboratorState.GAVE_UP: "gave up",
}


def lost_sites(
    experiment: Experiment,
    reports: Mapping[str, SiteReport],
    envoys: Mapping[str, Envoy],
    *,
    liveness: SiteLossPolicy,
    health_check_seconds: float,
    now: float,
) -> dict[str, str]:
    """The experiment's lost sites, each with why: offline past the grace (`OFFLINE`), or
    ended for good (what its envoy said)."""
    horizon = 2 * health_check_seconds + liveness.offline_grace_seconds
    lost: dict[str, str] = {}
    for site in experiment.sites:
        report = reports.get(site)
        if report is not None and report.state in LOST:
            lost[site] = f"{LOST[report.state]}: {report.reason or 'no reason given'}"
        # A site never seen counts from the experiment's start: it had the grace to come.
        elif (
            now - max(envoys[site].last_seen if site in envoys else 0, experiment.started_at)
            > horizon
        ):
            lost[site] = OFFLINE
    return lost


def judge(experiment: Experiment, lost: Mapping[str, str], liveness: SiteLossPolicy) -> str | None:
    """The liveness policy on the lost sites: the reason to fail the experiment, or None."""
    if not lost:
        return None
    needed = liveness.min_sites or len(experiment.sites)
    mandatory = sorted(set(lost) & set(liveness.mandatory_sites))
    left = len(experiment.sites) - len(lost)
    if not mandatory and left >= needed:
        return None
    offline = sorted(site for site, why in lost.items() if why == OFFLINE)
    parts = (
        [f"sites offline for more than {liveness.offline_grace_seconds:g} s: {', '.join(offline)}"]
        if offline
        else []
    )
    parts += [f"site {site} {why}" for site, why in sorted(lost.items()) if site not in offline]
    return (
        "; ".join(parts)
        + (f" (mandatory: {', '.join(mandatory)})" if mandatory else "")
        + f"; {left} of {len(experiment.sites)} left, {needed} needed"
    )


def said(why: str, grace: float) -> str:
    """Why a site is lost, in words: `OFFLINE` with the grace it had, else what its envoy said."""
    return f"offline for more than {grace:g} s" if why == OFFLINE else why
