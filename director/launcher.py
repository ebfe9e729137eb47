"""How the director runs experiments' aggregators: one small interface, local child processes now.

`Launcher` is the seam: the director asks it to start an experiment's aggregator with the plan it
wrote, to tell whether it still runs or how it ended, to stop it, and after a restart to find it
again. `LocalLauncher` runs `aggregator start --plan PLAN` on this host through
`processes.ChildProcesses` (its own session; output appended to the experiment's `aggregator.log`;
the exit code recorded in `exit_status` even while no director runs). An orchestrator (Kubernetes
Jobs, say) can take over behind the same four methods when one host is not enough.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

from foedus.processes.children import ChildProcesses, Ended

LOG_FILE = "aggregator.log"


class Launcher(Protocol):
    """Starts, watches and stops experiments' aggregators; what the director needs of a runner."""

    def start(self, experiment_id: str, plan: Path, folder: Path) -> int:
        """Start the aggregator of `plan`, its files in `folder`; the process id to record."""
        ...

    def adopt(self, experiment_id: str, folder: Path, pid: int) -> bool:
        """After a director restart: whether the aggregator recorded as `pid` still runs (then watched)."""
        ...

    def poll(self, experiment_id: str, folder: Path) -> Ended | None:
        """None while the aggregator runs; how it ended once it has."""
        ...

    def stop(self, experiment_id: str, folder: Path, *, grace_seconds: float = 10.0) -> None:
        """Stop the aggregator (SIGTERM, then SIGKILL after the grace period); no-op if ended."""
        ...


class LocalLauncher:
    """Aggregators as child processes of this host, each in its own session."""

    def __init__(self, command: tuple[str, ...] | None = None) -> None:
        """`command` runs an aggregator (default: this Python's `-m foedus.aggregator start`)."""
        self.command = command or (sys.executable, "-m", "foedus.aggregator")
        self._processes = ChildProcesses(LOG_FILE, "aggregator")

    def start(self, experiment_id: str, plan: Path, folder: Path) -> int:
        """Start `aggregator start --plan PLAN` under `foedus.processes.child`; its pid."""
        return self._processes.start(
            experiment_id, (*self.command, "start", "--plan", str(plan)), folder
        )

    def adopt(self, experiment_id: str, folder: Path, pid: int) -> bool:
        """Whether `pid` is still this experiment's `foedus.processes.child` (pids are reused)."""
        return self._processes.adopt(experiment_id, folder, pid)

    def poll(self, experiment_id: str, folder: Path) -> Ended | None:
        """None while it runs; else its recorded exit code (None if it recorded none)."""
        return self._processes.poll(experiment_id, folder)

    def stop(self, experiment_id: str, folder: Path, *, grace_seconds: float = 10.0) -> None:
        """SIGTERM to its parent (passed on to the aggregator); SIGKILL to the session after the grace."""
        self._processes.stop(experiment_id, folder, grace_seconds=grace_seconds)
