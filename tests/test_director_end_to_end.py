"""Real processes: a director, its aggregators, collaborators; the director killed with -9 mid-run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from director.state import DirectorState
from pki.layout import CertsLayout
from protos import director_pb2 as pb
from protos import director_pb2_grpc

from directors import (
    ENVOYS,
    StandInEnvoys,
    make_director_certs,
    stub_at,
    submitted_plan,
    write_config,
)

REPO = Path(__file__).resolve().parent.parent
RUN_SECONDS = 300
pytestmark = pytest.mark.slow


def two_free_ports() -> tuple[int, int]:
    """Two neighbouring TCP ports on 127.0.0.1 that nothing listens on right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first: int = probe.getsockname()[1]
        if first >= 65535:
            continue
        with socket.socket() as one, socket.socket() as two:
            try:
                one.bind(("127.0.0.1", first))
                two.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first, first + 1
    raise AssertionError("no two neighbouring free ports")


class DirectorProcess:
    """`director start` as a real process, started again at will."""

    def __init__(self, config: Path, folder: Path) -> None:
        self.config = config
        self.folder = folder
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> int:
        """Start it and read its port from its first line."""
        with (self.folder / "director.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "director", "start", "--config", str(self.config)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
                start_new_session=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("director: serving on "), line
        self.port = int(line.rsplit(":", 1)[1])
        return self.port

    def kill(self) -> None:
        """SIGKILL it (not its aggregators: they run in sessions of their own)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def stop(self) -> None:
        """SIGTERM and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module")
def director_certs(tmp_path_factory: pytest.TempPathFactory) -> CertsLayout:
    """Certificates of a director on localhost, its envoys and people."""
    return make_director_certs(tmp_path_factory.mktemp("director-certs"))


@pytest.fixture
def director(tmp_path: Path, director_certs: CertsLayout) -> Iterator[DirectorProcess]:
    """A director process with room for two experiments at once on two ports."""
    config = write_config(
        tmp_path,
        director_certs,
        aggregator={"listen_address": "127.0.0.1", "ports": list(two_free_ports())},
    )
    process = DirectorProcess(config, tmp_path)
    process.start()
    yield process
    process.stop()
    # Aggregators still running after a failed test: the ones this director recorded, each the
    # leader of its own session.
    state = DirectorState.open(tmp_path / "state", health_check_seconds=1)
    try:
        for experiment in state.experiments():
            if experiment.aggregator_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(experiment.aggregator_pid, signal.SIGKILL)
    finally:
        state.close()


def people_stub(director: DirectorProcess, certs: CertsLayout) -> director_pb2_grpc.DirectorStub:
    """ada's stub to the director's current port."""
    return stub_at(director.port, certs.ca_bundle, certs.user_cert("ada"), certs.user_key("ada"))


def envoy_stubs(
    director: DirectorProcess, certs: CertsLayout
) -> dict[str, director_pb2_grpc.DirectorStub]:
    """Each site's stub to the director's current port."""
    return {
        name: stub_at(
            director.port,
            certs.ca_bundle,
            certs.collaborator_cert(name),
            certs.collaborator_key(name),
        )
        for name in ENVOYS
    }


def download(stub: director_pb2_grpc.DirectorStub, experiment_id: str) -> bytes:
    """The experiment's last model, in chunks, checked against the announced size."""
    chunks = list(
        stub.DownloadModel(
            pb.DownloadModelRequest(experiment_id=experiment_id, kind=pb.MODEL_KIND_LAST),
            timeout=60,
        )
    )
    data = b"".join(chunk.data for chunk in chunks)
    assert len(data) == chunks[0].total_size
    return data


def test_two_experiments_complete_through_a_director_kill_9(
    tmp_path: Path, director: DirectorProcess, director_certs: CertsLayout
) -> None:
    """Two runs of one plan at once; the director SIGKILLed mid-run and started again: both
    complete, their aggregators adopted, and their final models are byte-identical."""
    envoys = StandInEnvoys(envoy_stubs(director, director_certs), tmp_path / "sites")
    envoys.register()
    ada = people_stub(director, director_certs)
    plan = yaml.safe_dump(
        submitted_plan(
            federation={"rounds": 8},
            aggregator={"quit_grace_seconds": 10},
            connection={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        )
    )
    ids = [
        ada.SubmitExperiment(iter([pb.SubmitChunk(plan_yaml=plan)]), timeout=60).experiment_id
        for _ in range(2)
    ]
    killed = False
    deadline = time.monotonic() + RUN_SECONDS
    states: dict[str, pb.Experiment] = {}
    try:
        while time.monotonic() < deadline:
            envoys.step()
            try:
                states = {
                    i: ada.GetExperiment(pb.ExperimentRequest(experiment_id=i), timeout=20)
                    for i in ids
                }
            except grpc.RpcError:
                time.sleep(0.2)
                continue
            if all(
                state.state in {pb.EXPERIMENT_COMPLETED, pb.EXPERIMENT_FAILED}
                for state in states.values()
            ):
                break
            # Mid-run: both aggregators serving, their collaborators started, rounds to go.
            if not killed and all(
                state.state == pb.EXPERIMENT_RUNNING and state.rounds_completed < 8
                for state in states.values()
            ):
                director.kill()
                killed = True
                director.start()  # the same command: it finds its experiments again
                ada = people_stub(director, director_certs)
                envoys.stubs = envoy_stubs(director, director_certs)
            time.sleep(0.2)
        assert killed, "the director was never killed"
        assert [states[i].state for i in ids] == [pb.EXPERIMENT_COMPLETED] * 2, [
            (states[i].state, states[i].reason) for i in ids
        ]
        assert [states[i].rounds_completed for i in ids] == [8, 8]
        assert download(ada, ids[0]) == download(ada, ids[1])
        log = (tmp_path / "director.log").read_text(encoding="utf-8")
        assert "aggregator adopted again" in log
    finally:
        envoys.stop_all()
