"""Health: the plain state, then `grpc.health.v1.Health` on a real aggregator over mutual TLS.

The full-disk test with real processes on a small file system is in `test_operations.py`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from foedus.aggregator.federation import Federation
from foedus.aggregator.health import Health, free_bytes, probe_storage
from foedus.aggregator.records import Array, ResultTensor, RoundCommit, TaskResult
from foedus.aggregator.runtime import Outcome, Runtime
from foedus.aggregator.server import SERVICE, AggregatorGRPCServer
from foedus.aggregator.storage import OutputFolder
from foedus.aggregator.store import MemoryStore
from foedus.pki.layout import CertsLayout
from foedus.pki.local import load_signing_ca
from foedus.pki.requests import Role
from foedus.protos import aggregator_pb2
from foedus.protos.stream import task_results_to_chunks
from foedus.refusals.errors import InvalidRequestError, StorageError

from conftest import Identity, issue_identity
from servers import make_plan, running_aggregator, small_model
from test_server import Caller, connect

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_SECONDS = 30


# --- the plain state ------------------------------------------------------------------------------


def test_serving_only_between_start_and_stop(tmp_path: Path) -> None:
    """Not serving before start; serving once started; never again once stopping."""
    health = Health(tmp_path)
    heard: list[bool] = []
    health.listen(heard.append)
    assert not health.serving
    health.started()
    assert health.serving
    health.stopping()
    assert not health.serving
    health.started()  # a stop is for good
    assert not health.serving
    assert heard == [False, True, False]


def test_a_storage_refusal_fails_storage_and_a_probe_recovers_it(tmp_path: Path) -> None:
    """Only a refusal for storage turns serving off; the recheck turns it on when writing works."""
    folder = tmp_path / "output"
    folder.write_bytes(b"a file where the folder should be")
    health = Health(folder, probe_bytes=4096)
    heard: list[bool] = []
    health.listen(heard.append)
    health.started()
    health.refused("Ping", "PERMISSION_DENIED", InvalidRequestError("not a storage problem"))
    assert health.serving
    health.refused("SendLocalTaskResults", "UNAVAILABLE", StorageError("disk full"))
    health.refused("GetAggregatedModel", "UNAVAILABLE", StorageError("disk full again"))
    assert not health.serving
    assert health.storage_problem == "SendLocalTaskResults: disk full"
    assert not health.recheck()  # the folder still cannot be written
    folder.unlink()
    folder.mkdir()
    assert health.recheck()
    assert health.serving
    assert heard == [False, True, False, True]
    assert list(folder.iterdir()) == []  # the probe file is removed


def test_probe_storage_names_the_folder(tmp_path: Path) -> None:
    """A probe that cannot write says where and why; one that can leaves nothing behind."""
    assert probe_storage(tmp_path, 100_000) is None
    assert list(tmp_path.iterdir()) == []
    assert probe_storage(tmp_path / "made" / "here", 10) is None  # made, as an upload would
    assert list((tmp_path / "made" / "here").iterdir()) == []
    (tmp_path / "file").write_bytes(b"")
    problem = probe_storage(tmp_path / "file" / "sub", 10)
    assert problem is not None and str(tmp_path / "file" / "sub") in problem


def test_free_bytes_of_a_folder(tmp_path: Path) -> None:
    """The free bytes of a real folder are a positive count; an absent one gives NaN, not an error."""
    assert free_bytes(tmp_path) > 0
    assert np.isnan(free_bytes(tmp_path / "absent"))


class FullDiskStore(MemoryStore):
    """Keeps results in memory; closing a round fails with StorageError while `full` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = True
        self.closes = 0

    def commit_round(self, commit: RoundCommit) -> Mapping[str, Array] | None:
        """Fail as a full disk would while `full`; else keep the round."""
        self.closes += 1
        if self.full:
            raise StorageError("state/models/round-1.pbuf: cannot write: No space left on device")
        return super().commit_round(commit)


def test_a_close_that_cannot_be_stored_waits_for_storage(tmp_path: Path) -> None:
    """A round's close that cannot be stored turns the health off instead of ending the
    aggregator; it is not tried again until storage works, then the federation finishes."""
    plan = make_plan(None, federation={"rounds": 1}, aggregator={"quit_grace_seconds": 0})
    store = FullDiskStore()
    federation = Federation(
        collaborators=plan.collaborators,
        tasks=("train",),
        rounds=1,
        model=small_model(),
        store=store,
    )
    health = Health(tmp_path, probe_bytes=4096)
    health.started()
    runtime = Runtime(plan, federation, OutputFolder(tmp_path / "out"), health=health)
    stop = threading.Event()
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(runtime.run(stop)))
    thread.start()
    try:
        for name in plan.collaborators:
            federation.submit(_train_result(name))
        assert _wait(lambda: not health.serving)
        assert health.storage_problem is not None and "No space left" in health.storage_problem
        stop.wait(1.0)  # the runtime ticks 10 times a second meanwhile
        assert store.closes == 1
        assert federation.round_number == 0 and thread.is_alive()
        store.full = False
        assert health.recheck()
        thread.join(timeout=WAIT_SECONDS)
    finally:
        stop.set()
        thread.join(timeout=WAIT_SECONDS)
    assert outcomes and outcomes[0].finished and outcomes[0].rounds_closed == 1
    assert store.closes == 2


def _train_result(name: str) -> TaskResult:
    tensors = tuple(
        ResultTensor(tensor, frozenset(), array + 1) for tensor, array in small_model().items()
    )
    return TaskResult(name, 0, "train", 10, tensors)


def _wait(condition: Callable[[], bool]) -> bool:
    """Poll `condition` until true; False after WAIT_SECONDS (about 0.05 s apart)."""
    pause = threading.Event()
    for _ in range(WAIT_SECONDS * 20):
        if condition():
            return True
        pause.wait(0.05)
    return False


# --- on the wire, over mutual TLS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_identity(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    """A certificate of the federation's CA for a health probe: not a collaborator's name."""
    signing_key, signing_cert = load_signing_ca(certs)
    return issue_identity(
        tmp_path_factory.mktemp("probe"),
        Role.COLLABORATOR,
        "health-probe",
        signing_key=signing_key,
        signing_cert=signing_cert,
    )


def health_stub(
    server: AggregatorGRPCServer, certs: CertsLayout, identity: Identity | None
) -> tuple[health_pb2_grpc.HealthStub, grpc.Channel]:
    """A health client over TLS trusting our CA, presenting `identity` (none: no certificate)."""
    caller = connect(server, certs, identity, "probe")
    return health_pb2_grpc.HealthStub(caller.channel), caller.channel


def check(stub: health_pb2_grpc.HealthStub, service: str = "") -> int:
    """The status a Check of `service` answers."""
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture
def server(certs: CertsLayout, tmp_path: Path) -> Iterator[AggregatorGRPCServer]:
    """A live aggregator of its own, its output in `tmp_path/output`."""
    plan = make_plan(certs, aggregator={"output_dir": str(tmp_path / "output")})
    with running_aggregator(plan) as live:
        yield live


def test_health_serving_over_mutual_tls(
    server: AggregatorGRPCServer, certs: CertsLayout, probe_identity: Identity
) -> None:
    """A probe certificate of the federation's CA reads SERVING for the server and the service."""
    stub, channel = health_stub(server, certs, probe_identity)
    with channel:
        assert check(stub) == SERVING
        assert check(stub, SERVICE) == SERVING
        with pytest.raises(grpc.RpcError) as caught:
            check(stub, "some.other.Service")
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_collaborator_certificate_may_probe(
    server: AggregatorGRPCServer, certs: CertsLayout
) -> None:
    """A collaborator's own certificate reads the health too."""
    alice = Identity(certs.collaborator_cert("alice"), certs.collaborator_key("alice"))
    stub, channel = health_stub(server, certs, alice)
    with channel:
        assert check(stub) == SERVING


def test_probe_certificate_gets_nothing_else(
    server: AggregatorGRPCServer, certs: CertsLayout, probe_identity: Identity
) -> None:
    """The probe's certificate is no collaborator's: the Aggregator service refuses it."""
    caller = connect(server, certs, probe_identity, "health-probe")
    with caller.channel, pytest.raises(grpc.RpcError) as caught:
        caller.stub.Ping(aggregator_pb2.PingRequest(header=caller.header()), timeout=10)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'health-probe' is not an authorised collaborator" in str(caught.value.details())


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_health_refused_in_the_handshake(
    server: AggregatorGRPCServer, certs: CertsLayout, foreign_alice: Identity, who: str
) -> None:
    """Without a certificate of the federation's CA a probe gets no answer: the handshake fails."""
    identity = None if who == "no certificate" else foreign_alice
    stub, channel = health_stub(server, certs, identity)
    with channel, pytest.raises(grpc.RpcError) as caught:
        check(stub)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_not_serving_during_stop(
    certs: CertsLayout, tmp_path: Path, probe_identity: Identity
) -> None:
    """A watcher sees NOT_SERVING as soon as the server starts stopping, within its grace."""
    plan = make_plan(certs, aggregator={"output_dir": str(tmp_path / "output")})
    server = AggregatorGRPCServer(plan, _federation(plan.collaborators))
    server.start()
    stub, channel = health_stub(server, certs, probe_identity)
    stopper = threading.Thread(target=server.stop, args=(WAIT_SECONDS,))
    try:
        with channel:
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=WAIT_SECONDS)
            assert next(watch).status == SERVING
            stopper.start()
            assert next(watch).status == NOT_SERVING
            watch.cancel()
    finally:
        if stopper.is_alive():
            stopper.join(timeout=WAIT_SECONDS)
        else:
            server.stop(0)
    assert not stopper.is_alive()


def test_upload_that_cannot_be_stored_turns_health_off_until_storage_works(
    certs: CertsLayout, tmp_path: Path, probe_identity: Identity
) -> None:
    """An upload refused UNAVAILABLE for storage makes the health NOT_SERVING; once the folder
    can be written again, SERVING, and the same upload is accepted."""
    output = tmp_path / "output"
    output.write_bytes(b"a file where the output folder should be")
    plan = make_plan(certs, aggregator={"output_dir": str(output)})
    federation = _federation(plan.collaborators, store=MemoryStore(upload_folder=output / "state"))
    with running_aggregator(plan, federation) as server:
        stub, channel = health_stub(server, certs, probe_identity)
        alice = connect(
            server,
            certs,
            Identity(certs.collaborator_cert("alice"), certs.collaborator_key("alice")),
            "alice",
        )
        with channel, alice.channel:
            assert check(stub) == SERVING
            with pytest.raises(grpc.RpcError) as caught:
                _upload(alice)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert check(stub) == NOT_SERVING
            assert check(stub, SERVICE) == NOT_SERVING
            output.unlink()
            output.mkdir()
            assert _wait_for(stub, SERVING)  # the storage watch probes every second
            _upload(alice)
        assert [result.collaborator for result in federation.results()] == ["alice"]


def _federation(collaborators: tuple[str, ...], store: MemoryStore | None = None) -> Federation:
    return Federation(
        collaborators=collaborators, tasks=("train",), rounds=1, model=small_model(), store=store
    )


def _upload(caller: Caller) -> None:
    caller.send(task_results_to_chunks(caller.results()))


def _wait_for(stub: health_pb2_grpc.HealthStub, status: int) -> bool:
    """Poll Check until it answers `status`; False after WAIT_SECONDS (about 0.1 s apart)."""
    done = threading.Event()
    for _ in range(WAIT_SECONDS * 10):
        if check(stub) == status:
            return True
        done.wait(0.1)
    return False
