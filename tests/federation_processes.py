"""Test helpers: a federation of real processes (one aggregator, N collaborators) on 127.0.0.1.

Tests that kill, restart or starve processes build on `FederationProcesses`; `run_federation`
runs one to the end. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from foedus.pki.layout import CertsLayout

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
COLLABORATORS = ("alice", "bob", "carol")
RUN_TIMEOUT_SECONDS = 120


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def child_python_path(*folders: Path) -> str:
    """The PYTHONPATH of a child process: `folders`, tests/ (its runners), the repository, then
    this process's own (the empty parts left out: an empty one would put the child's cwd first)."""
    parts = [*map(str, folders), str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(part for part in parts if part)


def run_module(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` from the repository, as a person runs a command; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": child_python_path()},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# Connection settings for a federation whose aggregator is killed and started again: its
# collaborators retry through the restart (the harness's backoff is short, 0.2 to 1 s).
PATIENT = {"max_retries": 200, "max_wait_seconds": 60}


def write_plan(
    folder: Path, certs: CertsLayout, rounds: int, **sections: Mapping[str, Any]
) -> Path:
    """A plan like plans/local.yaml for `rounds` rounds on a free port, writing into `folder`.

    Each keyword updates (merges into) that section of the plan.
    """
    document = yaml.safe_load((REPO / "plans" / "local.yaml").read_text(encoding="utf-8"))
    document["federation"]["rounds"] = rounds
    document["aggregator"].update(
        port=free_port(), output_dir=str(folder / "output"), quit_grace_seconds=10
    )
    document["tls"] = {"certs_dir": str(certs.root)}
    document["connection"].update(backoff_initial_seconds=0.2, backoff_max_seconds=1)
    for key, value in sections.items():
        base = document.get(key)
        document[key] = {**base, **value} if isinstance(base, dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@dataclass
class FederationProcesses:
    """The processes of one federation; logs go to `folder`, the aggregator's stdout to a file."""

    plan: Path
    folder: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self,
        name: str,
        *extra: str,
        plan: Path | None = None,
        prefix: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start the aggregator (name "aggregator") or collaborator `name` as a new process.

        `plan` replaces the federation's plan for this process only; `prefix` runs the command
        under another one that execs it (e.g. `ip netns exec NAME`); `env` adds to (or
        overrides) the environment of the new process.
        """
        plan_path = str(self.plan if plan is None else plan)
        if name == "aggregator":
            command = ["foedus.aggregator", "start", "--plan", plan_path, *extra]
        else:
            command = ["foedus.collaborator", "start", "-n", name, "--plan", plan_path, *extra]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with (
            (self.folder / f"{name}.out").open("ab") as out,
            (self.folder / f"{name}.log").open("ab") as log,
        ):
            process = subprocess.Popen(
                [*(prefix or ()), sys.executable, "-m", *command],
                stdout=out,
                stderr=log,
                env=environment,
            )
        self.processes[name] = process
        return process

    def kill(self, name: str) -> None:
        """SIGKILL one process and reap it."""
        process = self.processes[name]
        process.kill()
        process.wait(timeout=10)

    def wait(self, name: str, timeout: float) -> int:
        """Wait for one process to exit; its exit code."""
        return self.processes[name].wait(timeout=timeout)

    def wait_all(self, timeout: float = RUN_TIMEOUT_SECONDS) -> dict[str, int]:
        """Wait for every process, within `timeout` seconds in all; their exit codes."""
        deadline = time.monotonic() + timeout
        return {
            name: process.wait(timeout=max(0.1, deadline - time.monotonic()))
            for name, process in self.processes.items()
        }

    def stop_all(self) -> None:
        """Kill whatever still runs (after a failed or timed-out test)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    def output(self, name: str = "aggregator") -> str:
        """What a process printed to stdout so far."""
        path = self.folder / f"{name}.out"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def log(self, name: str) -> str:
        """What a process wrote to stderr so far (a collaborator's log lines)."""
        path = self.folder / f"{name}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def wait_for_output(self, name: str, pattern: str, timeout: float) -> re.Match[str]:
        """Poll a process's stdout until `pattern` appears; fail after `timeout` seconds."""
        return self._wait_for(name, self.output, pattern, timeout)

    def wait_for_log(self, name: str, pattern: str, timeout: float) -> re.Match[str]:
        """Poll a process's stderr until `pattern` appears; fail after `timeout` seconds."""
        return self._wait_for(name, self.log, pattern, timeout)

    def _wait_for(
        self, name: str, read: Callable[[str], str], pattern: str, timeout: float
    ) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, read(name))
            if match:
                return match
            if self.processes[name].poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{name} did not write {pattern!r} in {timeout} s:\n{read(name)}")


@dataclass(frozen=True)
class FederationRun:
    """What one run left behind: exit codes, the aggregator's output and its output folder."""

    exit_codes: dict[str, int]
    aggregator_stdout: str
    output_dir: Path


def run_federation(
    folder: Path,
    certs: CertsLayout,
    rounds: int,
    *,
    collaborator_args: Mapping[str, Sequence[str]] | None = None,
    **sections: Mapping[str, Any],
) -> FederationRun:
    """Run an aggregator and three collaborators as processes to the end, bounded in time;
    `collaborator_args`: more arguments of some collaborators' `start`, by name."""
    plan = write_plan(folder, certs, rounds, **sections)
    federation = FederationProcesses(plan, folder)
    try:
        federation.start("aggregator")
        for name in COLLABORATORS:
            federation.start(name, *(collaborator_args or {}).get(name, ()))
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    return FederationRun(codes, federation.output(), folder / "output")


def final_accuracy(stdout: str) -> float:
    """The accuracy on the aggregator's last line that mentions it."""
    lines = [line for line in stdout.splitlines() if "accuracy" in line]
    if not lines:
        raise AssertionError(f"no accuracy line in:\n{stdout}")
    match = re.search(r"accuracy (\d+\.\d+)", lines[-1])
    if not match:
        raise AssertionError(f"no accuracy figure in: {lines[-1]}")
    return float(match.group(1))
