"""Real processes: a director, its aggregators, three envoys and their collaborators, and faults.

The director killed with -9 while two experiments run at once on the same three envoys; an envoy
killed with -9 and started again; an envoy that never returns (gone with its collaborator) beside
an experiment on another site. Each completed run's final model is compared with the same plan's
run alone and undisturbed. Rounds are few and health periods short; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from foedus.director.state import DirectorState
from foedus.pki.layout import CertsLayout
from foedus.processes.children import CHILD_MODULE
from foedus.protos import director_pb2 as pb
from foedus.protos import director_pb2_grpc

from directors import stub_at, submitted_plan, write_config
from envoys import EnvoyProcess, start_envoys, stop_collaborators, stop_envoys
from federation_processes import free_port

REPO = Path(__file__).resolve().parent.parent
RUN_SECONDS = 300
HEALTH_SECONDS = 0.5
ROUNDS = 6
FINAL = {pb.EXPERIMENT_COMPLETED, pb.EXPERIMENT_FAILED, pb.EXPERIMENT_CANCELLED}
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
                [sys.executable, "-m", "foedus.director", "start", "--config", str(self.config)],
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


def kill_recorded_aggregators(state_dir: Path) -> None:
    """Aggregators still running after a failed test: the ones the director recorded, each the
    leader of its own session."""
    if not (state_dir / "director.sqlite").exists():
        return
    state = DirectorState.open(state_dir, health_check_seconds=1)
    try:
        for experiment in state.experiments():
            if experiment.aggregator_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(experiment.aggregator_pid, signal.SIGKILL)
    finally:
        state.close()


@dataclass
class Service:
    """A director process and its three envoy processes, all on 127.0.0.1."""

    director: DirectorProcess
    envoys: dict[str, EnvoyProcess]
    certs: CertsLayout
    folder: Path

    def people(self) -> director_pb2_grpc.DirectorStub:
        """ada's stub to the director."""
        certs = self.certs
        return stub_at(
            self.director.port, certs.ca_bundle, certs.user_cert("ada"), certs.user_key("ada")
        )

    def submit(self, **sections: object) -> str:
        """Submit plans/local.yaml for ROUNDS rounds, `sections` merged in; its id."""
        base: dict[str, object] = {
            "federation": {"rounds": ROUNDS},
            "aggregator": {"quit_grace_seconds": 10},
            "connection": {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        }
        plan = submitted_plan(**{**base, **sections})  # type: ignore[arg-type]
        chunk = pb.SubmitChunk(plan_yaml=yaml.safe_dump(plan))
        return self.people().SubmitExperiment(iter([chunk]), timeout=60).experiment_id

    def follow(
        self, ids: list[str], during: Callable[[dict[str, pb.Experiment]], None] = lambda _: None
    ) -> dict[str, pb.Experiment]:
        """Poll the experiments until each has ended, calling `during` with their states."""
        deadline = time.monotonic() + RUN_SECONDS
        states: dict[str, pb.Experiment] = {}
        while time.monotonic() < deadline:
            try:
                ada = self.people()
                states = {
                    i: ada.GetExperiment(pb.ExperimentRequest(experiment_id=i), timeout=20)
                    for i in ids
                }
            except grpc.RpcError:  # the director is being started again
                time.sleep(0.2)
                continue
            if all(state.state in FINAL for state in states.values()):
                return states
            during(states)
            time.sleep(0.2)
        raise AssertionError(f"timed out after {RUN_SECONDS} s; last states: {states}")

    def download(self, experiment_id: str) -> bytes:
        """The experiment's last model, in chunks, checked against the announced size."""
        chunks = list(
            self.people().DownloadModel(
                pb.DownloadModelRequest(experiment_id=experiment_id, kind=pb.MODEL_KIND_LAST),
                timeout=60,
            )
        )
        data = b"".join(chunk.data for chunk in chunks)
        assert len(data) == chunks[0].total_size
        return data


@contextmanager
def running_service(
    folder: Path,
    certs: CertsLayout,
    *,
    site_runners: dict[str, list[str]] | None = None,
    envoy_keys: Mapping[str, Mapping[str, Any]] | None = None,
    **changes: object,
) -> Iterator[Service]:
    """A director (on a fixed port, so envoys find it again after a restart) and three envoys,
    all online (`site_runners`, `envoy_keys`: their envoy.yaml's, by site; `changes`:
    director.yaml's);
    everything they started is stopped at the end."""
    config = write_config(
        folder / "director",
        certs,
        listen={"address": "127.0.0.1", "port": free_port()},
        aggregator={"listen_address": "127.0.0.1", "ports": list(two_free_ports())},
        health_check_seconds=HEALTH_SECONDS,
        **changes,
    )
    director = DirectorProcess(config, folder / "director")
    director.start()
    envoys = start_envoys(folder / "sites", certs, director.port, site_runners, envoy_keys)
    service = Service(director, {envoy.name: envoy for envoy in envoys}, certs, folder)
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while True:
            try:
                answer = service.people().ListEnvoys(pb.ListEnvoysRequest(), timeout=20)
                listed = list(answer.envoys)
            except grpc.RpcError:
                listed = []
            if len(listed) == 3 and all(envoy.online for envoy in listed):
                break
            assert time.monotonic() < deadline, "the three envoys never came online"
            time.sleep(0.2)
        yield service
    finally:
        stop_envoys(list(service.envoys.values()), folder / "sites")
        director.stop()
        kill_recorded_aggregators(folder / "director" / "state")


def mid_run(state: pb.Experiment) -> bool:
    """Running, its collaborators started, rounds still to go."""
    return state.state == pb.EXPERIMENT_RUNNING and state.rounds_completed < ROUNDS - 2


@pytest.fixture(scope="module")
def undisturbed(director_certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The final model of the plan run alone and undisturbed on the three envoys."""
    with running_service(tmp_path_factory.mktemp("undisturbed"), director_certs) as service:
        experiment_id = service.submit()
        final = service.follow([experiment_id])[experiment_id]
        assert final.state == pb.EXPERIMENT_COMPLETED, final
        return service.download(experiment_id)


def test_two_experiments_at_once_complete_through_a_director_kill_9(
    tmp_path: Path, director_certs: CertsLayout, undisturbed: bytes
) -> None:
    """Two runs of one plan at once on the same three envoys; the director SIGKILLed mid-run and
    started again: both complete, their aggregators adopted, each model as if run alone."""
    with running_service(tmp_path, director_certs) as service:
        ids = [service.submit() for _ in range(2)]
        killed: list[bool] = []

        def kill_the_director(states: dict[str, pb.Experiment]) -> None:
            if not killed and all(mid_run(state) for state in states.values()):
                service.director.kill()
                killed.append(True)
                service.director.start()  # the same command: it finds its experiments again

        states = service.follow(ids, kill_the_director)
        assert killed, "the director was never killed"
        assert [states[i].state for i in ids] == [pb.EXPERIMENT_COMPLETED] * 2, [
            (states[i].state, states[i].reason) for i in ids
        ]
        assert [states[i].rounds_completed for i in ids] == [ROUNDS, ROUNDS]
        assert [service.download(i) for i in ids] == [undisturbed, undisturbed]
        log = (tmp_path / "director" / "director.log").read_text(encoding="utf-8")
        assert "aggregator adopted again" in log


def test_an_envoy_killed_and_started_again_changes_nothing(
    tmp_path: Path, director_certs: CertsLayout, undisturbed: bytes
) -> None:
    """bob's envoy SIGKILLed mid-run and started again with the same command: the experiment
    completes with the undisturbed run's model."""
    with running_service(tmp_path, director_certs) as service:
        experiment_id = service.submit()
        bob = service.envoys["bob"]
        killed: list[bool] = []

        def kill_bob(states: dict[str, pb.Experiment]) -> None:
            if not killed and mid_run(states[experiment_id]):
                bob.kill()
                killed.append(True)
                bob.start()

        final = service.follow([experiment_id], kill_bob)[experiment_id]
        assert killed, "bob's envoy was never killed"
        assert final.state == pb.EXPERIMENT_COMPLETED, final
        assert service.download(experiment_id) == undisturbed
        # The experiment may complete before the restarted envoy (a new Python process, slow to
        # start on a loaded machine) has registered again: its registration is waited for.
        deadline = time.monotonic() + 60
        while bob.text().count("registered with the director") < 2:
            assert time.monotonic() < deadline, bob.text()
            time.sleep(0.1)


def test_an_envoy_that_never_returns_fails_its_experiment_only(
    tmp_path: Path, director_certs: CertsLayout
) -> None:
    """bob's envoy and collaborator SIGKILLed for good: alice and bob's experiment fails within
    its plan's grace (2 s; the director's is 300 s) and the offline period, naming bob, while
    carol's experiment beside it completes."""
    grace = 2.0
    with running_service(
        tmp_path, director_certs, liveness={"offline_grace_seconds": 300}
    ) as service:
        gone = service.submit(
            collaborators=["alice", "bob"],
            federation={"rounds": 50},
            liveness={"offline_grace_seconds": grace},
        )
        beside = service.submit(collaborators=["carol"])
        bob = service.envoys["bob"]
        killed_at: list[float] = []

        def kill_bob_for_good(states: dict[str, pb.Experiment]) -> None:
            if not killed_at and states[gone].state == pb.EXPERIMENT_RUNNING:
                bob.kill()
                stop_collaborators(tmp_path / "sites" / "bob" / "state")
                killed_at.append(time.time())

        states = service.follow([gone, beside], kill_bob_for_good)
        assert killed_at, "bob was never killed"
        failed = states[gone]
        assert failed.state == pb.EXPERIMENT_FAILED, failed
        assert failed.reason.startswith("sites offline for more than 2 s: bob;"), failed.reason
        # Offline after two health periods without a heartbeat, then the grace, then one more
        # health period to notice; 30 s more for a loaded machine (far below the director's 300).
        assert failed.ended_at - killed_at[0] <= 2 * HEALTH_SECONDS + grace + HEALTH_SECONDS + 30
        assert states[beside].state == pb.EXPERIMENT_COMPLETED, states[beside]
        assert states[beside].rounds_completed == ROUNDS


def aggregator_pid(state_dir: Path, experiment_id: str) -> int | None:
    """The pid of the experiment's `aggregator start` process (under its `foedus.processes.child`)."""
    plan = str(state_dir / "experiments" / experiment_id / "plan.yaml")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if CHILD_MODULE.encode() not in command and plan.encode() in command:
            return int(entry.name)
    return None


def test_an_aggregator_killed_is_started_again_and_resumes(
    tmp_path: Path, director_certs: CertsLayout, undisturbed: bytes
) -> None:
    """The experiment's aggregator SIGKILLed mid-run: the director starts it again, it resumes
    from its own state, and the model is the undisturbed run's."""
    with running_service(tmp_path, director_certs) as service:
        experiment_id = service.submit()
        state_dir = tmp_path / "director" / "state"
        killed: list[int] = []

        def kill_the_aggregator(states: dict[str, pb.Experiment]) -> None:
            if not killed and mid_run(states[experiment_id]):
                pid = aggregator_pid(state_dir, experiment_id)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

        final = service.follow([experiment_id], kill_the_aggregator)[experiment_id]
        assert killed, "the aggregator was never killed"
        assert final.state == pb.EXPERIMENT_COMPLETED, final
        assert service.download(experiment_id) == undisturbed
        log = (tmp_path / "director" / "director.log").read_text(encoding="utf-8")
        assert "the aggregator was ended by signal 9; starting it again" in log, log
