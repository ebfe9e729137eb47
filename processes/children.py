"""Commands as child processes in their own sessions: their log kept, their exit status durable.

`ChildProcesses` runs any command under `foedus.processes.child` (a small parent in a session of its
own that records the command's exit code in the folder's `exit_status`, even while no one is
there to read it), finds it again after a restart (`adopt`: pids are reused, so its command line
is checked), and stops it (SIGTERM passed on, then SIGKILL to the session). The director runs its
experiments' aggregators with it (`foedus.director.launcher`), the envoy its site's collaborators
(`foedus.envoy.site`); `log_tail` reads the end of a child's log for either.
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

logger = logging.getLogger(__name__)

STATUS_FILE = "exit_status"  # in each child's folder: its exit code, written by `processes.child`
# The parent each child runs under, named by this package (whatever the package is called).
CHILD_MODULE = f"{__package__}.child"
# Its name before it moved here: a child started by an earlier foedus, still running after an
# upgrade, is found again rather than started twice.
_EARLIER_CHILD_MODULES = ("director.child", "processes.child")


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
    """Commands as child processes of this host, each in its own session, under `foedus.processes.child`.

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
        """Start `command` under `foedus.processes.child`, in `folder`; its pid."""
        status = folder / STATUS_FILE
        status.unlink(missing_ok=True)  # a status from an earlier run would read as this one's
        with (folder / self.log_name).open("ab") as log:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    CHILD_MODULE,
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
        """Whether `pid` is still this folder's `foedus.processes.child` (pids are reused)."""
        if not _is_ours(pid, folder / STATUS_FILE):
            return False
        self._adopted[key] = pid
        logger.info("%s: %s adopted again (pid %d)", key, self.what, pid)
        return True

    def adopt_any(self, key: str, folder: Path) -> int | None:
        """Adopt this folder's `foedus.processes.child` if one runs, whatever its pid; that pid or None.

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
    """Whether process `pid` runs and is the `foedus.processes.child` recording to `status`."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    parents = {os.fsencode(name) for name in (CHILD_MODULE, *_EARLIER_CHILD_MODULES)}
    return not parents.isdisjoint(command) and os.fsencode(str(status)) in command


def _read_status(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
