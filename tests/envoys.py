"""Test helpers for envoys: a real director-side gRPC server of the envoy RPCs, and envoy processes.

`RecordingDirector` serves director.proto's four envoy RPCs over mutual TLS with certificates
from our `pki` (it serves with the aggregator's certificate, as a director does), records what
each envoy (by its certificate's CN) sends, and answers with the work a test gives it: starts
repeated until the envoy lists the experiment, stops while it lists them, log requests once.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from foedus.envoy.disclosure import SharedLog
from foedus.envoy.state import EnvoyState
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import server_credentials
from foedus.protos import director_pb2, director_pb2_grpc

from directors import ENVOYS

HEALTH_SECONDS = 0.3
WAIT_SECONDS = 90


@dataclass
class Upload:
    """One UploadLog as received."""

    envoy: str
    request_id: str
    found: bool
    log_size: int
    data: bytes


@dataclass
class Records:
    """What the envoys sent, in order; guarded by `condition`."""

    condition: threading.Condition = field(default_factory=threading.Condition)
    registrations: list[tuple[str, director_pb2.RegisterEnvoyRequest]] = field(default_factory=list)
    heartbeats: list[tuple[str, director_pb2.EnvoyHeartbeatRequest]] = field(default_factory=list)
    reports: list[tuple[str, director_pb2.CollaboratorReport]] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)
    starts: dict[str, list[director_pb2.ExperimentToStart]] = field(default_factory=dict)
    stops: dict[str, set[str]] = field(default_factory=dict)
    log_requests: dict[str, list[director_pb2.LogRequestToEnvoy]] = field(default_factory=dict)


def _caller(context: grpc.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name", [])
    return names[0].decode() if names else ""


class _Servicer(director_pb2_grpc.DirectorServicer):
    def __init__(self, records: Records) -> None:
        self.records = records

    def RegisterEnvoy(  # noqa: N802 - the name is the RPC's
        self, request: director_pb2.RegisterEnvoyRequest, context: grpc.ServicerContext
    ) -> director_pb2.RegisterEnvoyResponse:
        name = _caller(context)
        with self.records.condition:
            self.records.registrations.append((name, request))
            self.records.registered.add(name)
            self.records.condition.notify_all()
        return director_pb2.RegisterEnvoyResponse(health_check_seconds=HEALTH_SECONDS)

    def EnvoyHeartbeat(  # noqa: N802 - the name is the RPC's
        self, request: director_pb2.EnvoyHeartbeatRequest, context: grpc.ServicerContext
    ) -> director_pb2.EnvoyHeartbeatResponse:
        name = _caller(context)
        records = self.records
        with records.condition:
            records.heartbeats.append((name, request))
            records.condition.notify_all()
            if name not in records.registered:
                return director_pb2.EnvoyHeartbeatResponse(
                    register_again=True, health_check_seconds=HEALTH_SECONDS
                )
            listed = {report.experiment_id for report in request.collaborators}
            starts = [s for s in records.starts.get(name, []) if s.experiment_id not in listed]
            stops = sorted(records.stops.get(name, set()) & listed)
            logs = records.log_requests.pop(name, [])
        return director_pb2.EnvoyHeartbeatResponse(
            health_check_seconds=HEALTH_SECONDS, start=starts, stop=stops, log_requests=logs
        )

    def ReportCollaborator(  # noqa: N802 - the name is the RPC's
        self, request: director_pb2.CollaboratorReport, context: grpc.ServicerContext
    ) -> director_pb2.ReportCollaboratorResponse:
        with self.records.condition:
            self.records.reports.append((_caller(context), request))
            self.records.condition.notify_all()
        return director_pb2.ReportCollaboratorResponse()

    def UploadLog(  # noqa: N802 - the name is the RPC's
        self, request_iterator: Iterator[director_pb2.LogUpload], context: grpc.ServicerContext
    ) -> director_pb2.UploadLogResponse:
        messages = list(request_iterator)
        first = messages[0]
        upload = Upload(
            envoy=_caller(context),
            request_id=first.request_id,
            found=first.found,
            log_size=first.log_size,
            data=b"".join(message.data for message in messages),
        )
        with self.records.condition:
            self.records.uploads.append(upload)
            self.records.condition.notify_all()
        return director_pb2.UploadLogResponse()


class RecordingDirector:
    """The envoy side of a director on 127.0.0.1:`port`; `start` and `stop` it (again) at will."""

    def __init__(self, certs: CertsLayout, port: int, *, require_client_auth: bool = True) -> None:
        self.certs = certs
        self.port = port
        self.require_client_auth = require_client_auth
        self.records = Records()
        self._server: grpc.Server | None = None

    def start(self) -> None:
        """Serve (again) on the same port; what it records is kept, registrations are not."""
        with self.records.condition:
            self.records.registered.clear()  # a restarted director does not know the envoys
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        director_pb2_grpc.add_DirectorServicer_to_server(_Servicer(self.records), server)
        credentials = server_credentials(
            self.certs.aggregator_cert,
            self.certs.aggregator_key,
            self.certs.ca_bundle,
            require_client_auth=self.require_client_auth,
        )
        bound = server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        assert bound == self.port, f"could not bind 127.0.0.1:{self.port}"
        server.start()
        self._server = server

    def stop(self) -> None:
        """Stop serving at once."""
        if self._server is not None:
            self._server.stop(grace=None).wait(timeout=10)
            self._server = None

    def give_start(self, envoy: str, experiment_id: str, plan_yaml: str, name: str = "") -> None:
        """Ask `envoy` to run a collaborator for the experiment (repeated until it lists it)."""
        order = director_pb2.ExperimentToStart(
            experiment_id=experiment_id,
            name=name or experiment_id,
            owner="dora",
            plan_yaml=plan_yaml,
            collaborator_name=envoy,
        )
        with self.records.condition:
            self.records.starts.setdefault(envoy, []).append(order)

    def give_stop(self, envoy: str, experiment_id: str) -> None:
        """Tell `envoy` the experiment has ended (while it lists it)."""
        with self.records.condition:
            self.records.stops.setdefault(envoy, set()).add(experiment_id)

    def ask_log(self, envoy: str, request_id: str, experiment_id: str, offset: int = 0) -> None:
        """Ask `envoy` for a log with its next heartbeat."""
        order = director_pb2.LogRequestToEnvoy(
            request_id=request_id, experiment_id=experiment_id, offset=offset, max_bytes=1 << 20
        )
        with self.records.condition:
            self.records.log_requests.setdefault(envoy, []).append(order)

    def wait_for(
        self, what: str, check: Callable[[Records], Any], timeout: float = WAIT_SECONDS
    ) -> Any:
        """Wait until `check(records)` is truthy (its value); fail naming `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        with self.records.condition:
            while True:
                value = check(self.records)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self.records.condition.wait(min(left, 0.5))

    def states(self, envoy: str, experiment_id: str) -> list[int]:
        """The states `envoy` reported for the experiment with ReportCollaborator, in order."""
        with self.records.condition:
            return [
                report.state
                for name, report in self.records.reports
                if name == envoy and report.experiment_id == experiment_id
            ]

    def last_report(self, envoy: str, experiment_id: str) -> director_pb2.CollaboratorReport | None:
        """The last ReportCollaborator of `envoy` on the experiment."""
        with self.records.condition:
            found = [
                report
                for name, report in self.records.reports
                if name == envoy and report.experiment_id == experiment_id
            ]
        return found[-1] if found else None

    def wait_for_state(
        self,
        envoy: str,
        experiment_id: str,
        state: int,
        timeout: float = WAIT_SECONDS,
        after: int = 0,
    ) -> director_pb2.CollaboratorReport:
        """Wait for a report of `state` (among reports number `after` on); that report."""

        def check(records: Records) -> director_pb2.CollaboratorReport | None:
            for name, report in records.reports[after:]:
                if (
                    name == envoy
                    and report.experiment_id == experiment_id
                    and report.state == state
                ):
                    return report
            return None

        name = director_pb2.CollaboratorState.Name(state)  # type: ignore[arg-type]
        return self.wait_for(f"{envoy} to report {name} for {experiment_id}", check, timeout)


def write_envoy_config(folder: Path, certs: CertsLayout, port: int, **keys: Any) -> Path:
    """An envoy.yaml for a director on 127.0.0.1:`port` (dialed as localhost); `keys` override."""
    document: dict[str, Any] = {
        "director": {"host": "localhost", "port": port},
        "certs_dir": str(certs.root),
        "state_dir": str(folder / "state"),
        "runners": ["digits"],
        "shard": {
            "description": "test shard",
            "train_samples": 1200,
            "valid_samples": 300,
            "labels": {"modality": "digits"},
        },
        "connection": {
            "deadline_seconds": 10,
            "backoff_initial_seconds": 0.1,
            "backoff_max_seconds": 0.5,
        },
    }
    document.update(keys)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "envoy.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@dataclass
class EnvoyProcess:
    """One `envoy start` process; its stderr goes to `log`."""

    name: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (again) with the same command."""
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "foedus.envoy",
                    "start",
                    "-n",
                    self.name,
                    "--config",
                    str(self.config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def text(self) -> str:
        """What it logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL it and reap it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=timeout)

    def alive(self) -> bool:
        """Whether it still runs."""
        return self.process is not None and self.process.poll() is None


def stop_collaborators(state_dir: Path) -> None:
    """Kill what collaborators an envoy left running (after a test), by their recorded parents."""
    if not (state_dir / "envoy.sqlite").exists():
        return
    state = EnvoyState.open(state_dir, exclusive=False)
    try:
        pids = [e.pid for e in state.experiments() if e.pid is not None]
    finally:
        state.close()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def kill_collaborator_process(state_dir: Path, experiment_id: str) -> int:
    """SIGKILL the collaborator an envoy runs for `experiment_id` (not its `foedus.processes.child`
    parent, which records how it ended), as an OOM kill would; its pid."""
    state = EnvoyState.open(state_dir, exclusive=False)
    try:
        parent = state.experiment(experiment_id).pid
    finally:
        state.close()
    assert parent is not None, f"{experiment_id}: no process recorded"
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text(encoding="ascii").split()
    assert len(children) == 1, f"{experiment_id}: foedus.processes.child {parent} has {children}"
    pid = int(children[0])
    os.kill(pid, signal.SIGKILL)
    return pid


def start_envoys(
    folder: Path,
    certs: CertsLayout,
    port: int,
    runners: dict[str, list[str]] | None = None,
    keys: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[EnvoyProcess]:
    """One envoy process per site, each with its own folder and envoy.yaml (`keys`: more keys
    of its envoy.yaml, by site)."""
    envoys = []
    for name in ENVOYS:
        config = write_envoy_config(
            folder / name,
            certs,
            port,
            runners=(runners or {}).get(name, ["digits"]),
            shard={"description": f"{name}'s digits"},
            **(keys or {}).get(name, {}),
        )
        envoy = EnvoyProcess(name, config, folder / name / "envoy.log")
        envoy.start()
        envoys.append(envoy)
    return envoys


def stop_envoys(envoys: list[EnvoyProcess], folder: Path) -> None:
    """Stop the envoys and whatever collaborators they left."""
    for envoy in envoys:
        if envoy.alive():
            envoy.terminate()
        stop_collaborators(folder / envoy.name / "state")


def plan_text(path: Path) -> str:
    """A plan file's text, as a director sends it."""
    return path.read_text(encoding="utf-8")


def load_yaml(path: Path) -> Mapping[str, Any]:
    """A YAML file's document."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def read_all(shared: SharedLog, path: Path, offset: int = 0, most: int = 1 << 20) -> bytes:
    """A log as a site shares it, from `offset`, asked for `most` bytes at a time as the director
    does; each answer's size is checked against what it holds."""
    data = b""
    for _ in range(100_000):
        size, piece = shared.read(path, offset + len(data), most)
        assert size >= offset + len(data) + len(piece)
        if not piece:
            return data
        data += piece
    raise AssertionError("the log never ended")
