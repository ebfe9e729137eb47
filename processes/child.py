"""`python -m foedus.processes.child --status FILE -- COMMAND...`: run a command, then record how it ended.

`foedus.processes.children.ChildProcesses` starts each command (the director's aggregators, the
envoy's collaborators) through this small parent, in a session of its own, so the command's exit
status is kept in FILE even when the service is not there to read it (killed, restarting): a service
that starts again finds either the parent still running (and watches it) or FILE (and reads how the
command ended). SIGTERM and SIGINT sent to this parent are passed on to the command, which ends as
it does on them; the status is recorded all the same.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from foedus.durable.files import write_text


def write_status(path: Path, code: int) -> None:
    """Write the exit code to `path` durably and atomically (a reader sees all of it or nothing)."""
    write_text(path, f"{code}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command after `--`, record its exit code (-N for a signal N), return it."""
    parser = argparse.ArgumentParser(prog="python -m foedus.processes.child", description=__doc__)
    parser.add_argument("--status", type=Path, required=True, help="where to record the exit code")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    children: list[subprocess.Popen[bytes]] = []
    stop: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        stop.append(signum)
        for child in children:
            child.send_signal(signum)

    # Before the command starts, so no signal can end this parent without a status; the command
    # gets the default handlers back when it starts (exec resets caught signals).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    children.append(subprocess.Popen(command))
    if stop:  # a signal came while the command was starting
        children[0].send_signal(stop[0])
    code = children[0].wait()
    write_status(args.status, code)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
