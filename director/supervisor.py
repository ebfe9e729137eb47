"""The supervisor: runs each experiment's aggregator and moves the experiment along its lifecycle.

`Supervisor.supervise` is one step, which the server runs on a timer (`run`): it starts queued
experiments in the queue's order (`DirectorState.queue`), up to `max_running_experiments` and
at most `max_running_per_user` of one owner (each gets a port, a plan written by
`foedus.director.experiment_plan` and an aggregator from the `Launcher`), moves them along their
lifecycle as their sites report and their aggregators end, fails them when their sites are gone
(`foedus.director.liveness`), and starts again an aggregator that died without deciding its end
(at most `MAX_RESTARTS` times in a row: the count, kept in the state's `aggregator_restarts`
table so that it survives a director restart, starts again once more rounds are completed than
at the last restart). After each step it signals the state's `changes` when what followed
streams show changed outside the state (`foedus.director.changes`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping

from foedus.director.experiment_plan import plan_liveness, write_director_plan
from foedus.director.folders import ExperimentFolders
from foedus.director.launcher import Launcher
from foedus.director.liveness import judge, lost_sites, said
from foedus.director.records import ACTIVE, Experiment, ExperimentState, SiteReport
from foedus.director.state import DirectorState
from foedus.lifecycle.states import CollaboratorState
from foedus.plans.director_config import DirectorConfig, SiteLossPolicy
from foedus.processes.children import Ended
from foedus.refusals.errors import InvalidRequestError, StorageError

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3  # an aggregator killed (or lost) this many times in a row fails its experiment
STARTED = frozenset(
    {CollaboratorState.STARTED, CollaboratorState.RUNNING, CollaboratorState.EXITED}
)


class Supervisor:
    """The experiments' aggregators and lifecycle; see the module's docstring."""

    def __init__(
        self,
        config: DirectorConfig,
        state: DirectorState,
        launcher: Launcher,
        folders: ExperimentFolders,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Supervise `state`'s experiments by `config`'s rules, with `launcher` and `folders`."""
        self.config = config
        self.state = state
        self.launcher = launcher
        self.folders = folders
        self._clock = clock
        self._supervising = threading.Lock()
        self._going_on_without: set[tuple[str, str]] = set()  # (experiment, site) logged once
        self._liveness_policies: dict[str, SiteLossPolicy] = {}
        self._observed: Hashable = None

    def recover(self) -> None:
        """At start: adopt running aggregators, start again the ones that died, stop leftovers."""
        with self._supervising:
            known = set()
            for experiment in self.state.experiments():
                known.add(experiment.experiment_id)
                folder = self.folders.folder(experiment.experiment_id)
                pid = experiment.aggregator_pid
                if experiment.state in ACTIVE:
                    if pid is not None and self.launcher.adopt(
                        experiment.experiment_id, folder, pid
                    ):
                        continue
                    ended = self.launcher.poll(experiment.experiment_id, folder)
                    self._aggregator_ended(experiment, ended or Ended(None))
                elif pid is not None:  # ended while its aggregator ran: make sure it is stopped
                    if self.launcher.adopt(experiment.experiment_id, folder, pid):
                        self.launcher.stop(experiment.experiment_id, folder)
                    self.state.set_aggregator(experiment.experiment_id, None)
            self.folders.delete_unknown(known)

    def supervise(self) -> None:
        """One step: end, advance, fail and start experiments as their state calls for."""
        with self._supervising:
            for experiment in self.state.active():
                self._check_active(experiment)
            for experiment in self.state.startable(
                self.config.max_running_experiments, self.config.max_running_per_user
            ):
                self._launch(experiment)

    def run(self, stop: threading.Event, period: float = 0.25) -> None:
        """Supervise every `period` seconds until `stop` is set; a failing step is logged, not fatal."""
        while not stop.is_set():
            try:
                self.supervise()
                self.observe()
            except Exception:
                logger.exception("supervising experiments failed; trying again")
            stop.wait(period)
        self.state.changes.wake()  # followed streams see the server stopping

    def observe(self) -> None:
        """Signal `changes` if what followers show changed outside the state since last time:
        an active experiment's files (its aggregator writes them), an envoy's being online."""
        observed = (
            tuple(
                (experiment.experiment_id, self.folders.watched(experiment.experiment_id))
                for experiment in self.state.active()
            ),
            tuple((envoy.name, envoy.online) for envoy in self.state.envoys()),
        )
        if observed != self._observed:
            self._observed = observed
            self.state.changes.signal()

    def cancel(self, experiment_id: str, by: str) -> Experiment:
        """Cancel an experiment that has not ended, and stop its aggregator now."""
        with self._supervising:
            experiment = self.state.transition(
                experiment_id, ExperimentState.CANCELLED, f"cancelled by {by}"
            )
            self._stop_aggregator(experiment)
        return experiment

    def _check_active(self, experiment: Experiment) -> None:
        experiment_id = experiment.experiment_id
        ended = self.launcher.poll(experiment_id, self.folders.folder(experiment_id))
        if ended is not None:
            self._aggregator_ended(experiment, ended)
            return
        reports = self.state.reports(experiment_id)
        lost = self._lost_sites(experiment, reports)
        failure = judge(experiment, lost, self._liveness(experiment))
        if failure is not None:
            self._fail(experiment, failure)
            return
        grace = self._liveness(experiment).offline_grace_seconds
        for site, why in lost.items():
            if (experiment_id, site) not in self._going_on_without:
                self._going_on_without.add((experiment_id, site))
                logger.warning(
                    "experiment %s goes on without site %s: %s",
                    experiment_id,
                    site,
                    said(why, grace),
                )
        if experiment.state is ExperimentState.WAITING and all(
            site in lost or (site in reports and reports[site].state in STARTED)
            for site in experiment.sites
        ):
            self.state.transition(experiment_id, ExperimentState.RUNNING)
            logger.info("experiment %s running: every site not lost started", experiment_id)

    def _liveness(self, experiment: Experiment) -> SiteLossPolicy:
        """The experiment's liveness policy: its plan's `liveness` over director.yaml's (cached)."""
        key = experiment.experiment_id
        if key not in self._liveness_policies:
            self._liveness_policies[key] = plan_liveness(experiment.plan_yaml, self.config.liveness)
        return self._liveness_policies[key]

    def _lost_sites(
        self, experiment: Experiment, reports: Mapping[str, SiteReport]
    ) -> dict[str, str]:
        """`foedus.director.liveness.lost_sites` of the experiment now."""
        return lost_sites(
            experiment,
            reports,
            {envoy.name: envoy for envoy in self.state.envoys()},
            liveness=self._liveness(experiment),
            health_check_seconds=self.config.health_check_seconds,
            now=self._clock(),
        )

    def _aggregator_ended(self, experiment: Experiment, ended: Ended) -> None:
        experiment_id = experiment.experiment_id
        self.state.set_aggregator(experiment_id, None)
        # `aggregator start` also exits 0 when stopped by a signal: done only when every round is.
        rounds = self.folders.rounds_completed(experiment_id)
        if ended.code == 0 and rounds >= experiment.rounds:
            if experiment.state is ExperimentState.WAITING:
                self.state.transition(experiment_id, ExperimentState.RUNNING)
            self.state.transition(experiment_id, ExperimentState.COMPLETED)
            logger.info("experiment %s completed", experiment_id)
        elif ended.code is not None and ended.code > 0:
            self._fail(experiment, self._aggregator_failure(experiment, ended))
        else:  # stopped, killed or lost: it resumes from its own state
            restarts = self.state.count_restart(experiment_id, rounds)
            if restarts > MAX_RESTARTS:
                self._fail(experiment, f"{ended.describe()}, {restarts} times in a row")
                return
            logger.warning("experiment %s: %s; starting it again", experiment_id, ended.describe())
            self._start_aggregator(experiment)

    def _aggregator_failure(self, experiment: Experiment, ended: Ended) -> str:
        """Why an aggregator that failed did: its end, its log's last line (say, every site has
        left), and the sites the experiment lost, each with why."""
        experiment_id = experiment.experiment_id
        last = self.folders.log_last_line(experiment_id)
        reason = ended.describe() + (f"; its log ends: {last.strip()}" if last is not None else "")
        reason += f" (its log: experiment logs {experiment_id})"
        lost = self._lost_sites(experiment, self.state.reports(experiment_id))
        grace = self._liveness(experiment).offline_grace_seconds
        sites = [f"site {site} {said(why, grace)}" for site, why in sorted(lost.items())]
        return "; ".join([reason, *sites])

    def _launch(self, experiment: Experiment) -> None:
        """Take a place for a queued experiment: a port, its plan, its aggregator."""
        experiment = self.state.begin(experiment.experiment_id, self.config.aggregator_ports)
        logger.info(
            "experiment %s starting on port %s for sites %s",
            experiment.experiment_id,
            experiment.port,
            ", ".join(experiment.sites),
        )
        self._start_aggregator(experiment)

    def _start_aggregator(self, experiment: Experiment) -> None:
        experiment_id = experiment.experiment_id
        folder = self.folders.folder(experiment_id)
        if experiment.port is None:  # never for an active experiment; the state sets it
            self._fail(experiment, "no aggregator port was assigned")
            return
        try:
            plan_path, plan = write_director_plan(
                experiment.plan_yaml,
                experiment_id=experiment_id,
                port=experiment.port,
                config=self.config,
                folder=folder,
                initial_model=(
                    self.folders.initial_model(experiment_id)
                    if experiment.has_initial_model
                    else None
                ),
            )
            if not experiment.has_initial_model and plan.runner.name not in self.config.runners:
                # Accepted when director.yaml allowed it; its aggregator would import it now.
                self._fail(
                    experiment,
                    f"runner.name: {plan.runner.name!r} is no longer in director.yaml runners "
                    f"({', '.join(self.config.runners) or 'none'}), and the experiment has no "
                    "initial model; submit it again with --initial-model FILE",
                )
                return
            pid = self.launcher.start(experiment_id, plan_path, folder)
        except (StorageError, InvalidRequestError, OSError) as error:
            self._fail(experiment, f"cannot start the aggregator: {error}")
            return
        self.state.set_aggregator(experiment_id, pid)

    def _fail(self, experiment: Experiment, reason: str) -> None:
        logger.warning("experiment %s failed: %s", experiment.experiment_id, reason)
        self.state.transition(experiment.experiment_id, ExperimentState.FAILED, reason)
        self._stop_aggregator(experiment)

    def _stop_aggregator(self, experiment: Experiment) -> None:
        folder = self.folders.folder(experiment.experiment_id)
        self.launcher.stop(experiment.experiment_id, folder)
        self.state.set_aggregator(experiment.experiment_id, None)
