"""The people's desk: what the director does for each user's and admin's call.

Submit, list, describe, watch, review, cancel and remove experiments; read their metrics, logs and
models; list the envoys. A user acts on their own experiments only, an admin on all (`_visible`). A
followed read (watch, metrics or logs with follow) is a generator that waits for the director's next
change between reads (`foedus.director.changes`), and ends with its experiment or its `Follow`.
Nothing here imports gRPC: `foedus.director.servicer` and `foedus.director.dashboard` convert.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from foedus.director.changes import Follow
from foedus.director.experiment_plan import check_submitted, plan_protections
from foedus.director.folders import (
    ExperimentFolders,
    ModelDownload,
    ModelUpload,
    training_rounds_in,
)
from foedus.director.identity import PEOPLE, Caller, Role
from foedus.director.records import Envoy, Experiment, ExperimentState
from foedus.director.site_logs import LogRendezvous
from foedus.director.state import DirectorState
from foedus.director.supervisor import Supervisor
from foedus.lifecycle.states import CollaboratorState
from foedus.plans.director_config import DirectorConfig
from foedus.plans.schema import DifferentialPrivacySettings
from foedus.privacy.accountant import epsilon_after
from foedus.privacy.site_budget import SiteBudget, latest_budgets
from foedus.refusals.errors import (
    AuthorizationError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteView:
    """One site of an experiment, as people see it."""

    site: str
    state: CollaboratorState | None  # None: no report yet
    exit_code: int
    reason: str
    online: bool
    # Its own DP-SGD budget as it last reported it, and that round (from 1); None: none.
    budget: SiteBudget | None = None
    budget_round: int = 0


@dataclass(frozen=True)
class PrivacyBudget:
    """A DP experiment's settings (its plan's `differential_privacy`) and what it has spent."""

    settings: DifferentialPrivacySettings
    epsilon: float  # the accountant's, after the training rounds completed, at settings.delta


@dataclass(frozen=True)
class ExperimentView:
    """An experiment with what is known of its progress."""

    experiment: Experiment
    sites: tuple[SiteView, ...]
    rounds_completed: int
    queue_position: int
    has_best_model: bool
    has_last_model: bool
    secure: bool = False  # its plan aggregates securely (secure_aggregation.enabled)
    privacy: PrivacyBudget | None = None  # its plan's differential privacy; None: off


class PeopleDesk:
    """Every call of a person (user or admin) to the director."""

    def __init__(
        self,
        config: DirectorConfig,
        state: DirectorState,
        folders: ExperimentFolders,
        site_logs: LogRendezvous,
        supervisor: Supervisor,
    ) -> None:
        """Serve people from `state` by `config`'s rules; cancelling goes through `supervisor`."""
        self.config = config
        self.state = state
        self.folders = folders
        self.site_logs = site_logs
        self.supervisor = supervisor

    def submit(
        self, caller: Caller, plan_text: str, name: str, model: ModelUpload | None
    ) -> ExperimentView:
        """Check and store a new experiment; approved at once when review is automatic."""
        caller.require("SubmitExperiment", *PEOPLE)
        registered = {envoy.name for envoy in self.state.envoys()} & set(self.config.envoys)
        plan = check_submitted(
            plan_text,
            registered=registered,
            max_bytes=self.config.limits.max_plan_bytes,
            runners=self.config.runners,
            initial_model=model is not None,
        )
        experiment_id = str(uuid.uuid4())
        self.folders.make(experiment_id)
        try:
            if model is not None:
                self.folders.receive_model(experiment_id, model, self.config.limits.max_model_bytes)
            experiment = self.state.add_experiment(
                owner=caller.name,
                name=name or plan.name,
                plan_yaml=plan.text,
                sites=plan.sites,
                rounds=plan.rounds,
                has_initial_model=model is not None,
                experiment_id=experiment_id,
            )
        except BaseException:
            self.folders.delete(experiment_id)
            raise
        logger.info(
            "experiment %s (%s) submitted by %s for sites %s",
            experiment_id,
            experiment.name,
            caller.name,
            ", ".join(plan.sites),
        )
        if not self.config.manual_review:
            experiment = self.state.transition(experiment_id, ExperimentState.APPROVED, "")
        return self.view(experiment)

    def experiments(self, caller: Caller) -> list[ExperimentView]:
        """The caller's experiments (an admin's: all), in submission order."""
        caller.require("ListExperiments", *PEOPLE)
        owner = None if caller.is_admin else caller.name
        return [self.view(experiment) for experiment in self.state.experiments(owner)]

    def experiment(self, caller: Caller, experiment_id: str) -> ExperimentView:
        """One experiment the caller may see."""
        return self.view(self._visible(caller, "GetExperiment", experiment_id))

    def watch(self, caller: Caller, experiment_id: str, follow: Follow) -> Iterator[ExperimentView]:
        """The experiment now and after every change of the director's, until it ends."""
        while True:
            seen = self.state.changes.count
            view = self.experiment(caller, experiment_id)
            yield view
            if view.experiment.state.final or not self.state.changes.wait(seen, follow):
                return

    def cancel(self, caller: Caller, experiment_id: str) -> ExperimentView:
        """Stop an experiment that has not ended: its aggregator now, its collaborators by heartbeat."""
        experiment = self._visible(caller, "CancelExperiment", experiment_id)
        if experiment.state.final:
            raise PreconditionError(
                f"experiment {experiment_id!r} has already ended ({experiment.state.value}); "
                "there is nothing to cancel"
            )
        return self.view(self.supervisor.cancel(experiment_id, caller.name))

    def remove(self, caller: Caller, experiment_id: str) -> None:
        """Forget an experiment that has ended, and delete its files."""
        self._visible(caller, "RemoveExperiment", experiment_id)
        self.state.remove(experiment_id)
        self.folders.delete(experiment_id)
        logger.info("experiment %s removed by %s", experiment_id, caller.name)

    def review(
        self, caller: Caller, experiment_id: str, *, approve: bool, reason: str
    ) -> ExperimentView:
        """An admin's decision on a submitted experiment."""
        call = "ApproveExperiment" if approve else "RejectExperiment"
        caller.require(call, Role.ADMIN)
        self._visible(caller, call, experiment_id)
        target = ExperimentState.APPROVED if approve else ExperimentState.REJECTED
        decided = f"{target.value} by {caller.name}" + (f": {reason}" if reason else "")
        return self.view(self.state.transition(experiment_id, target, decided))

    def metric_rows(self, caller: Caller, experiment_id: str, from_row: int) -> list[str]:
        """The aggregator's metric rows (metrics.jsonl lines, as written) from `from_row`."""
        self._visible(caller, "GetMetricStream", experiment_id)
        return self.folders.metric_lines(experiment_id)[from_row:]

    def follow_metric_rows(
        self, caller: Caller, experiment_id: str, from_row: int, follow: Follow | None
    ) -> Iterator[tuple[int, str]]:
        """The metric rows from `from_row`, each with its index; with `follow`, until it ends."""
        index = from_row
        while True:
            seen = self.state.changes.count
            # The state first: rows written before it ended are all there when it reads final.
            final = self.experiment(caller, experiment_id).experiment.state.final
            for row in self.metric_rows(caller, experiment_id, index):
                yield index, row
                index += 1
            if follow is None or final or not self.state.changes.wait(seen, follow):
                return

    def aggregator_log(self, caller: Caller, experiment_id: str, offset: int) -> bytes:
        """Up to `limits.chunk_bytes` of the aggregator's log from `offset` (empty: none yet)."""
        self._visible(caller, "GetLogs", experiment_id)
        return self.folders.log_chunk(experiment_id, offset, self.config.limits.chunk_bytes)

    def site_log(
        self, caller: Caller, experiment_id: str, site: str, offset: int, *, timeout: float
    ) -> bytes:
        """Up to `limits.chunk_bytes` of a site's collaborator log, asked of its envoy."""
        experiment = self._visible(caller, "GetLogs", experiment_id)
        if site not in experiment.sites:
            raise NotFoundError(f"site {site!r} is not one of experiment {experiment_id!r}'s sites")
        envoy = self.state.envoy(site)
        if envoy is None or not envoy.online:
            raise UnavailableError(f"the envoy of site {site!r} is offline; try again later")
        answer = self.site_logs.ask(
            site, experiment_id, offset, self.config.limits.chunk_bytes, timeout
        )
        if answer is None:
            raise UnavailableError(
                f"the envoy of site {site!r} did not send the log within {timeout:g} s"
            )
        found, data = answer
        if not found:
            raise NotFoundError(f"site {site!r} has no log of experiment {experiment_id!r}")
        return data

    def follow_log(
        self, caller: Caller, experiment_id: str, site: str, offset: int, follow: Follow | None
    ) -> Iterator[tuple[int, bytes]]:
        """The aggregator's log (`site` empty) or a site's from `offset`, in chunks, each with its
        offset; with `follow`, until the experiment ends.

        A site's envoy has a few heartbeats to answer each request; followed, a site's log is
        asked again at once, its envoy's next heartbeat being the wait (the director holds no
        change of a site's log to wait for).
        """
        timeout = max(5.0, 3 * self.config.health_check_seconds)
        while True:
            seen = self.state.changes.count
            final = self.experiment(caller, experiment_id).experiment.state.final
            while True:
                if site:
                    data = self.site_log(caller, experiment_id, site, offset, timeout=timeout)
                else:
                    data = self.aggregator_log(caller, experiment_id, offset)
                if not data:
                    break
                yield offset, data
                offset += len(data)
            if follow is None or final or follow.over():
                return
            if not site and not self.state.changes.wait(seen, follow):
                return

    def model(self, caller: Caller, experiment_id: str, kind: str) -> ModelDownload:
        """The experiment's best or last model, to send; `PreconditionError` if none yet."""
        experiment = self._visible(caller, "DownloadModel", experiment_id)
        if not self.folders.has_model(experiment_id, kind):
            raise PreconditionError(
                f"experiment {experiment_id!r} ({experiment.state.value}) has no {kind} model yet"
            )
        return self.folders.model(experiment_id, kind, self.config.limits.chunk_bytes)

    def envoys(self, caller: Caller) -> list[tuple[Envoy, tuple[str, ...]]]:
        """Every registered envoy with the ids of the active experiments naming it that the
        caller may see (a user: their own; an admin: all)."""
        caller.require("ListEnvoys", *PEOPLE)
        active = [e for e in self.state.active() if caller.sees(e.owner)]
        return [
            (envoy, tuple(e.experiment_id for e in active if envoy.name in e.sites))
            for envoy in self.state.envoys()
        ]

    def view(self, experiment: Experiment) -> ExperimentView:
        """An experiment with its sites, progress, queue place and models."""
        experiment_id = experiment.experiment_id
        reports = self.state.reports(experiment_id)
        envoys = {envoy.name: envoy for envoy in self.state.envoys()}
        rows = self.folders.metric_rows(experiment_id)
        budgets = latest_budgets(rows)
        sites = []
        for site in experiment.sites:
            report = reports.get(site)
            envoy = envoys.get(site)
            budget_round, budget = budgets.get(site, (0, None))
            sites.append(
                SiteView(
                    site=site,
                    state=report.state if report else None,
                    exit_code=report.exit_code if report else 0,
                    reason=report.reason if report else "",
                    online=envoy is not None and envoy.online,
                    budget=budget,
                    budget_round=budget_round,
                )
            )
        rounds_completed = training_rounds_in(rows)
        protections = plan_protections(experiment.plan_yaml)
        return ExperimentView(
            experiment=experiment,
            sites=tuple(sites),
            rounds_completed=rounds_completed,
            queue_position=(
                self.state.queue_position(experiment_id)
                if experiment.state is ExperimentState.APPROVED  # only they are queued
                else 0
            ),
            has_best_model=self.folders.has_model(experiment_id, "best"),
            has_last_model=self.folders.has_model(experiment_id, "last"),
            secure=protections.secure,
            privacy=_privacy_budget(protections.privacy, rounds_completed),
        )

    def _visible(self, caller: Caller, call: str, experiment_id: str) -> Experiment:
        """The experiment, if this person may act on it."""
        caller.require(call, *PEOPLE)
        experiment = self.state.experiment(experiment_id)
        if not caller.sees(experiment.owner):
            raise AuthorizationError(
                f"experiment {experiment_id!r} belongs to another user; {caller.name!r} may act "
                "only on their own"
            )
        return experiment


def _privacy_budget(
    settings: DifferentialPrivacySettings | None, rounds_completed: int
) -> PrivacyBudget | None:
    """A DP experiment's settings and the epsilon its completed training rounds spent (a pure
    function of the plan and the rounds, as the aggregator computes it); None: no DP."""
    if settings is None:
        return None
    epsilon = epsilon_after(rounds_completed, settings.noise_multiplier, settings.delta)
    return PrivacyBudget(settings, epsilon)
