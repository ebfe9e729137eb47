"""Test helpers: a real director server on 127.0.0.1 with real certificates, and stubs to call it.

`RecordingLauncher` stands in for the process runner only (no aggregator is started): tests that
drive the lifecycle tell it when an aggregator "ends". Tests with real aggregators use
`LocalLauncher`, the director's own.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from director.config import load_config
from director.launcher import Ended
from director.server import DirectorServer
from pki.layout import CertsLayout
from pki.local import setup_local_federation
from pki.tls import channel_credentials
from protos import director_pb2 as pb
from protos import director_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
ENVOYS = ("alice", "bob", "carol")
STRANGER = "mallory"  # a site certificate from our CA, not in the config's envoys
USERS = ("ada", "bea")
ADMIN = "root"
OUTSIDER = "eve"  # a user certificate from our CA, not in the config


def make_director_certs(root: Path) -> CertsLayout:
    """Certificates for the host 'localhost', its envoys and a stranger, its people and an outsider."""
    layout = CertsLayout(root)
    setup_local_federation(
        layout,
        aggregator_host="localhost",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
        collaborators=(*ENVOYS, STRANGER),
        users=(*USERS, ADMIN, OUTSIDER),
    )
    return layout


def write_config(folder: Path, certs: CertsLayout, **changes: Any) -> Path:
    """A director.yaml on 127.0.0.1, any port, its state in `folder`; `changes` override keys."""
    document: dict[str, Any] = {
        "listen": {"address": "127.0.0.1", "port": 0},
        "host": "localhost",
        "certs_dir": str(certs.root),
        "state_dir": str(folder / "state"),
        "aggregator": {"listen_address": "127.0.0.1", "ports": [60100, 60109]},
        "envoys": list(ENVOYS),
        "users": list(USERS),
        "admins": [ADMIN],
        "review": "auto",
        "health_check_seconds": 1,
        "max_running_experiments": 2,
        "limits": {"max_plan_bytes": 16384, "max_model_bytes": 65536, "chunk_bytes": 4096},
    }
    document.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "director.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@dataclass
class RecordingLauncher:
    """A `Launcher` that starts nothing: it records starts and stops; tests decide the ends."""

    started: list[tuple[str, Path]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    ends: dict[str, Ended] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    def start(self, experiment_id: str, plan: Path, folder: Path) -> int:
        """Record the start."""
        self.started.append((experiment_id, plan))
        self.running.add(experiment_id)
        return 4_000_000 + len(self.started)  # no such process

    def adopt(self, experiment_id: str, folder: Path, pid: int) -> bool:
        """Nothing survives a restart here."""
        return False

    def poll(self, experiment_id: str, folder: Path) -> Ended | None:
        """The end a test set, else running."""
        if experiment_id in self.ends:
            self.running.discard(experiment_id)
            return self.ends.pop(experiment_id)
        return None if experiment_id in self.running else Ended(None)

    def stop(self, experiment_id: str, folder: Path, *, grace_seconds: float = 10.0) -> None:
        """Record the stop."""
        self.stopped.append(experiment_id)
        self.running.discard(experiment_id)


@dataclass
class Director:
    """A running director and what tests need to call it."""

    server: DirectorServer
    certs: CertsLayout
    config_path: Path

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.server.port

    def stub(self, name: str, *, role: str = "user") -> director_pb2_grpc.DirectorStub:
        """A stub calling as `name` (a user/admin's certificate, or a site's with role='envoy')."""
        if role == "envoy":
            cert, key = self.certs.collaborator_cert(name), self.certs.collaborator_key(name)
        else:
            cert, key = self.certs.user_cert(name), self.certs.user_key(name)
        return stub_at(self.port, self.certs.ca_bundle, cert, key)


def stub_at(
    port: int, ca_bundle: Path, cert: Path | None, key: Path | None
) -> director_pb2_grpc.DirectorStub:
    """A stub over a new mTLS channel to 127.0.0.1:port, checking the server's name 'localhost'."""
    channel = grpc.secure_channel(
        f"localhost:{port}",
        channel_credentials(ca_bundle, cert, key),
    )
    return director_pb2_grpc.DirectorStub(channel)


@contextmanager
def running_director(
    folder: Path,
    certs: CertsLayout,
    *,
    launcher: Any = None,
    supervise_seconds: float = 0.05,
    **changes: Any,
) -> Iterator[Director]:
    """A director serving on 127.0.0.1 until the block ends."""
    config = load_config(write_config(folder, certs, **changes))
    server = DirectorServer(
        config,
        launcher=launcher if launcher is not None else RecordingLauncher(),
        supervise_seconds=supervise_seconds,
    )
    server.start()
    try:
        yield Director(server, certs, config.path)
    finally:
        server.stop(0)


def submitted_plan(**sections: Mapping[str, Any]) -> dict[str, Any]:
    """plans/local.yaml without the fields the director owns, sections merged with `sections`."""
    document: dict[str, Any] = yaml.safe_load((REPO / "plans/local.yaml").read_text("utf-8"))
    document.pop("tls")
    document["federation"] = {
        key: value
        for key, value in document["federation"].items()
        if key not in {"uuid", "aggregator_id"}
    }
    document["aggregator"] = {
        key: value
        for key, value in document["aggregator"].items()
        if key not in {"host", "port", "listen_address", "san_dns", "san_ips", "output_dir"}
    }
    for key, value in sections.items():
        base = document.get(key)
        document[key] = {**base, **value} if isinstance(base, dict) else value
    return document


@dataclass
class StandInEnvoys:
    """The test standing in for the sites' envoys (the envoy itself comes later): over real gRPC
    it registers, heartbeats, runs `collaborator start` for each start order, and reports."""

    stubs: Mapping[str, director_pb2_grpc.DirectorStub]
    folder: Path
    processes: dict[tuple[str, str], subprocess.Popen[bytes]] = field(default_factory=dict)
    reported: dict[tuple[str, str], int] = field(default_factory=dict)

    def register(self) -> None:
        """Each envoy registers."""
        for name, stub in self.stubs.items():
            stub.RegisterEnvoy(
                pb.RegisterEnvoyRequest(shard=pb.ShardInfo(description=name)), timeout=20
            )

    def step(self) -> None:
        """One heartbeat each: start what is asked, stop what is asked, report what ended."""
        for name, stub in self.stubs.items():
            listed = [
                pb.CollaboratorReport(experiment_id=experiment_id, state=state)
                for (site, experiment_id), state in self.reported.items()
                if site == name
            ]
            try:
                work = stub.EnvoyHeartbeat(
                    pb.EnvoyHeartbeatRequest(collaborators=listed), timeout=20
                )
            except grpc.RpcError:
                continue  # the director is away (restarting): an envoy just tries again
            if work.register_again:
                stub.RegisterEnvoy(pb.RegisterEnvoyRequest(), timeout=20)
            for order in work.start:
                self._start(stub, name, order)
            for experiment_id in work.stop:
                process = self.processes.get((name, experiment_id))
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(timeout=60)
                self.reported.pop((name, experiment_id), None)
            for (site, experiment_id), process in self.processes.items():
                code = process.poll()
                if (
                    site == name
                    and code is not None
                    and self.reported.get((site, experiment_id)) != pb.COLLABORATOR_EXITED
                    and (site, experiment_id) in self.reported
                ):
                    self.reported[(site, experiment_id)] = pb.COLLABORATOR_EXITED
                    with contextlib.suppress(grpc.RpcError):
                        stub.ReportCollaborator(
                            pb.CollaboratorReport(
                                experiment_id=experiment_id,
                                state=pb.COLLABORATOR_EXITED,
                                exit_code=code,
                            ),
                            timeout=20,
                        )

    def _start(
        self, stub: director_pb2_grpc.DirectorStub, name: str, order: pb.ExperimentToStart
    ) -> None:
        key = (name, order.experiment_id)
        if key in self.processes:
            return
        folder = self.folder / name / order.experiment_id
        folder.mkdir(parents=True, exist_ok=True)
        plan = folder / "plan.yaml"
        plan.write_text(order.plan_yaml, encoding="utf-8")
        with (folder / "collaborator.log").open("ab") as log:
            self.processes[key] = subprocess.Popen(
                [sys.executable, "-m", "collaborator", "start", "-n", name, "--plan", str(plan)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.reported[key] = pb.COLLABORATOR_STARTED
        with contextlib.suppress(grpc.RpcError):
            stub.ReportCollaborator(
                pb.CollaboratorReport(
                    experiment_id=order.experiment_id, state=pb.COLLABORATOR_STARTED
                ),
                timeout=20,
            )

    def stop_all(self) -> None:
        """Kill every collaborator still running (after a failed test) and reap it."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)
