"""The director's logic in plain Python: what each call does, and the supervisor that runs experiments.

`DirectorService` is driven by `director.servicer` (one method per RPC, the caller already
identified) and by its own `supervise` step, which the server calls on a timer: it starts queued
experiments in the queue's order (`DirectorState.queue`), up to `max_running_experiments` and
at most `max_running_per_user` of one owner (each gets a port, a plan written by
`director.experiment_plan` and an aggregator from the `Launcher`), moves them along their
lifecycle as their sites report and their aggregators end, fails them when their sites are gone
(the liveness rule below), and starts again an aggregator that died without deciding its end
(at most `MAX_RESTARTS` times in a row: the count, kept in the state, starts again once more
rounds are completed than at the last restart). Nothing here imports gRPC: tests drive it
without a socket.

Liveness: a site is lost to an experiment when its envoy has been offline for longer than
`offline_grace_seconds` (offline once its last heartbeat is older than two health periods), or
when its envoy reports its collaborator refused, rejected by the site or given up (`LOST`). The
experiment goes on without its lost sites while at least `min_sites` of its sites (all of them
by default) are not lost and none of `mandatory_sites` is; otherwise it fails, its reason naming
each lost site and why. The plan its aggregator gets stops waiting for a silent site by then
(`director.experiment_plan`).

Each experiment has a folder `<state_dir>/experiments/<id>/`: the plan the director wrote
(`plan.yaml`), the submitted initial model, the aggregator's log and exit status, and the
aggregator's `output/` (models, metrics.jsonl, its own durable state).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from director.errors import (
    AuthorizationError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    PreconditionError,
    StorageError,
    UnavailableError,
)
from director.experiment_plan import PLAN_FILE, check_submitted, plan_liveness, write_director_plan
from director.identity import PEOPLE, Caller, Role, Roster
from director.launcher import LOG_FILE, Launcher
from director.state import (
    ACTIVE,
    CollaboratorState,
    DirectorState,
    Envoy,
    Experiment,
    ExperimentState,
    ShardInfo,
    SiteReport,
)
from lifecycle.orders import LogOrder, StartOrder, Work
from plans.director_config import DirectorConfig, SiteLossPolicy
from processes.children import Ended, log_tail

logger = logging.getLogger(__name__)

EXPERIMENTS = "experiments"
INITIAL_MODEL = "initial_model.pbuf"
OUTPUT = "output"
METRICS = "metrics.jsonl"
MODELS = {"best": "best_model.pbuf", "last": "last_model.pbuf"}
LOG_TAIL_BYTES = 4096  # of an aggregator's log, read for its last line when it failed
MAX_RESTARTS = 3  # an aggregator killed (or lost) this many times in a row fails its experiment
STARTED = frozenset(
    {CollaboratorState.STARTED, CollaboratorState.RUNNING, CollaboratorState.EXITED}
)
OFFLINE = "offline"  # why a site is lost when its envoy has been offline past the grace
# A site whose collaborator is in one of these has ended for good: lost to the experiment.
LOST = {
    CollaboratorState.REFUSED: "refused",
    CollaboratorState.SITE_REJECTED: "rejected by its operator",
    CollaboratorState.GAVE_UP: "gave up",
}


@dataclass(frozen=True)
class CollaboratorReport:
    """An envoy's report on its collaborator for one experiment."""

    experiment_id: str
    state: CollaboratorState
    exit_code: int = 0
    reason: str = ""


@dataclass(frozen=True)
class SiteView:
    """One site of an experiment, as people see it."""

    site: str
    state: CollaboratorState | None  # None: no report yet
    exit_code: int
    reason: str
    online: bool


@dataclass(frozen=True)
class ExperimentView:
    """An experiment with what is known of its progress."""

    experiment: Experiment
    sites: tuple[SiteView, ...]
    rounds_completed: int
    queue_position: int
    has_best_model: bool
    has_last_model: bool


@dataclass(frozen=True)
class ModelUpload:
    """A submitted initial model: its declared size and its pieces, in order."""

    size: int
    pieces: Iterable[bytes]


@dataclass
class _LogExchange:
    """Log requests waiting for an envoy's heartbeat, and the envoys' answers."""

    condition: threading.Condition = field(default_factory=threading.Condition)
    orders: dict[str, list[LogOrder]] = field(default_factory=dict)  # by envoy
    owners: dict[str, str] = field(default_factory=dict)  # request id -> envoy
    answers: dict[str, tuple[bool, bytes]] = field(default_factory=dict)


class DirectorService:
    """Every call of the director, and its supervisor; see the module's docstring."""

    def __init__(
        self,
        config: DirectorConfig,
        state: DirectorState,
        launcher: Launcher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Serve `state` by `config`'s rules, running aggregators with `launcher`."""
        self.config = config
        self.state = state
        self.launcher = launcher
        self.roster = Roster.of(config)
        self._clock = clock
        self._root = config.state_dir / EXPERIMENTS
        self._supervising = threading.Lock()
        self._going_on_without: set[tuple[str, str]] = set()  # (experiment, site) logged once
        self._logs = _LogExchange()
        self._liveness_policies: dict[str, SiteLossPolicy] = {}

    def folder(self, experiment_id: str) -> Path:
        """Where an experiment's files are."""
        return self._root / experiment_id

    # -- envoys -------------------------------------------------------------------------------

    def register_envoy(self, caller: Caller, shard: ShardInfo, version: str) -> float:
        """Register the calling envoy; the heartbeat period it is to keep."""
        caller.require("RegisterEnvoy", Role.ENVOY)
        self.state.register(caller.name, shard, version)
        logger.info("envoy %s registered (%s)", caller.name, shard.description or "no description")
        return self.config.health_check_seconds

    def heartbeat(self, caller: Caller, reports: Iterable[CollaboratorReport]) -> Work | None:
        """Note the calling envoy alive with its collaborators' states; its work, or None: register."""
        caller.require("EnvoyHeartbeat", Role.ENVOY)
        if not self.state.heartbeat(caller.name):
            return None
        listed: set[str] = set()
        stop: list[str] = []
        for report in reports:
            listed.add(report.experiment_id)
            try:
                experiment = self.state.experiment(report.experiment_id)
            except NotFoundError:
                stop.append(report.experiment_id)
                continue
            if experiment.state.final:
                stop.append(report.experiment_id)
            elif caller.name in experiment.sites:
                self._keep_report(caller.name, report)
        start = []
        for experiment in self.state.active():
            if experiment.aggregator_pid is None:
                continue  # its plan is being written and its aggregator started: next time
            if caller.name in experiment.sites and experiment.experiment_id not in listed:
                if caller.name in self.state.reports(experiment.experiment_id):
                    continue  # it reported on it before: starting is the envoy's to repeat
                start.append(self._start_order(experiment, caller.name))
        with self._logs.condition:
            logs = tuple(self._logs.orders.pop(caller.name, []))
        return Work(start=tuple(start), stop=tuple(stop), logs=logs)

    def report(self, caller: Caller, report: CollaboratorReport) -> None:
        """Keep the calling envoy's report on one of its experiments."""
        caller.require("ReportCollaborator", Role.ENVOY)
        experiment = self.state.experiment(report.experiment_id)
        if caller.name not in experiment.sites:
            raise AuthorizationError(
                f"site {caller.name!r} is not one of experiment {report.experiment_id!r}'s sites"
            )
        self._keep_report(caller.name, report)

    def upload_log(
        self, caller: Caller, request_id: str, found: bool, pieces: Iterable[bytes]
    ) -> None:
        """Take the log an envoy sends for one of the director's requests to it."""
        caller.require("UploadLog", Role.ENVOY)
        with self._logs.condition:
            if self._logs.owners.get(request_id) != caller.name:
                raise NotFoundError(f"no log request {request_id!r} is waiting for {caller.name!r}")
        limit = self.config.limits.chunk_bytes
        data = bytearray()
        for piece in pieces:
            data += piece
            if len(data) > limit:
                raise LimitExceededError(f"the log upload is over the {limit} bytes asked for")
        with self._logs.condition:
            if request_id in self._logs.owners:
                self._logs.answers[request_id] = (found, bytes(data))
                self._logs.condition.notify_all()

    # -- people -------------------------------------------------------------------------------

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
        folder = self.folder(experiment_id)
        try:
            folder.mkdir(parents=True)
        except OSError as error:
            raise StorageError(f"{folder}: cannot make: {error.strerror}") from None
        try:
            if model is not None:
                self._receive_model(folder / INITIAL_MODEL, model)
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
            shutil.rmtree(folder, ignore_errors=True)
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

    def cancel(self, caller: Caller, experiment_id: str) -> ExperimentView:
        """Stop an experiment that has not ended: its aggregator now, its collaborators by heartbeat."""
        experiment = self._visible(caller, "CancelExperiment", experiment_id)
        if experiment.state.final:
            raise PreconditionError(
                f"experiment {experiment_id!r} has already ended ({experiment.state.value}); "
                "there is nothing to cancel"
            )
        with self._supervising:
            experiment = self.state.transition(
                experiment_id, ExperimentState.CANCELLED, f"cancelled by {caller.name}"
            )
            self._stop_aggregator(experiment)
        return self.view(experiment)

    def remove(self, caller: Caller, experiment_id: str) -> None:
        """Forget an experiment that has ended, and delete its files."""
        self._visible(caller, "RemoveExperiment", experiment_id)
        self.state.remove(experiment_id)
        shutil.rmtree(self.folder(experiment_id), ignore_errors=True)
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
        return self._metric_lines(experiment_id)[from_row:]

    def aggregator_log(self, caller: Caller, experiment_id: str, offset: int) -> bytes:
        """Up to `limits.chunk_bytes` of the aggregator's log from `offset` (empty: none yet)."""
        self._visible(caller, "GetLogs", experiment_id)
        path = self.folder(experiment_id) / LOG_FILE
        try:
            with path.open("rb") as file:
                if offset >= file.seek(0, 2):  # nothing there yet; a seek that far may fail
                    return b""
                file.seek(offset)
                return file.read(self.config.limits.chunk_bytes)
        except FileNotFoundError:
            return b""
        except OSError as error:
            raise StorageError(f"{path}: cannot read: {error.strerror}") from None

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
        request_id = str(uuid.uuid4())
        order = LogOrder(request_id, experiment_id, offset, self.config.limits.chunk_bytes)
        exchange = self._logs
        with exchange.condition:
            exchange.orders.setdefault(site, []).append(order)
            exchange.owners[request_id] = site
            try:
                exchange.condition.wait_for(lambda: request_id in exchange.answers, timeout)
                answer = exchange.answers.pop(request_id, None)
            finally:
                exchange.owners.pop(request_id, None)
                pending = exchange.orders.get(site, [])
                if order in pending:
                    pending.remove(order)
        if answer is None:
            raise UnavailableError(
                f"the envoy of site {site!r} did not send the log within {timeout:g} s"
            )
        found, data = answer
        if not found:
            raise NotFoundError(f"site {site!r} has no log of experiment {experiment_id!r}")
        return data

    def model_path(self, caller: Caller, experiment_id: str, kind: str) -> Path:
        """The experiment's best or last model file; `PreconditionError` if there is none yet."""
        experiment = self._visible(caller, "DownloadModel", experiment_id)
        path = self.folder(experiment_id) / OUTPUT / MODELS[kind]
        if not path.is_file():
            raise PreconditionError(
                f"experiment {experiment_id!r} ({experiment.state.value}) has no {kind} model yet"
            )
        return path

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
        reports = self.state.reports(experiment.experiment_id)
        envoys = {envoy.name: envoy for envoy in self.state.envoys()}
        sites = []
        for site in experiment.sites:
            report = reports.get(site)
            envoy = envoys.get(site)
            sites.append(
                SiteView(
                    site=site,
                    state=report.state if report else None,
                    exit_code=report.exit_code if report else 0,
                    reason=report.reason if report else "",
                    online=envoy is not None and envoy.online,
                )
            )
        output = self.folder(experiment.experiment_id) / OUTPUT
        return ExperimentView(
            experiment=experiment,
            sites=tuple(sites),
            rounds_completed=self._rounds_completed(experiment.experiment_id),
            queue_position=(
                self.state.queue_position(experiment.experiment_id)
                if experiment.state is ExperimentState.APPROVED  # only they are queued
                else 0
            ),
            has_best_model=(output / MODELS["best"]).is_file(),
            has_last_model=(output / MODELS["last"]).is_file(),
        )

    # -- supervision --------------------------------------------------------------------------

    def recover(self) -> None:
        """At start: adopt running aggregators, start again the ones that died, stop leftovers."""
        with self._supervising:
            known = set()
            for experiment in self.state.experiments():
                known.add(experiment.experiment_id)
                folder = self.folder(experiment.experiment_id)
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
            if self._root.is_dir():  # folders of experiments removed (or never stored) in a crash
                for folder in self._root.iterdir():
                    if folder.name not in known:
                        shutil.rmtree(folder, ignore_errors=True)

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
            except Exception:
                logger.exception("supervising experiments failed; trying again")
            stop.wait(period)

    def _check_active(self, experiment: Experiment) -> None:
        experiment_id = experiment.experiment_id
        ended = self.launcher.poll(experiment_id, self.folder(experiment_id))
        if ended is not None:
            self._aggregator_ended(experiment, ended)
            return
        reports = self.state.reports(experiment_id)
        lost = self._lost_sites(experiment, reports)
        failure = self._judge(experiment, lost)
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
                    _said(why, grace),
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
        """The experiment's lost sites, each with why: offline past the grace (`OFFLINE`), or
        ended for good (what its envoy said)."""
        liveness = self._liveness(experiment)
        now = self._clock()
        envoys = {envoy.name: envoy for envoy in self.state.envoys()}
        horizon = 2 * self.config.health_check_seconds + liveness.offline_grace_seconds
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

    def _judge(self, experiment: Experiment, lost: Mapping[str, str]) -> str | None:
        """The liveness policy on the lost sites: the reason to fail the experiment, or None."""
        if not lost:
            return None
        liveness = self._liveness(experiment)
        needed = liveness.min_sites or len(experiment.sites)
        mandatory = sorted(set(lost) & set(liveness.mandatory_sites))
        left = len(experiment.sites) - len(lost)
        if not mandatory and left >= needed:
            return None
        offline = sorted(site for site, why in lost.items() if why == OFFLINE)
        parts = (
            [
                f"sites offline for more than {liveness.offline_grace_seconds:g} s: "
                f"{', '.join(offline)}"
            ]
            if offline
            else []
        )
        parts += [f"site {site} {why}" for site, why in sorted(lost.items()) if site not in offline]
        return (
            "; ".join(parts)
            + (f" (mandatory: {', '.join(mandatory)})" if mandatory else "")
            + f"; {left} of {len(experiment.sites)} left, {needed} needed"
        )

    def _aggregator_ended(self, experiment: Experiment, ended: Ended) -> None:
        experiment_id = experiment.experiment_id
        self.state.set_aggregator(experiment_id, None)
        # `aggregator start` also exits 0 when stopped by a signal: done only when every round is.
        rounds = self._rounds_completed(experiment_id)
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
        try:
            last = log_tail(self.folder(experiment_id) / LOG_FILE, 1, LOG_TAIL_BYTES)
        except OSError:
            last = []
        reason = ended.describe() + (f"; its log ends: {last[0].strip()}" if last else "")
        reason += f" (its log: experiment logs {experiment_id})"
        lost = self._lost_sites(experiment, self.state.reports(experiment_id))
        grace = self._liveness(experiment).offline_grace_seconds
        sites = [f"site {site} {_said(why, grace)}" for site, why in sorted(lost.items())]
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
        folder = self.folder(experiment_id)
        model = folder / INITIAL_MODEL
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
                initial_model=model if experiment.has_initial_model else None,
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
        folder = self.folder(experiment.experiment_id)
        self.launcher.stop(experiment.experiment_id, folder)
        self.state.set_aggregator(experiment.experiment_id, None)

    # -- helpers ------------------------------------------------------------------------------

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

    def _keep_report(self, site: str, report: CollaboratorReport) -> None:
        known = self.state.reports(report.experiment_id).get(site)
        if known is not None and (known.state, known.exit_code, known.reason) == (
            report.state,
            report.exit_code,
            report.reason,
        ):
            return  # the same again: nothing to write
        self.state.report(
            report.experiment_id,
            site,
            report.state,
            exit_code=report.exit_code,
            reason=report.reason,
        )

    def _start_order(self, experiment: Experiment, site: str) -> StartOrder:
        path = self.folder(experiment.experiment_id) / PLAN_FILE
        try:
            plan_yaml = path.read_text(encoding="utf-8")
        except OSError as error:
            raise StorageError(f"{path}: cannot read: {error.strerror}") from None
        return StartOrder(
            experiment_id=experiment.experiment_id,
            name=experiment.name,
            owner=experiment.owner,
            plan_yaml=plan_yaml,
            collaborator_name=site,
        )

    def _metric_lines(self, experiment_id: str) -> list[str]:
        path = self.folder(experiment_id) / OUTPUT / METRICS
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as error:
            raise StorageError(f"{path}: cannot read: {error}") from None
        # Only whole lines: the aggregator may be writing the last one.
        return text.split("\n")[:-1]

    def _rounds_completed(self, experiment_id: str) -> int:
        """Training rounds in metrics.jsonl (the final validation's row is not one)."""
        count = 0
        for line in self._metric_lines(experiment_id):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and not row.get("final_validation"):
                count += 1
        return count

    def _receive_model(self, path: Path, model: ModelUpload) -> None:
        """Write a submitted model as its pieces arrive, within the size declared and allowed."""
        limit = self.config.limits.max_model_bytes
        if model.size > limit:
            raise LimitExceededError(
                f"the initial model is {model.size} bytes; this director accepts at most {limit} "
                "(director.yaml limits.max_model_bytes)"
            )
        partial = path.with_name(f".{path.name}.part")
        received = 0
        try:
            with partial.open("wb") as file:
                for piece in model.pieces:
                    received += len(piece)
                    if received > model.size:
                        raise InvalidRequestError(
                            f"initial_model_size says {model.size} bytes, but more arrived"
                        )
                    file.write(piece)
                file.flush()
                os.fsync(file.fileno())
            if received != model.size:
                raise InvalidRequestError(
                    f"initial_model_size says {model.size} bytes, but {received} arrived"
                )
            partial.replace(path)
        except OSError as error:
            raise StorageError(f"{path}: cannot write: {error.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()


def _said(why: str, grace: float) -> str:
    """Why a site is lost, in words: `OFFLINE` with the grace it had, else what its envoy said."""
    return f"offline for more than {grace:g} s" if why == OFFLINE else why
