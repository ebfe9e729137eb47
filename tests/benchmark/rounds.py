"""Whole rounds, measured: collaborator threads running the real loop around one aggregator.

A plan with `secure_aggregation` on gives each collaborator thread the real secure rounds too
(`foedus.collaborator.secure.SecureRounds`, its round files under the plan's folder), timed; one
with `differential_privacy` on has each site clip its update, as `collaborator start` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor, Tasks
from foedus.collaborator.loop import run_collaborator
from foedus.collaborator.secure import SecureRounds, SiteIdentity
from foedus.collaborator.secure_state import RoundFiles
from foedus.plans import Plan, load_plan
from foedus.plans.runners import Array

# isort: split
# The benchmark's own modules, beside this file.
import noop_runner
from harness import (
    MIB,
    BenchmarkError,
    MemorySampler,
    Process,
    Run,
    cpu_seconds,
    cpu_spent,
    limits_for,
    own_cpu_seconds,
    peak_rss_mb,
    start_aggregator,
    tensor_byte_sizes,
    write_plan,
)

JOIN_SECONDS = 60.0  # for every collaborator thread to end after the round, all together


class TimedClient(AggregatorGRPCClient):
    """The real client, noting when it downloads and uploads and counting its `get_tasks`.

    With a `gate`, `get_tasks` after the upload waits for it, so the aggregator cannot finish
    (and exit) before its memory is read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measured_round = 0  # marks are noted in this round only
        self.marks: dict[str, float] = {}
        self.get_tasks_calls = 0
        self.upload_bytes: int | None = None  # the tensors' bytes of the measured round's upload
        self.gate: threading.Event | None = None
        self.gate_timeout = 600.0

    def get_tasks(self) -> Tasks:
        """As the client's, but held at the gate (if any) once this collaborator has uploaded."""
        if self.gate is not None and "upload_end" in self.marks:
            self.gate.wait(self.gate_timeout)
        self.get_tasks_calls += 1
        return super().get_tasks()

    def get_aggregated_model(self, names: Sequence[str], round_number: int) -> Any:
        """As the client's, noting the first start and the last end (in the measured round)."""
        measured = round_number == self.measured_round
        if measured:
            self.marks.setdefault("download_start", time.perf_counter())
        try:
            return super().get_aggregated_model(names, round_number)
        finally:
            if measured:
                self.marks["download_end"] = time.perf_counter()

    def send_local_task_results(
        self, round_number: int, task_name: str, data_size: int, tensors: Sequence[OutgoingTensor]
    ) -> None:
        """As the client's, noting its start and end (in the measured round)."""
        measured = round_number == self.measured_round
        if measured:
            self.marks["upload_start"] = time.perf_counter()
            # The values' bytes; each tensor's frame (name, shape, dtype, tags) adds a few dozen.
            self.upload_bytes = sum(np.asarray(tensor.array).nbytes for tensor in tensors)
        super().send_local_task_results(round_number, task_name, data_size, tensors)
        if measured:
            self.marks["upload_end"] = time.perf_counter()


class TimedSecureRounds(SecureRounds):
    """The real secure rounds of one site, noting in its client's marks (in the measured round)
    when its key setup and share exchange (`before_train`), its masking and its SURVIVORS and
    UNMASK (`after_round`) start and end, and its own thread's CPU in each (`*_cpu`): what the
    site would spend on a machine of its own, where the benchmark runs every site on 2 cores."""

    def __init__(
        self, client: TimedClient, plan: Plan, name: str, identity: SiteIdentity, files: RoundFiles
    ) -> None:
        super().__init__(client, plan, name, identity, files)
        self.timed = client

    @contextmanager
    def _timing(self, round_number: int, label: str) -> Iterator[None]:
        marks = self.timed.marks if round_number == self.timed.measured_round else {}
        marks.setdefault(f"{label}_start", time.perf_counter())
        cpu = time.thread_time()
        try:
            yield
        finally:
            marks[f"{label}_cpu"] = marks.get(f"{label}_cpu", 0.0) + time.thread_time() - cpu
            marks[f"{label}_end"] = time.perf_counter()

    def before_train(self, round_number: int) -> None:
        """KEYS and SHARES, timed."""
        with self._timing(round_number, "setup"):
            super().before_train(round_number)

    def masked_results(
        self,
        round_number: int,
        global_model: Mapping[str, Array],
        trained: Mapping[str, Array],
        data_size: int,
    ) -> tuple[list[OutgoingTensor], int]:
        """The masked update, timed."""
        with self._timing(round_number, "mask"):
            return super().masked_results(round_number, global_model, trained, data_size)

    def after_round(self, round_number: int) -> None:
        """SURVIVORS and UNMASK, timed."""
        with self._timing(round_number, "unmask"):
            super().after_round(round_number)


class WarningCounter(logging.Handler):
    """Counts the client's and loop's warnings (retries, missed rounds) without printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: str | None = None
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.count += 1
            if self.first is None:
                self.first = record.getMessage()


@contextmanager
def counting_warnings() -> Iterator[WarningCounter]:
    """Count warnings of `collaborator.*` while inside."""
    counter = WarningCounter()
    logger = logging.getLogger("collaborator")
    previous = logger.propagate
    logger.addHandler(counter)
    logger.propagate = False
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.propagate = previous


@dataclass
class RoundOutcome:
    """What one measured round gave; times in seconds, None when the round did not close."""

    collaborators: int
    connect_seconds: float | None  # every client's TLS handshake and Ping, before the round
    round_seconds: float | None  # first download to the aggregator's round line
    wall_seconds: float | None  # all collaborators released to the round line
    aggregator_seconds: float | None  # the round's duration as the aggregator printed it
    aggregator_cpu_seconds: tuple[float, float] | None  # (user, system), release to the line
    client_cpu_seconds: tuple[float, float] | None  # this process's (all collaborators'), the same
    peak_rss_mb: float | None
    rss_until_last_download_mb: float | None  # sampled peak while the model is downloaded
    rss_until_last_upload_mb: float | None  # sampled peak while results arrive
    rss_after_last_upload_mb: float | None  # sampled peak while the round closes
    errors: list[str]
    get_tasks_calls: int  # by every collaborator, quits included
    warnings: int
    first_warning: str | None
    download_seconds_max: float | None  # the slowest collaborator's whole-model download
    upload_seconds_max: float | None  # the slowest collaborator's upload
    close_after_last_upload_seconds: float | None  # last upload answered to the round line
    aggregator_exit: int | None
    round_line: str | None = None  # the aggregator's line for the measured round
    upload_bytes: int | None = None  # the largest upload's tensor bytes in the measured round
    marks: list[dict[str, float]] = field(default_factory=list)  # each collaborator's marks


def measure_round(
    run: Run,
    phase: str,
    names: Sequence[str],
    *,
    model_mb: float,
    tensors: int,
    hold: bool = True,
    profile_to: Path | None = None,
    rounds: int = 1,
    runner_settings: Mapping[str, object] | None = None,
    secure: Mapping[str, object] | None = None,
    privacy: Mapping[str, object] | None = None,
) -> RoundOutcome:
    """The last of `rounds` rounds of `train`, a collaborator thread per name running the real loop.

    With `hold`, each collaborator's next `GetTasks` after its upload waits until the round's
    figures are read (see `TimedClient`); without, the loop runs as it would in production.
    With `rounds` > 1 the rounds before the measured one run untimed: the measured one finds
    the processes' memory and connections warm, as every round after a federation's first.
    `runner_settings`, `secure` and `privacy` go into the plan (`write_plan`).
    """
    size = int(model_mb * MIB)
    largest = max(tensor_byte_sizes(size, tensors))
    plan_path = write_plan(
        run,
        phase,
        names,
        model_mb=model_mb,
        tensors=tensors,
        limits=limits_for(largest, size),
        rounds=rounds,
        runner_settings=runner_settings,
        secure=secure,
        privacy=privacy,
    )
    plan = load_plan(plan_path)
    noop_runner.NoopRunner.initial_model(plan.runner)  # built once here, not in every thread
    aggregator, port = start_aggregator(plan_path, profile_to=profile_to)
    with aggregator:
        return MeasuredRound(plan, port, run.args.round_timeout, hold=hold).run(aggregator)


class MeasuredRound:
    """Collaborator threads (each its own `TimedClient`) around one aggregator's round."""

    def __init__(self, plan: Plan, port: int, timeout: float, *, hold: bool) -> None:
        self.plan = plan
        self.timeout = timeout
        self.rounds = plan.federation.rounds  # the last one is measured
        self.gate = threading.Event()  # opened once the round's figures are read
        self.go = threading.Event()  # every collaborator has connected: start the round
        self.ready = threading.Semaphore(0)
        self.errors: list[str] = []
        self.clients: list[TimedClient] = []
        self.secure: dict[str, SecureRounds] = {}
        for name in plan.collaborators:
            client = TimedClient.from_plan(plan, name, aggregator_port=port)
            client.gate = self.gate if hold else None
            client.gate_timeout = timeout
            client.measured_round = self.rounds - 1
            self.clients.append(client)
            if plan.secure_aggregation.enabled:
                self.secure[name] = secure_rounds(plan, client, name)
        self.outcome = RoundOutcome(
            collaborators=len(self.clients),
            connect_seconds=None,
            round_seconds=None,
            wall_seconds=None,
            aggregator_seconds=None,
            aggregator_cpu_seconds=None,
            client_cpu_seconds=None,
            peak_rss_mb=None,
            rss_until_last_download_mb=None,
            rss_until_last_upload_mb=None,
            rss_after_last_upload_mb=None,
            errors=self.errors,
            get_tasks_calls=0,
            warnings=0,
            first_warning=None,
            download_seconds_max=None,
            upload_seconds_max=None,
            close_after_last_upload_seconds=None,
            aggregator_exit=None,
        )

    def collaborator(self, client: TimedClient) -> None:
        """One collaborator thread: connect, wait for the start, run the real loop to quit."""
        try:
            try:
                client.ping()  # the TLS handshake, before the round is timed
            finally:
                self.ready.release()
            self.go.wait()
            runner = noop_runner.NoopRunner(
                self.plan.runner,
                collaborator=client.settings.collaborator_name,
                collaborators=self.plan.collaborators,
            )
            name = client.settings.collaborator_name
            privacy = self.plan.differential_privacy
            report = run_collaborator(
                client,
                runner,
                self.plan.runner,
                secure=self.secure.get(name),
                clip=privacy.clip if privacy.enabled else None,  # as `collaborator start`
            )
            if not report.quit:
                self.errors.append(f"{client.settings.collaborator_name}: stopped without quit")
        except Exception as error:  # counted: the round's errors
            self.errors.append(f"{client.settings.collaborator_name}: {error!r}")
        finally:
            client.disconnect()

    def run(self, aggregator: Process) -> RoundOutcome:
        """Connect everyone, start the round, read the figures when it closes, let all quit."""
        threads = [
            threading.Thread(target=self.collaborator, args=(c,), name=c.settings.collaborator_name)
            for c in self.clients
        ]
        with counting_warnings() as warnings:
            try:
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                for _ in threads:
                    if not self.ready.acquire(timeout=self.timeout):
                        raise BenchmarkError("the collaborators did not connect in time")
                self.outcome.connect_seconds = time.perf_counter() - started
                self.observe(aggregator)
            finally:
                self.gate.set()
                self.go.set()
                # One deadline for all: a round that did not close may leave many stuck.
                deadline = time.monotonic() + JOIN_SECONDS
                for thread in threads:
                    thread.join(timeout=max(0.0, deadline - time.monotonic()))
            self.outcome.aggregator_exit = aggregator.wait(60)
        self.outcome.warnings, self.outcome.first_warning = warnings.count, warnings.first
        self.outcome.get_tasks_calls = sum(client.get_tasks_calls for client in self.clients)
        self.outcome.download_seconds_max = self.longest("download_start", "download_end")
        self.outcome.upload_seconds_max = self.longest("upload_start", "upload_end")
        self.outcome.marks = [dict(client.marks) for client in self.clients]
        sizes = [client.upload_bytes for client in self.clients if client.upload_bytes is not None]
        self.outcome.upload_bytes = max(sizes, default=None)
        return self.outcome

    def observe(self, aggregator: Process) -> None:
        """Start the round and wait for the aggregator's round line; read time, CPU, memory."""
        outcome = self.outcome
        aggregator_cpu = cpu_seconds(aggregator.pid)
        client_cpu = own_cpu_seconds()
        with MemorySampler(aggregator.pid) as memory:
            released = time.perf_counter()
            self.go.set()
            try:
                closed_at, match = aggregator.wait_line(
                    rf"^round {self.rounds}/{self.rounds} .*?(\d+\.\d+) s$", self.timeout
                )
            except BenchmarkError as error:
                self.errors.append(f"the round did not close: {str(error).splitlines()[0]}")
                return
            # Held, nobody can quit yet; else the process may be ending: then the sampled peak.
            outcome.peak_rss_mb = peak_rss_mb(aggregator.pid) or memory.peak()
            aggregator_cpu_end = cpu_seconds(aggregator.pid)
        if aggregator_cpu is not None and aggregator_cpu_end is not None:
            outcome.aggregator_cpu_seconds = cpu_spent(aggregator_cpu_end, aggregator_cpu)
        outcome.client_cpu_seconds = cpu_spent(own_cpu_seconds(), client_cpu)
        starts = self.marks("download_start")
        first = min(starts, default=released)  # the measured round's first download
        outcome.round_seconds = closed_at - first
        outcome.wall_seconds = closed_at - released
        outcome.aggregator_seconds = float(match.group(1))
        outcome.round_line = match.string
        uploaded = self.marks("upload_end")
        if uploaded:
            last_upload = max(uploaded)
            outcome.close_after_last_upload_seconds = closed_at - last_upload
            outcome.rss_until_last_upload_mb = memory.peak(start=first, end=last_upload)
            outcome.rss_after_last_upload_mb = memory.peak(start=last_upload)
        downloaded = self.marks("download_end")
        if downloaded:
            outcome.rss_until_last_download_mb = memory.peak(start=first, end=max(downloaded))

    def marks(self, mark: str) -> list[float]:
        """The times every client noted `mark`."""
        return [client.marks[mark] for client in self.clients if mark in client.marks]

    def longest(self, start: str, end: str) -> float | None:
        """The longest time from `start` to `end` among the clients."""
        return max(
            (c.marks[end] - c.marks[start] for c in self.clients if end in c.marks),
            default=None,
        )


def secure_rounds(plan: Plan, client: TimedClient, name: str) -> SecureRounds:
    """Site `name`'s timed secure rounds, as `collaborator start` makes them: its certificate and
    key, the federation's CA, its round files in the plan's folder's `collaborator-state/NAME`."""
    certs = plan.tls.certs
    if certs is None:
        raise BenchmarkError("a secure plan needs the federation's certificates (tls.certs_dir)")
    identity = SiteIdentity.from_files(
        certs.collaborator_cert(name), certs.collaborator_key(name), certs.ca_bundle
    )
    files = RoundFiles(plan.path.parent / "collaborator-state" / name, plan.federation.uuid, name)
    files.prepare()
    return TimedSecureRounds(client, plan, name, identity, files)
