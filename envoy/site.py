"""What an envoy does at its site, in plain Python: start, watch, restart and stop collaborators.

`Site` turns the director's work (experiments to start and to stop, logs to send) into actions on
the envoy's durable state (`foedus.envoy.state`) and its collaborators, child processes in their own
sessions (`foedus.processes.children.ChildProcesses`): `collaborator start -n NAME --no-leave
--plan PLAN`, the plan written by `foedus.envoy.site_plan` (with `--keep-metrics` when envoy.yaml's
`share_with_aggregator.metrics` is false). `--no-leave`: a collaborator that fails does not tell
the aggregator it leaves, the envoy does once it gives it up; else a one-site federation's
aggregator would end before a slow restart (a loaded site, a large model to load) calls again. A collaborator that dies is started again, at most
`MAX_RESTARTS` times in a row (the count starts again once it finishes a round it had not); the site
gives up on it for good (GAVE_UP) when it exits 2 (a bad plan or settings: starting again cannot
help), when its restarts are used up, or when the site's operator stops it, and tells the aggregator
the site left (`foedus.envoy.leave`, in a thread of its own). Otherwise it never touches the
network; `foedus.envoy.runtime` carries its reports to the director and the director's work to it.
Every step is written to the state before it is acted on or reported, so an envoy started again
after kill -9 goes on where it was (`recover`).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from foedus.command.exits import EXIT_BAD_INPUT
from foedus.envoy.config import EnvoyConfig
from foedus.envoy.disclosure import SharedLog, failure_reason, shared_reason
from foedus.envoy.errors import EnvoyError, FinishedError, IllegalTransitionError, StateError
from foedus.envoy.leave import LeaveCall, Leaving
from foedus.envoy.progress import Progress, read_new_lines
from foedus.envoy.site_plan import (
    EXPERIMENT_ID,
    PLAN_FILE,
    RefusedPlanError,
    keep_own_settings,
    plan_sections,
    site_document,
    write_site_plan,
    write_site_settings,
)
from foedus.envoy.state import DIRECTOR, NO_ROUND, SITE, EnvoyState, SiteExperiment
from foedus.lifecycle.orders import CollaboratorReport, LogOrder, StartOrder, Work
from foedus.lifecycle.states import CollaboratorState
from foedus.processes.children import ChildProcesses, Ended

logger = logging.getLogger(__name__)

EXPERIMENTS = "experiments"
LOG_FILE = "collaborator.log"
MAX_RESTARTS = 3  # a collaborator that died this many times in a row is given up
MAX_LOG_BYTES = 4 * 1024 * 1024  # the most of a log sent for one request
NO_STATUS = -1  # the exit code reported for a collaborator that vanished without recording one
_S = CollaboratorState
_ALIVE = frozenset({_S.STARTED, _S.RUNNING})
_STOPPABLE = frozenset({_S.SITE_APPROVED, _S.EXITED})  # not running, yet not final
_STOPPED_BY_SITE = "stopped by the site's operator"
OWN = "site"  # the owner of a collaborator the site started itself
OWN_PLAN = Path("the plan given to the site's API")  # how refusals name it


@dataclass(frozen=True)
class Report(CollaboratorReport):
    """A report for the director, with its place in the envoy's outbox (`sequence`; 0: none)."""

    sequence: int = 0


@dataclass(frozen=True)
class LogPiece:
    """A piece of a log: `found` false when this envoy has no such log."""

    found: bool
    size: int = 0
    data: bytes = b""


class Site:
    """One site's collaborators, run for the director; see the module's docstring."""

    def __init__(
        self,
        name: str,
        config: EnvoyConfig,
        state: EnvoyState,
        *,
        collaborator_command: Sequence[str] = (sys.executable, "-m", "foedus.collaborator"),
        stop_patience_seconds: float = 10.0,
        stop_grace_seconds: float = 10.0,
        leave: LeaveCall | None = None,
    ) -> None:
        """`name` is this site's (its certificate's CN); `collaborator_command` runs a collaborator.

        Told to stop, a collaborator gets `stop_patience_seconds` to end by itself, then SIGTERM
        and `stop_grace_seconds` more before SIGKILL. `leave` tells an aggregator the site left
        (by default `foedus.envoy.leave.Leaving`: in a thread of its own).
        """
        self.name = name
        self.config = config
        self.state = state
        self.collaborator_command = tuple(collaborator_command)
        self.stop_patience_seconds = stop_patience_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self.leave: LeaveCall = leave if leave is not None else Leaving()
        self._stop_asked: dict[str, float] = {}
        self.children = ChildProcesses(LOG_FILE, "collaborator")
        self._root = config.state_dir / EXPERIMENTS
        self._shared_logs: dict[str, SharedLog] = {}

    def folder(self, experiment_id: str) -> Path:
        """Where an experiment's plan, log and exit status are."""
        return self._root / experiment_id

    # -- after a restart -----------------------------------------------------------------------

    def recover(self) -> None:
        """Find running collaborators again (every state is reported again on registering)."""
        for experiment in self.state.experiments(listed_only=True):
            if experiment.state not in _ALIVE or experiment.pid is None:
                continue
            folder = self.folder(experiment.experiment_id)
            adopted = self.children.adopt(experiment.experiment_id, folder, experiment.pid)
            if adopted and experiment.state is _S.STARTED:
                self.state.transition(experiment.experiment_id, _S.RUNNING, pid=experiment.pid)
        # Those that ended meanwhile are found by the next `tick` (their recorded status).

    # -- the director's work -------------------------------------------------------------------

    def receive(self, work: Work) -> None:
        """Act on a heartbeat's starts and stops (logs are read with `read_log`)."""
        for order in work.start:
            self._start(order)
        for experiment_id in work.stop:
            experiment = self.state.find(experiment_id)
            if experiment is not None and not experiment.done and experiment.origin == DIRECTOR:
                self.state.set_stopping(experiment_id)
        self.tick()

    def tick(self) -> None:
        """Launch approved collaborators, note ended ones (restarting the dead), finish stops."""
        for experiment in self.state.experiments(listed_only=True):
            try:
                self._check(experiment)
            except EnvoyError as error:
                logger.error("experiment %s: %s", experiment.experiment_id, error)

    def reports(self) -> list[Report]:
        """Every listed experiment's current state, for a heartbeat (reasons as shared)."""
        listed = self.state.experiments(listed_only=True)
        return [self._shared(_report(e)) for e in listed if e.origin == DIRECTOR]

    def unreported(self) -> list[Report]:
        """Every state change the director has not acknowledged yet, in order (as shared)."""
        return [
            self._shared(Report(r.experiment_id, r.state, r.exit_code, r.reason, r.sequence))
            for r in self.state.outgoing()
        ]

    def acknowledged(self, report: Report) -> None:
        """The director has `report`."""
        self.state.acknowledge(report.sequence)

    def read_log(self, order: LogOrder) -> LogPiece:
        """Part of the log of one of this envoy's director experiments, as the site shares it
        (offsets are of the shared text); not found for any other."""
        experiment = self.state.find(order.experiment_id)
        if experiment is None or experiment.origin != DIRECTOR:
            return LogPiece(found=False)
        path = self.folder(experiment.experiment_id) / LOG_FILE
        most = min(order.max_bytes or MAX_LOG_BYTES, MAX_LOG_BYTES)
        shared = self._shared_logs.setdefault(
            experiment.experiment_id,
            SharedLog(
                self.config.share_with_director,
                self.name,
                metrics=self.config.share_with_aggregator.metrics,
            ),
        )
        try:
            size, data = shared.read(path, order.offset, most)
            return LogPiece(found=True, size=size, data=data)
        except FileNotFoundError:
            return LogPiece(found=False)
        except OSError as error:
            logger.warning("cannot read %s: %s", path, error.strerror)
            return LogPiece(found=False)

    # -- the site's own (its API) ---------------------------------------------------------------

    def start_own(
        self, plan_yaml: str, runner_settings: Mapping[str, object], *, name: str = ""
    ) -> SiteExperiment:
        """Keep a collaborator the site starts itself (no director), checked as a director's.

        `runner_settings` replace the plan's `runner.settings` keys (kept apart from the plan,
        as the site's own, so they may hold its privacy cap: `keep_own_settings`); envoy.yaml's
        `runner_settings` still win over both, as for every plan. `RefusedPlanError` (nothing
        kept, nothing started) if the site would refuse it; the next `tick` launches it.
        """
        document = plan_sections(plan_yaml, OWN_PLAN)
        own_id = str(uuid.uuid4())
        checked = site_document(
            yaml.safe_dump(document), self.name, self.config, self.folder(own_id)
        )
        keep_own_settings(runner_settings, self.folder(own_id))
        federation = checked.get("federation")
        plan_name = federation.get("name") if isinstance(federation, Mapping) else None
        experiment = self.state.add(
            experiment_id=own_id,
            name=name or (plan_name if isinstance(plan_name, str) else "") or "site",
            owner=OWN,
            site=self.name,
            plan_yaml=yaml.safe_dump(document, sort_keys=False),
            state=_S.SITE_APPROVED,
            reason="started by the site's API",
            origin=SITE,
        )
        logger.info("collaborator %s: started by the site's API", own_id)
        return experiment

    def stop_collaborator(self, experiment_id: str) -> SiteExperiment:
        """Stop one collaborator (any, the director's too) as the director's stop would.

        `UnknownExperimentError` if there is none, `FinishedError` if it has already ended.
        """
        experiment = self.state.experiment(experiment_id)
        if experiment.finished:
            raise FinishedError(
                f"collaborator {experiment_id} has already ended ({experiment.state.value})"
            )
        self.state.set_stopping(experiment_id, by_site=True)
        logger.info(
            "collaborator %s: stopping, as the site asked; the site gives it up", experiment_id
        )
        return self.state.experiment(experiment_id)

    # -- one experiment ------------------------------------------------------------------------

    def _start(self, order: StartOrder) -> None:
        """Keep a new experiment (a start already acted on is nothing new)."""
        if not EXPERIMENT_ID.match(order.experiment_id):
            logger.warning("ignored a start for a malformed experiment id %r", order.experiment_id)
            return
        if self.state.find(order.experiment_id) is not None:
            return
        state, reason = _S.SITE_APPROVED, "review: auto"
        if order.collaborator_name != self.name:
            state = _S.REFUSED
            reason = f"this envoy is site {self.name!r}, not {order.collaborator_name!r}"
        else:
            folder = self.folder(order.experiment_id)
            try:  # refused at once, before a site operator is asked to review it
                site_document(order.plan_yaml, self.name, self.config, folder)
            except RefusedPlanError as error:
                state, reason = _S.REFUSED, str(error)
            else:
                if self.config.manual_review:
                    state = _S.APPROVAL_PENDING
                    reason = f"waiting for the site operator: envoy approve {order.experiment_id}"
        self.state.add(
            experiment_id=order.experiment_id,
            name=order.name,
            owner=order.owner,
            site=order.collaborator_name,
            plan_yaml=order.plan_yaml,
            state=state,
            reason=reason,
        )
        logger.info(
            "experiment %s (%r by %s): %s", order.experiment_id, order.name, order.owner, reason
        )

    def _check(self, experiment: SiteExperiment) -> None:
        experiment_id = experiment.experiment_id
        folder = self.folder(experiment_id)
        if experiment.stopping:
            if experiment.state in _ALIVE:
                ended = self.children.poll(experiment_id, folder)
                if ended is None:
                    # A collaborator that has finished takes a few seconds to exit: let it,
                    # so it is reported as it ended, not as stopped by us.
                    asked = self._stop_asked.setdefault(experiment_id, time.monotonic())
                    if time.monotonic() - asked < self.stop_patience_seconds:
                        return
                    self.children.stop(experiment_id, folder, grace_seconds=self.stop_grace_seconds)
                    ended = self.children.poll(experiment_id, folder)
                self._ended(experiment, ended, restart=False)
            elif experiment.stopped_by_site and experiment.state in _STOPPABLE:
                self._give_up(experiment, experiment.exit_code, _STOPPED_BY_SITE, experiment.reason)
            elif experiment.stopped_by_site and experiment.state is _S.APPROVAL_PENDING:
                self.state.transition(experiment_id, _S.SITE_REJECTED, reason=_STOPPED_BY_SITE)
            self._stop_asked.pop(experiment_id, None)
            self.state.set_done(experiment_id)
            who = "the site's operator" if experiment.stopped_by_site else "the director"
            logger.info("experiment %s: stopped, as %s said", experiment_id, who)
            return
        if experiment.state is _S.SITE_APPROVED:
            self._launch(experiment)
        elif experiment.state in _ALIVE:
            ended = self.children.poll(experiment_id, folder)
            if ended is not None:
                self._ended(experiment, ended, restart=True)
        elif experiment.state is _S.EXITED and experiment.exit_code != 0:
            # Died, and not started again: the envoy was killed in between, or the start failed.
            self._after_death(experiment, adopt=True)

    def _launch(
        self,
        experiment: SiteExperiment,
        *,
        restarted: bool = False,
        restart_round: int | None = None,
        adopt: bool = True,
    ) -> None:
        experiment_id = experiment.experiment_id
        folder = self.folder(experiment_id)
        try:
            document = site_document(experiment.plan_yaml, experiment.site, self.config, folder)
        except RefusedPlanError as error:
            logger.warning("experiment %s refused: %s", experiment_id, error)
            if experiment.state is _S.EXITED:  # to start again (its runner no longer agreed to?)
                detail = f"{error}; {experiment.reason}" if experiment.reason else str(error)
                self._give_up(experiment, experiment.exit_code, "cannot start it again", detail)
            else:
                self.state.transition(experiment_id, _S.REFUSED, reason=str(error))
            return
        plan = write_site_plan(document, folder)
        settings = write_site_settings(self.config, folder)
        # Killed after starting it but before recording it, the envoy finds it here.
        pid = self.children.adopt_any(experiment_id, folder) if adopt else None
        if pid is None:
            # The child inherits the envoy's environment: PYTHONPATH reaches a site's runner.
            command = (
                *self.collaborator_command,
                "start",
                "-n",
                experiment.site,
                "--log-level",
                self.config.collaborator_log_level,
                "--no-leave",  # the envoy starts it again; it says when the site leaves
                *(() if self.config.share_with_aggregator.metrics else ("--keep-metrics",)),
                *(() if settings is None else ("--site-settings", str(settings))),
                "--plan",
            )
            try:
                pid = self.children.start(experiment_id, (*command, str(plan)), folder)
            except OSError as error:  # tried again at the next tick
                raise StateError(f"{folder}: cannot start the collaborator: {error}") from None
        self.state.transition(
            experiment_id, _S.STARTED, pid=pid, restarted=restarted, restart_round=restart_round
        )

    def _ended(self, experiment: SiteExperiment, ended: Ended | None, *, restart: bool) -> None:
        """Note how a collaborator ended: exited, started again, or given up for good."""
        experiment_id = experiment.experiment_id
        code = NO_STATUS if ended is None or ended.code is None else ended.code
        reason = ""
        if code != 0:
            described = (ended or Ended(None)).describe("the collaborator")
            reason = failure_reason(described, code, self.folder(experiment_id) / LOG_FILE)
        if experiment.stopped_by_site:
            self._give_up(experiment, code, _STOPPED_BY_SITE, reason)
            return
        exited = self.state.transition(experiment_id, _S.EXITED, exit_code=code, reason=reason)
        logger.info("experiment %s: collaborator ended (%s)", experiment_id, reason or "code 0")
        if restart and code != 0:  # not the director's stop, and it did not do its part
            self._after_death(exited, adopt=False)

    def _after_death(self, experiment: SiteExperiment, *, adopt: bool) -> None:
        """Start a collaborator that died again, or give it up: exit 2, or restarts used up.

        `adopt`: look for one already started first (the envoy killed right after starting it).
        """
        experiment_id, code, reason = (
            experiment.experiment_id,
            experiment.exit_code,
            experiment.reason,
        )
        if code == EXIT_BAD_INPUT:  # a bad plan or settings: starting again cannot help
            self._give_up(experiment, code, "a bad plan or settings", reason)
            return
        done = self._round_done(experiment_id)
        in_a_row = 0 if done > experiment.restart_round else experiment.restarts
        if in_a_row >= MAX_RESTARTS:
            self._give_up(experiment, code, f"it died {in_a_row + 1} times in a row", reason)
            return
        logger.warning(
            "experiment %s: %s; starting the collaborator again (%d of %d in a row); it asks "
            "the aggregator what it still owes",
            experiment_id,
            reason,
            in_a_row + 1,
            MAX_RESTARTS,
        )
        self._launch(experiment, restarted=True, restart_round=done, adopt=adopt)

    def _give_up(self, experiment: SiteExperiment, code: int, cause: str, detail: str = "") -> None:
        """The site will not start this collaborator again: GAVE_UP (its reason: `cause`, then
        `detail`, how it ended), for the director to know; its aggregator is told (`cause` only)."""
        experiment_id = experiment.experiment_id
        reason = f"{cause}; {detail}" if detail else cause
        self.state.transition(experiment_id, _S.GAVE_UP, exit_code=code, reason=reason)
        logger.warning("experiment %s: gave up on the collaborator: %s", experiment_id, reason)
        plan = self.folder(experiment_id) / PLAN_FILE
        if plan.is_file():  # else it never started: no aggregator knows it from this site
            self.leave(experiment_id, plan, experiment.site, f"the site gave it up: {cause}")

    def _round_done(self, experiment_id: str) -> int:
        """The last round the collaborator finished a task of, by its own log (`NO_ROUND`: none)."""
        progress = Progress()
        read_new_lines(progress, self.folder(experiment_id) / LOG_FILE)
        return NO_ROUND if progress.round is None else progress.round

    def _shared(self, report: Report) -> Report:
        """`report` with its reason as the site lets it leave (foedus.envoy.disclosure)."""
        reason = shared_reason(report.reason, self.config.share_with_director)
        return Report(report.experiment_id, report.state, report.exit_code, reason, report.sequence)


def _report(experiment: SiteExperiment) -> Report:
    return Report(
        experiment_id=experiment.experiment_id,
        state=experiment.state,
        exit_code=experiment.exit_code,
        reason=experiment.reason,
    )


def review(
    state: EnvoyState, experiment_id: str, *, approve: bool, reason: str = ""
) -> SiteExperiment:
    """The site operator's decision on an experiment waiting for it (review: manual).

    `UnknownExperimentError` if there is none, `IllegalTransitionError` if it is not waiting;
    the running envoy starts an approved one at its next tick and reports either to the director.
    """
    to = CollaboratorState.SITE_APPROVED if approve else CollaboratorState.SITE_REJECTED
    verb = "approve" if approve else "reject"
    experiment = state.experiment(experiment_id)
    try:
        return state.transition(
            experiment_id, to, reason=reason or f"the site operator chose to {verb} it"
        )
    except IllegalTransitionError:
        raise IllegalTransitionError(
            f"experiment {experiment_id} is {experiment.state.value.replace('_', ' ')}: only "
            "one waiting for approval can be approved or rejected"
        ) from None
