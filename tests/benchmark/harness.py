"""Benchmark plumbing: plans, child processes (aggregator, raw server), /proc readings, sizes."""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import yaml

from foedus.aggregator.storage import write_model
from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor
from foedus.pki.layout import CertsLayout
from foedus.plans import Limits, Plan
from foedus.plans.runners import Array
from foedus.plans.schema import RunnerSettings

# isort: split
# The benchmark's own modules, beside this file.
import noop_runner

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MIB = 1024 * 1024
KIB = 1024
RUNNER = "noop_runner:NoopRunner"  # found through the PYTHONPATH start_aggregator sets
AGGREGATOR_ID = "aggregator"
START_TIMEOUT_SECONDS = 60.0
# A child of the benchmark finds the no-op runner and the benchmark's modules, and prints at once.
BENCH_ENV = {
    "PYTHONPATH": os.pathsep.join(
        part for part in (str(HERE), os.environ.get("PYTHONPATH", "")) if part
    ),
    "PYTHONUNBUFFERED": "1",
}


class BenchmarkError(Exception):
    """The benchmark itself could not run a phase (a process did not start, a round hung)."""


def say(message: str) -> None:
    """Progress for the person waiting, on stderr (the table goes to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def timed(action: Callable[[], object]) -> float:
    """Seconds `action` took."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def samples(repeats: int, action: Callable[[int], object]) -> list[float]:
    """Seconds of each of `repeats` runs of `action(index)`."""
    seconds = []
    for index in range(repeats):
        started = time.perf_counter()
        action(index)
        seconds.append(time.perf_counter() - started)
    return seconds


def rate(megabytes: float, seconds: Sequence[float]) -> float:
    """MB/s of the best sample."""
    return megabytes / min(seconds)


def collaborator_names(count: int) -> list[str]:
    """col000, col001, ...: the collaborators of every phase (each its own certificate)."""
    width = max(3, len(str(count - 1)))
    return [f"col{index:0{width}d}" for index in range(count)]


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """A process's CPU time so far, (user, system) seconds; None once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime and stime, fields 14 and 15


def cpu_spent(end: tuple[float, float], start: tuple[float, float]) -> tuple[float, float]:
    """The (user, system) CPU seconds between two readings."""
    return end[0] - start[0], end[1] - start[1]


def own_cpu_seconds() -> tuple[float, float]:
    """This process's CPU time so far, (user, system) seconds."""
    times = os.times()
    return times.user, times.system


def rss_mb(pid: int) -> float | None:
    """A process's resident memory now (VmRSS) in MB; None once it has gone."""
    return _status_mb(pid, "VmRSS")


def peak_rss_mb(pid: int) -> float | None:
    """A process's peak resident memory (VmHWM) in MB; None once it has gone."""
    return _status_mb(pid, "VmHWM")


def _status_mb(pid: int, field_name: str) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    return None if match is None else int(match.group(1)) / KIB


class MemorySampler:
    """Samples a process's VmRSS every `interval` s on a thread, each sample with its time."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value is None:
                return
            self.samples.append((time.perf_counter(), value))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak(self, start: float = -math.inf, end: float = math.inf) -> float | None:
        """The largest sample taken between `start` and `end`."""
        return max((mb for at, mb in self.samples if start <= at <= end), default=None)


@dataclass
class Run:
    """One benchmark run: options, the temporary folder, the certificates and what was measured."""

    args: argparse.Namespace
    work: Path
    certs: CertsLayout
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        """A finding worth reading next to the figures."""
        self.notes.append(text)
        say(f"note: {text}")


def limits_for(tensor_bytes: int, upload_bytes: int) -> dict[str, int]:
    """The plan's `limits`: the defaults, raised only as far as these sizes need."""
    defaults = Limits()
    return {
        "max_message_bytes": max(defaults.max_message_bytes, min(2**31 - 1, tensor_bytes + MIB)),
        "max_upload_bytes": max(defaults.max_upload_bytes, upload_bytes + 16 * MIB),
        "max_tensor_bytes": max(defaults.max_tensor_bytes, tensor_bytes),
    }


def write_plan(
    run: Run,
    phase: str,
    collaborators: Sequence[str],
    *,
    model_mb: float,
    tensors: int,
    limits: Mapping[str, int] | None = None,
    rounds: int = 1,
    runner_settings: Mapping[str, object] | None = None,
    secure: Mapping[str, object] | None = None,
    privacy: Mapping[str, object] | None = None,
    compression: Mapping[str, object] | None = None,
    runner: RunnerSettings | None = None,
) -> Path:
    """A `train` plan of `rounds` rounds for `phase` with the no-op runner, on a port the OS picks.

    `runner_settings`: more of the no-op runner's settings (`train_delta`, `data_size`);
    `secure`: the plan's `secure_aggregation` section, `privacy` its `differential_privacy`
    section (none: a plain federation), `compression` its `compression` section (none: raw).
    `runner`: another runner than the no-op one (`model_mb`, `tensors` and `runner_settings`
    unused then), whose initial model the aggregator makes itself (no model file).

    The aggregator starts from the no-op runner's model written to a file (as OpenFL's aggregator
    starts from its `init.pbuf`): the runner builds its model once per process and keeps it,
    which in the aggregator's process would count a model's size of the runner's in the
    aggregator's memory figures.
    """
    folder = run.work / phase
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"model_mb": model_mb, "tensors": tensors, **(runner_settings or {})}
    aggregator: dict[str, object] = {}
    if runner is None:
        runner = RunnerSettings(RUNNER, 0, settings)
        initial_model = folder / "initial_model.pbuf"
        write_model(initial_model, noop_runner.NoopRunner.initial_model(runner))
        aggregator["initial_model"] = str(initial_model)
    document = {
        "federation": {
            "name": f"bench-{phase}",
            "uuid": f"bench-{phase}-{uuid.uuid4().hex[:12]}",
            "aggregator_id": AGGREGATOR_ID,
            "rounds": rounds,
        },
        "aggregator": {
            "host": "localhost",
            "port": 0,
            "listen_address": "127.0.0.1",
            "san_dns": ["localhost"],
            "san_ips": ["127.0.0.1"],
            "output_dir": str(folder / "output"),
            **aggregator,
            # The default, 5 s: with 2,000 collaborator threads in one process on 2 cores, a
            # quit answer once took more than 1 s to be read (65 of them cut off as CANCELLED).
            "grace_seconds": 5,
            "long_poll_seconds": 5,
            # Long enough for each of 2,000 collaborator threads, asleep between polls on 2
            # shared cores, to ask again and be told to quit (with 30 s, one was not and its
            # call was cut off at the stop); the aggregator stops as soon as all have been.
            "quit_grace_seconds": 120,
        },
        "tls": {"certs_dir": str(run.certs.root)},
        "collaborators": list(collaborators),
        "tasks": ["train"],
        "runner": {
            "name": runner.name,
            "seed": runner.seed,
            "settings": dict(runner.settings),
        },
        "straggler": {"policy": "wait_for_all"},
        "limits": dict(limits or {}),
    }
    if secure is not None:
        document["secure_aggregation"] = dict(secure)
    if privacy is not None:
        document["differential_privacy"] = dict(privacy)
    if compression is not None:
        document["compression"] = dict(compression)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def tensors_for(model_mb: float, tensor_mb: float) -> int:
    """How many tensors a model of `model_mb` has when none may pass `tensor_mb`."""
    return max(1, math.ceil(model_mb / tensor_mb))


def tensor_byte_sizes(total: int, tensors: int) -> list[int]:
    """The byte size of each tensor of the no-op runner's model (float32 elements shared out)."""
    elements = total // noop_runner.FLOAT32_BYTES
    base, extra = divmod(elements, tensors)
    return [
        (base + (1 if index < extra else 0)) * noop_runner.FLOAT32_BYTES for index in range(tensors)
    ]


class Process:
    """A child process whose stdout lines are read as they come, each with its arrival time."""

    def __init__(
        self, command: Sequence[str], log: Path, *, env: Mapping[str, str], stdin: bool = False
    ) -> None:
        self.log = log
        self._lines: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                list(command),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, **env},
                cwd=REPO,
            )
        self._reader = threading.Thread(target=self._read, name=f"stdout-{log.stem}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.process.stdout
        if stdout is None:  # never: Popen was given stdout=PIPE
            return
        for raw in stdout:
            arrived = time.perf_counter()
            with self._changed:
                self._lines.append((arrived, raw.decode("utf-8", errors="replace").rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def stdout(self) -> str:
        """Everything it printed so far."""
        with self._changed:
            return "\n".join(line for _, line in self._lines)

    def wait_line(self, pattern: str, timeout: float) -> tuple[float, re.Match[str]]:
        """The first stdout line matching `pattern` and when it arrived; `BenchmarkError` if none."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for arrived, line in self._lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return arrived, match
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                finished = self.process.poll() is not None and not self._reader.is_alive()
                if remaining <= 0 or finished:
                    break
                self._changed.wait(min(remaining, 0.5))
        raise BenchmarkError(
            f"{self.log.stem}: no line matching {pattern!r} within {timeout:g} s "
            f"(exit code {self.process.poll()}); stdout:\n{self.stdout()}\nstderr tail:\n"
            f"{self.stderr_tail()}"
        )

    def send_line(self, line: str) -> None:
        """Write `line` to its stdin (made with `stdin=True`)."""
        if self.process.stdin is None:
            raise BenchmarkError(f"{self.log.stem}: started without a stdin to write to")
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()

    def stderr_tail(self, lines: int = 20) -> str:
        """The last lines of its stderr log."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, timeout: float) -> int | None:
        """Its exit code, waiting up to `timeout` s; None if it still runs."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; reaped either way."""
        if self.process.poll() is None:
            self.process.terminate()
            if self.wait(15) is None:
                self.process.kill()
                self.process.wait(timeout=15)
        self._reader.join(timeout=5)

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback_: TracebackType | None,
    ) -> None:
        self.stop()


def start_aggregator(
    plan: Path,
    *,
    profile_to: Path | None = None,
    prefix: Sequence[str] = (),
    python: str = sys.executable,
    env: Mapping[str, str] = BENCH_ENV,
) -> tuple[Process, int]:
    """`aggregator start --plan PLAN` as a process that finds the no-op runner; and its port.

    With `profile_to`, it runs under `profiled_aggregator.py`, which writes its statistics there;
    `prefix` runs it under a command that execs it (`ip netns exec NAME`); `python` and `env`:
    another interpreter (`.venv-torch`'s) and its environment.
    """
    command = ["start", "--plan", str(plan), "--log-level", "warning"]
    if profile_to is None:
        command = [python, "-m", "foedus.aggregator", *command]
    else:
        command = [python, str(HERE / "profiled_aggregator.py"), str(profile_to), *command]
    process = Process([*prefix, *command], plan.parent / "aggregator.log", env=env)
    try:
        _, match = process.wait_line(
            r"^serving federation .* on \S+:(\d+): ", START_TIMEOUT_SECONDS
        )
    except BaseException:
        process.stop()
        raise
    return process, int(match.group(1))


def start_raw_server(certs: CertsLayout, folder: Path) -> tuple[Process, int]:
    """The raw gRPC server as a process, with the aggregator's certificate, its durable uploads
    in `folder`/spool; and its port."""
    spool = folder / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    process = Process(
        [
            sys.executable,
            str(HERE / "raw_grpc.py"),
            "--cert",
            str(certs.aggregator_cert),
            "--key",
            str(certs.aggregator_key),
            "--ca",
            str(certs.ca_bundle),
            "--spool",
            str(spool),
        ],
        folder / "raw_server.log",
        env={"PYTHONUNBUFFERED": "1"},
    )
    try:
        _, match = process.wait_line(r"^port (\d+)$", START_TIMEOUT_SECONDS)
    except BaseException:
        process.stop()
        raise
    return process, int(match.group(1))


def make_client(plan: Plan, name: str, port: int) -> AggregatorGRPCClient:
    """A collaborator's client exactly as the plan configures it, to the aggregator's port."""
    return AggregatorGRPCClient.from_plan(plan, name, aggregator_port=port)


def train_result(model: Mapping[str, Array]) -> list[OutgoingTensor]:
    """What the collaborator loop sends after `train`: every tensor tagged trained, and a loss."""
    return [
        *(OutgoingTensor(name, array, tags=("trained",)) for name, array in model.items()),
        OutgoingTensor("loss", np.float32(0.0), tags=("metric",), report=True),
    ]
