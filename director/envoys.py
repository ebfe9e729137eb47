"""The envoys' desk: what the director does for each envoy's call (register, heartbeat, report, log).

An envoy's heartbeat is its one way to be told anything: its answer (`Work`) carries the experiments
its collaborator is to start and to stop, and the log requests waiting for it
(`foedus.director.site_logs`). Nothing here imports gRPC: `foedus.director.servicer` converts the
wire.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from foedus.director.folders import ExperimentFolders
from foedus.director.identity import Caller, Role
from foedus.director.records import Experiment, ShardInfo
from foedus.director.site_logs import LogRendezvous
from foedus.director.state import DirectorState
from foedus.lifecycle.orders import CollaboratorReport, StartOrder, Work
from foedus.plans.director_config import DirectorConfig
from foedus.refusals.errors import AuthorizationError, NotFoundError

logger = logging.getLogger(__name__)


class EnvoyDesk:
    """Every call of an envoy to the director."""

    def __init__(
        self,
        config: DirectorConfig,
        state: DirectorState,
        folders: ExperimentFolders,
        site_logs: LogRendezvous,
    ) -> None:
        """Serve envoys from `state` by `config`'s rules; their log requests wait in `site_logs`."""
        self.config = config
        self.state = state
        self.folders = folders
        self.site_logs = site_logs

    def register(self, caller: Caller, shard: ShardInfo, version: str) -> float:
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
        logs = self.site_logs.orders_for(caller.name)
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
        self.site_logs.answer(
            caller.name, request_id, found, pieces, self.config.limits.chunk_bytes
        )

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
        return StartOrder(
            experiment_id=experiment.experiment_id,
            name=experiment.name,
            owner=experiment.owner,
            plan_yaml=self.folders.plan_text(experiment.experiment_id),
            collaborator_name=site,
        )
