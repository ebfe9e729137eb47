"""How the director runs experiments' aggregators: one small interface, local child processes now.

`Launcher` is the seam: the director asks it to start an experiment's aggregator with the plan it
wrote, to tell whether it still runs or how it ended, to stop it, and after a restart to find it
again. `LocalLauncher` runs `aggregator start --plan PLAN` on this host through `director.child`
(its own session; output appended to the experiment's `aggregator.log`; the exit code recorded
in `exit_status` even while no director runs). An orchestrator (Kubernetes Jobs, say) can take
over behind the same four methods when one host is not enough.

`ChildProcesses` is the part that is not about aggregators: any command as a child in its own
session, its log kept, its exit status durable, found again after a restart. Envoys run their
collaborators with it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

LOG_FILE = "aggregator.log"
STATUS_FILE = "exit_status"


@dataclass(frozen=True)
class Ended:
    """How a child ended: its exit code (-N for signal N), or None when it vanished without one."""

    code: int | None

    def describe(self, what: str = "the aggregator") -> str:
        """The end in words, for a failure's reason; `what` names the process."""
        if self.code is None:
            return f"{what} stopped without recording an exit status"
        if self.code < 0:
            return f"{what} was ended by signal {-self.code}"
        return f"{what} exited with code {self.code}"


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


def log_tail(path: Path, max_lines: int, max_bytes: int) -> list[str]:
    """The last lines of a child's log, read from its last `max_bytes` at most (none yet: []).

    When the log is longer than that, the first line read may be cut, and is left out. Other
    failures to read raise `OSError`, for the caller to report as its own error.
    """
    try:
        with path.open("rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - max_bytes))
            data = file.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes:
        lines = lines[1:]
    return lines[-max_lines:]


class ChildProcesses:
    """Commands as child processes of this host, each in its own session, under `director.child`.

    Each child has a key (an experiment id) and a folder: its output is appended to `log_name`
    there and its exit code recorded in `exit_status`, even while this process is not running.
    """

    def __init__(self, log_name: str, what: str) -> None:
        """`log_name`: the log file in each folder; `what` names the children in the log."""
        self.log_name = log_name
        self.what = what
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._adopted: dict[str, int] = {}

    def start(self, key: str, command: Sequence[str], folder: Path) -> int:
        """Start `command` under `director.child`, in `folder`; its pid."""
        status = folder / STATUS_FILE
        status.unlink(missing_ok=True)  # a status from an earlier run would read as this one's
        with (folder / self.log_name).open("ab") as log:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "director.child",
                    "--status",
                    str(status),
                    "--",
                    *command,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=folder,
            )
        self._children[key] = child
        logger.info("%s: %s started (pid %d)", key, self.what, child.pid)
        return child.pid

    def adopt(self, key: str, folder: Path, pid: int) -> bool:
        """Whether `pid` is still this folder's `director.child` (pids are reused)."""
        if not _is_ours(pid, folder / STATUS_FILE):
            return False
        self._adopted[key] = pid
        logger.info("%s: %s adopted again (pid %d)", key, self.what, pid)
        return True

    def adopt_any(self, key: str, folder: Path) -> int | None:
        """Adopt this folder's `director.child` if one runs, whatever its pid; that pid or None.

        For a crash between starting a child and recording its pid: starting another would run
        the command twice.
        """
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self.adopt(key, folder, int(entry.name)):
                return int(entry.name)
        return None

    def poll(self, key: str, folder: Path) -> Ended | None:
        """None while it runs; else its recorded exit code (None if it recorded none)."""
        child = self._children.get(key)
        if child is not None:
            if child.poll() is None:
                return None
            del self._children[key]
            pid: int | None = child.pid
        else:
            pid = self._adopted.get(key)
            if pid is not None and _is_ours(pid, folder / STATUS_FILE):
                return None
            self._adopted.pop(key, None)
        code = _read_status(folder / STATUS_FILE)
        if code is None and pid is not None:
            _end_session(pid, key, self.what)
        return Ended(code)

    def stop(self, key: str, folder: Path, *, grace_seconds: float = 10.0) -> None:
        """SIGTERM to its parent (passed on to the command); SIGKILL to the session after the grace."""
        child = self._children.get(key)
        pid = child.pid if child is not None else self._adopted.get(key)
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
            logger.warning("%s: %s still running; killing it", key, self.what)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            if child is not None:
                child.wait(timeout=30)
        self._children.pop(key, None)
        self._adopted.pop(key, None)


class LocalLauncher:
    """Aggregators as child processes of this host, each in its own session."""

    def __init__(self, command: tuple[str, ...] | None = None) -> None:
        """`command` runs an aggregator (default: this Python's `-m aggregator start`)."""
        self.command = command or (sys.executable, "-m", "aggregator")
        self._processes = ChildProcesses(LOG_FILE, "aggregator")

    def start(self, experiment_id: str, plan: Path, folder: Path) -> int:
        """Start `aggregator start --plan PLAN` under `director.child`; its pid."""
        return self._processes.start(
            experiment_id, (*self.command, "start", "--plan", str(plan)), folder
        )

    def adopt(self, experiment_id: str, folder: Path, pid: int) -> bool:
        """Whether `pid` is still this experiment's `director.child` (pids are reused)."""
        return self._processes.adopt(experiment_id, folder, pid)

    def poll(self, experiment_id: str, folder: Path) -> Ended | None:
        """None while it runs; else its recorded exit code (None if it recorded none)."""
        return self._processes.poll(experiment_id, folder)

    def stop(self, experiment_id: str, folder: Path, *, grace_seconds: float = 10.0) -> None:
        """SIGTERM to its parent (passed on to the aggregator); SIGKILL to the session after the grace."""
        self._processes.stop(experiment_id, folder, grace_seconds=grace_seconds)


def _end_session(pid: int, key: str, what: str) -> None:
    """The parent vanished without a status (killed): end what is left of its session, so the
    command it ran (orphaned, still holding its state) is never run twice once started again."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    logger.warning("%s: %s's parent gone without a status: its session killed", key, what)
    deadline = time.monotonic() + 2  # killed members may linger as zombies: bounded
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


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
