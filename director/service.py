"""The director's logic in plain Python, by desk; `DirectorService` puts the desks together.

- `foedus.director.envoys.EnvoyDesk`: the envoys' calls (register, heartbeat, report, upload a log);
- `foedus.director.people.PeopleDesk`: the people's calls (submit, list, describe, watch, review,
  cancel, remove; metrics, logs, models, envoys);
- `foedus.director.folders.ExperimentFolders`: every file of an experiment, read and written there only;
- `foedus.director.supervisor.Supervisor`: the aggregators, the lifecycle, the liveness rule
  (`foedus.director.liveness`), restarts in a row;
- `foedus.director.site_logs.LogRendezvous`: a person's request for a site's log meeting its envoy;
- `foedus.director.changes.Changes` (the state's): what followed streams wait on.

`foedus.director.servicer` calls the desks (one method per RPC, the caller already identified);
`foedus.director.server` recovers and runs the supervisor; `foedus.director.dashboard` reads through
the people's desk and the folders. Nothing here imports gRPC: tests drive it without a socket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from foedus.director.envoys import EnvoyDesk
from foedus.director.folders import ExperimentFolders
from foedus.director.identity import Roster
from foedus.director.launcher import Launcher
from foedus.director.people import PeopleDesk
from foedus.director.site_logs import LogRendezvous
from foedus.director.state import DirectorState
from foedus.director.supervisor import Supervisor
from foedus.plans.director_config import DirectorConfig


class DirectorService:
    """The director's desks over one state, one launcher and one clock."""

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
        self.roster = Roster.of(config)
        self.folders = ExperimentFolders(config.state_dir)
        site_logs = LogRendezvous()
        self.supervisor = Supervisor(config, state, launcher, self.folders, clock=clock)
        self.envoy_desk = EnvoyDesk(config, state, self.folders, site_logs)
        self.people = PeopleDesk(config, state, self.folders, site_logs, self.supervisor)

    def recover(self) -> None:
        """At start: the supervisor adopts, starts again or stops what ran before."""
        self.supervisor.recover()

    def run(self, stop: threading.Event, period: float = 0.25) -> None:
        """The supervisor's steps every `period` seconds until `stop` is set."""
        self.supervisor.run(stop, period)
