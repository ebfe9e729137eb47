"""How the director runs experiments' aggregators: one small interface, local child processes now.

`Launcher` is the seam: the director asks it to start an experiment's aggregator with the plan it
wrote, to tell whether it still runs or how it ended, to stop it, and after a restart to find it
again. `LocalLauncher` runs `aggregator start --plan PLAN` on this host through `director.child`
(its own session; output appended to the experiment's `aggregator.log`; the exit code recorded
in `exit_status` even while no director runs). An orchestrator (Kubernetes Jobs, say) can take
over behind the same four methods when one host is not enough.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

LOG_FILE = "aggregator.log"
STATUS_FILE = "exit_status"


@dataclass(frozen=True)
class Ended:
    """How an aggregator ended: its exit code, or None when it vanished without recording one."""

    code: int | None

    def describe(self) -> str:
        """The end in words, for a failure's reason."""
        if self.code is None:
            return "the aggregator stopped without recording an exit status"
        if self.code < 0:
            return f"the aggregator was ended by signal {-self.code}"
        return f"the aggregator exited with code {self.code}"


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
        """`command` runs an aggregator (default: this Python's `-m aggregator start`)."""
        self.command = command or (sys.executable, "-m", "aggregator")
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._adopted: dict[str, int] = {}

    def start(self, experiment_id: str, plan: Path, folder: Path) -> int:
        """Start `aggregator start --plan PLAN` under `director.child`; its pid."""
        status = folder / STATUS_FILE
        status.unlink(missing_ok=True)  # a status from an earlier run would read as this one's
        with (folder / LOG_FILE).open("ab") as log:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "director.child",
                    "--status",
                    str(status),
                    "--",
                    *self.command,
                    "start",
                    "--plan",
                    str(plan),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=folder,
            )
        self._children[experiment_id] = child
        logger.info("experiment %s: aggregator started (pid %d)", experiment_id, child.pid)
        return child.pid

    def adopt(self, experiment_id: str, folder: Path, pid: int) -> bool:
        """Whether `pid` is still this experiment's `director.child` (pids are reused)."""
        if not _is_ours(pid, folder / STATUS_FILE):
            return False
        self._adopted[experiment_id] = pid
        logger.info("experiment %s: aggregator adopted again (pid %d)", experiment_id, pid)
        return True

    def poll(self, experiment_id: str, folder: Path) -> Ended | None:
        """None while it runs; else its recorded exit code (None if it recorded none)."""
        child = self._children.get(experiment_id)
        if child is not None:
            if child.poll() is None:
                return None
            del self._children[experiment_id]
        else:
            pid = self._adopted.get(experiment_id)
            if pid is not None and _is_ours(pid, folder / STATUS_FILE):
                return None
            self._adopted.pop(experiment_id, None)
        return Ended(_read_status(folder / STATUS_FILE))

    def stop(self, experiment_id: str, folder: Path, *, grace_seconds: float = 10.0) -> None:
        """SIGTERM to its parent (passed on to the aggregator); SIGKILL to the session after the grace."""
        child = self._children.get(experiment_id)
        pid = child.pid if child is not None else self._adopted.get(experiment_id)
        if pid is None:
            return
        status = folder / STATUS_FILE
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            ended = child.poll() is not None if child is not None else not _is_ours(pid, status)
            if ended:
                break
            time.sleep(0.05)
        else:
            logger.warning("experiment %s: aggregator still running; killing it", experiment_id)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            if child is not None:
                child.wait(timeout=30)
        self._children.pop(experiment_id, None)
        self._adopted.pop(experiment_id, None)


def _is_ours(pid: int, status: Path) -> bool:
    """Whether process `pid` runs and is the `director.child` recording to `status`."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"director.child" in command and os.fsencode(str(status)) in command


def _read_status(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
