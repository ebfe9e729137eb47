"""AggregatorGRPCClient against real aggregators over real mutual TLS: answers, refusals, retries, resend."""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from foedus.aggregator.federation import Federation
from foedus.aggregator.identity import Gatekeeper
from foedus.aggregator.records import Array
from foedus.aggregator.server import AggregatorGRPCServer
from foedus.aggregator.servicer import AggregatorServicer
from foedus.collaborator.client import LEAVE_SECONDS, AggregatorGRPCClient, OutgoingTensor, Tasks
from foedus.collaborator.errors import (
    AggregatorUnavailableError,
    ClientConfigurationError,
    RequestRejectedError,
    ResponseValidationError,
)
from foedus.collaborator.settings import ClientSettings
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import server_credentials
from foedus.plans import Plan
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc, base_pb2
from foedus.protos.channel import server_options

from conftest import Identity
from servers import (
    AGGREGATOR_ID,
    FEDERATION_UUID,
    TASKS,
    make_federation,
    make_plan,
    running_aggregator,
    small_model,
)

MIB = 1024 * 1024
BIG_ELEMENTS = 16 * MIB  # float32: 64 MiB


class Sleeps:
    """An injectable sleep that records each delay, really waits only when told to, and can act."""

    def __init__(self, *, real: bool = False, then: Callable[[], object] | None = None) -> None:
        self.delays: list[float] = []
        self.real = real
        self.then = then

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.real:
            time.sleep(delay)
        if self.then is not None:
            self.then()


def client_for(
    plan: Plan, port: int, name: str = "alice", **overrides: Any
) -> AggregatorGRPCClient:
    """A client for `plan` that dials 127.0.0.1:`port`, with a recording sleep unless overridden."""
    settings: dict[str, Any] = {
        "aggregator_address": "127.0.0.1",
        "aggregator_port": port,
        "sleep": Sleeps(),
    }
    settings.update(overrides)
    return AggregatorGRPCClient.from_plan(plan, name, **settings)


def free_port() -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def trained(model: dict[str, Array]) -> list[OutgoingTensor]:
    """Results of a `train` task: every model tensor changed, same dtype, plus a float32 metric."""
    tensors = [
        OutgoingTensor(name, (array + 1).astype(array.dtype), tags=("trained",))
        for name, array in model.items()
    ]
    return [
        *tensors,
        OutgoingTensor("train_loss", np.float32(0.875), tags=("metric",), report=True),
    ]


def assert_stored_as_sent(
    federation: Federation, sent: list[OutgoingTensor], data_size: int
) -> None:
    """The federation holds exactly one `train` result of alice, byte for byte what was sent."""
    (stored,) = federation.results()
    assert (stored.collaborator, stored.round_number, stored.task_name) == ("alice", 0, "train")
    assert stored.data_size == data_size
    by_name = {tensor.name: tensor for tensor in stored.tensors}
    assert sorted(by_name) == sorted(tensor.name for tensor in sent)
    for tensor in sent:
        expected = np.asarray(tensor.array)
        arrived = by_name[tensor.name]
        assert arrived.array.dtype == expected.dtype, tensor.name
        assert arrived.array.shape == expected.shape, tensor.name
        assert arrived.array.tobytes() == expected.tobytes(), tensor.name
        assert set(tensor.tags) <= arrived.tags, tensor.name


@pytest.fixture
def plan(certs: CertsLayout) -> Plan:
    """A TLS plan on 127.0.0.1 with an ephemeral port and short retry settings."""
    return make_plan(certs)


def test_ping_and_tasks_over_mtls(plan: Plan) -> None:
    """An honest collaborator pings and is given the plan's three tasks of round 0."""
    with running_aggregator(plan) as server, client_for(plan, server.port) as client:
        client.ping()
        assert client.get_tasks() == Tasks(round_number=0, tasks=TASKS, sleep_seconds=0, quit=False)


def test_global_tensors_round_trip_exactly(certs: CertsLayout) -> None:
    """Every global tensor, a 64 MiB one included, arrives with the server's bytes, shape and dtype."""
    limit = 80 * MIB
    plan = make_plan(certs, limits={"max_message_bytes": limit})
    model = {
        **small_model(),  # float32 matrix and vector, float64 matrix, int64 scalar
        "temperature": np.array(0.25, dtype=np.float32),
        "big": np.arange(BIG_ELEMENTS, dtype=np.float32) / 7,
    }
    with (
        running_aggregator(plan, make_federation(plan, model)) as server,
        client_for(plan, server.port) as client,
    ):
        assert client.settings.max_message_bytes == limit
        for name, expected in model.items():
            arrived = client.get_aggregated_tensor(name, 0)
            assert arrived.dtype == expected.dtype, name
            assert arrived.shape == expected.shape, name
            assert arrived.tobytes() == expected.tobytes(), name


def test_tensor_over_the_clients_limit_is_refused(certs: CertsLayout) -> None:
    """A client whose message limit is below a 64 MiB tensor gets RESOURCE_EXHAUSTED, not a retry."""
    plan = make_plan(certs, limits={"max_message_bytes": 80 * MIB})
    model = {"big": np.zeros(BIG_ELEMENTS, dtype=np.float32)}
    sleeps = Sleeps()
    with (
        running_aggregator(plan, make_federation(plan, model)) as server,
        client_for(plan, server.port, max_message_bytes=8 * MIB, sleep=sleeps) as client,
        pytest.raises(RequestRejectedError) as raised,
    ):
        client.get_aggregated_tensor("big", 0)
    # gRPC's receive limit on the client's channel stops it; a retry would fail the same way.
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sleeps.delays == []


def test_results_arrive_exactly(plan: Plan) -> None:
    """Trained tensors and a metric reach the federation byte for byte, with data_size and tags."""
    federation = make_federation(plan)
    sent = trained(small_model())
    with running_aggregator(plan, federation) as server, client_for(plan, server.port) as client:
        client.send_local_task_results(0, "train", 1234, sent)
        remaining = client.get_tasks().tasks
    assert_stored_as_sent(federation, sent, 1234)
    assert "train" not in remaining


@pytest.mark.parametrize("field", ["sender", "receiver", "federation_uuid"])
def test_validate_response_names_the_wrong_field(plan: Plan, field: str) -> None:
    """A response header with one wrong field is refused, naming that field; a right one passes."""
    client = client_for(plan, 50051)
    right = {"sender": AGGREGATOR_ID, "receiver": "alice", "federation_uuid": FEDERATION_UUID}
    client.validate_response(aggregator_pb2.MessageHeader(**right))
    wrong = aggregator_pb2.MessageHeader(**{**right, field: "someone-else"})
    with pytest.raises(ResponseValidationError, match=rf"header\.{field} is 'someone-else'"):
        client.validate_response(wrong)


class CountingClient(AggregatorGRPCClient):
    """A client that keeps a list of the channels it opens, so a test can check they were closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[grpc.Channel] = []

    def _open_channel(self) -> grpc.Channel:
        channel = super()._open_channel()
        self.opened.append(channel)
        return channel


def is_closed(channel: grpc.Channel) -> bool:
    """Whether `channel` was closed: gRPC refuses to start a call on a closed channel."""
    stub = aggregator_pb2_grpc.AggregatorStub(channel)
    try:
        stub.Ping(aggregator_pb2.PingRequest(), timeout=5)
    except ValueError:
        return True
    except grpc.RpcError:
        return False
    return False


@pytest.mark.parametrize(("atomic", "channels"), [(True, 4), (False, 1)])
def test_atomic_connections_open_a_channel_per_call(
    plan: Plan, atomic: bool, channels: int
) -> None:
    """With atomic connections each call opens and closes its own channel; otherwise one is kept."""
    federation = make_federation(plan)
    with running_aggregator(plan, federation) as server:
        client = CountingClient.from_plan(
            plan,
            "alice",
            aggregator_address="127.0.0.1",
            aggregator_port=server.port,
            enable_atomic_connections=atomic,
        )
        with client:
            client.ping()
            assert client.connected is not atomic
            assert client.get_tasks().round_number == 0
            client.get_aggregated_tensor("dense/bias", 0)
            client.send_local_task_results(0, "train", 10, trained(small_model()))
            assert client.connected is not atomic
            assert [is_closed(channel) for channel in client.opened] == [atomic] * channels
        assert not client.connected
        assert all(is_closed(channel) for channel in client.opened)
    assert len(client.opened) == channels
    assert len(federation.results()) == 1


def test_call_waits_for_restarted_aggregator_and_resend_counts_once(certs: CertsLayout) -> None:
    """A send made while the aggregator is down completes after its restart; the repeat counts once."""
    plan = make_plan(certs, aggregator={"port": free_port()})
    federation = make_federation(plan)
    sent = trained(small_model())
    sleeps = Sleeps(real=True)
    client = client_for(
        plan,
        plan.aggregator.port,
        sleep=sleeps,
        random=lambda: 1.0,
        backoff_initial=0.1,
        backoff_max=0.4,
        max_retries=30,
    )
    first = AggregatorGRPCServer(plan, federation)
    first.start()
    try:
        client.send_local_task_results(0, "train", 50, sent)
    finally:
        first.stop(0)
    assert sleeps.delays == []
    second = AggregatorGRPCServer(plan, federation)  # the same federation, as after a restart
    restart = threading.Timer(1.0, second.start)
    restart.start()
    try:
        started = time.monotonic()
        client.send_local_task_results(0, "train", 50, sent)
        elapsed = time.monotonic() - started
        assert client.get_tasks().tasks == (
            "aggregated_model_validation",
            "locally_tuned_model_validation",
        )
    finally:
        restart.join(10)
        second.stop(0)
        client.disconnect()
    assert sleeps.delays, "the second send should have waited for the restart"
    assert 0.9 < elapsed < 10
    assert_stored_as_sent(federation, sent, 50)


class LosesFirstAnswer(AggregatorServicer):
    """The real servicer, except that the first upload is accepted and then answered UNAVAILABLE."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.uploads: list[bytes] = []

    def SendLocalTaskResults(  # noqa: N802 - the RPC's name
        self, request_iterator: Iterator[base_pb2.DataStream], context: grpc.ServicerContext
    ) -> aggregator_pb2.SendLocalTaskResultsResponse:
        chunks = list(request_iterator)
        self.uploads.append(b"".join(chunk.npbytes for chunk in chunks))
        response = super().SendLocalTaskResults(iter(chunks), context)
        if len(self.uploads) == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost after the result was stored")
        return response


@contextmanager
def losing_aggregator(plan: Plan, federation: Federation) -> Iterator[tuple[LosesFirstAnswer, int]]:
    """A real TLS server around `LosesFirstAnswer`, on an ephemeral port."""
    if plan.tls.certs is None:
        raise ValueError("this helper serves TLS plans only")
    gatekeeper = Gatekeeper(
        aggregator_id=plan.federation.aggregator_id,
        federation_uuid=plan.federation.uuid,
        collaborators=frozenset(plan.collaborators),
    )
    servicer = LosesFirstAnswer(federation, gatekeeper, plan.limits)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=server_options(plan.limits.max_message_bytes),
    )
    aggregator_pb2_grpc.add_AggregatorServicer_to_server(servicer, server)
    certs = plan.tls.certs
    credentials = server_credentials(certs.aggregator_cert, certs.aggregator_key, certs.ca_bundle)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(0).wait()


def test_lost_answer_is_resent_with_the_same_bytes_and_counted_once(plan: Plan) -> None:
    """When the answer to a stored upload is lost, the same bytes are sent again and counted once."""
    federation = make_federation(plan)
    sent = trained(small_model())
    sleeps = Sleeps()
    with losing_aggregator(plan, federation) as (servicer, port):
        with client_for(plan, port, sleep=sleeps) as client:
            client.send_local_task_results(0, "train", 77, sent)
        first, second = servicer.uploads
    assert first == second
    assert len(sleeps.delays) == 1
    assert_stored_as_sent(federation, sent, 77)


def test_lost_answer_is_not_resent_when_resend_is_off(plan: Plan) -> None:
    """With resend off, a lost answer is reported as maybe-not-arrived and nothing is sent again."""
    federation = make_federation(plan)
    sleeps = Sleeps()
    with losing_aggregator(plan, federation) as (servicer, port):
        client = client_for(plan, port, sleep=sleeps, resend_data_on_reconnection=False)
        with client, pytest.raises(AggregatorUnavailableError, match="may not have arrived"):
            client.send_local_task_results(0, "train", 77, trained(small_model()))
        assert len(servicer.uploads) == 1
    assert sleeps.delays == []
    # It did arrive here, which is why the message says "may": the client cannot know.
    assert len(federation.results()) == 1


@dataclass(frozen=True)
class Refusal:
    """A client that the aggregator must refuse: its header name, whose certificate, what else."""

    name: str
    cert_of: str
    words: tuple[str, ...]
    overrides: tuple[tuple[str, str], ...] = ()


@pytest.mark.parametrize(
    "case",
    [
        Refusal("mallory", "mallory", ("'mallory'", "not an authorised")),
        Refusal("bob", "alice", ("header.sender 'bob'", "'alice'")),
        Refusal(
            "alice",
            "alice",
            ("header.federation_uuid 'another-federation'",),
            (("federation_uuid", "another-federation"),),
        ),
        Refusal(
            "alice",
            "alice",
            ("header.receiver 'aggregator_other'",),
            (("aggregator_id", "aggregator_other"),),
        ),
    ],
    ids=["stranger", "name-differs-from-cert", "wrong-federation", "wrong-aggregator"],
)
def test_refusal_is_raised_at_once_without_retry(
    plan: Plan, certs: CertsLayout, stranger: Identity, case: Refusal
) -> None:
    """A PERMISSION_DENIED reaches the caller with the server's message, with no retry and no sleep."""
    if case.cert_of == "mallory":
        identity = stranger
    else:
        identity = Identity(
            certs.collaborator_cert(case.cert_of), certs.collaborator_key(case.cert_of)
        )
    sleeps = Sleeps()
    with (
        running_aggregator(plan) as server,
        client_for(
            plan,
            server.port,
            case.name,
            certificate=identity.cert,
            private_key=identity.key,
            sleep=sleeps,
            **dict(case.overrides),
        ) as client,
    ):
        started = time.monotonic()
        with pytest.raises(RequestRejectedError) as raised:
            client.ping()
        assert time.monotonic() - started < 2
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "PERMISSION_DENIED" in str(raised.value)
    for word in case.words:
        assert word in raised.value.details
    assert sleeps.delays == []


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        (
            lambda c: c.get_aggregated_tensor("nope", 0),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("'nope'",),
        ),
        (
            lambda c: c.get_aggregated_tensor("dense/bias", 3),
            grpc.StatusCode.FAILED_PRECONDITION,
            ("round 3",),
        ),
        (
            lambda c: c.send_local_task_results(0, "mine_bitcoin", 1, []),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("'mine_bitcoin'",),
        ),
    ],
    ids=["unknown-tensor", "wrong-round", "unknown-task"],
)
def test_bad_request_is_raised_at_once_without_retry(
    plan: Plan, call: Any, code: grpc.StatusCode, words: tuple[str, ...]
) -> None:
    """A request the aggregator finds wrong is raised with its status and message, not retried."""
    sleeps = Sleeps()
    with (
        running_aggregator(plan) as server,
        client_for(plan, server.port, sleep=sleeps) as client,
        pytest.raises(RequestRejectedError) as raised,
    ):
        call(client)
    assert raised.value.code == code
    for word in words:
        assert word in raised.value.details
    assert sleeps.delays == []


def test_retries_stop_after_max_retries(plan: Plan, caplog: pytest.LogCaptureFixture) -> None:
    """With nothing listening and max_retries=3, the client tries 4 times, backing off, then gives up."""
    sleeps = Sleeps()
    client = client_for(
        plan,
        free_port(),
        sleep=sleeps,
        random=lambda: 0.5,
        max_retries=3,
        backoff_initial=0.1,
        backoff_max=0.3,
    )
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="foedus.collaborator.client"),
        pytest.raises(AggregatorUnavailableError) as raised,
    ):
        client.ping()
    assert time.monotonic() - started < 5
    error = raised.value
    assert error.attempts == 4
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "max_retries=3" in str(error)
    # Full jitter of min(backoff_max, initial * 2**n); random() is 0.5 here.
    assert sleeps.delays == pytest.approx([0.05, 0.1, 0.15])
    retries = [r for r in caplog.records if r.name == "foedus.collaborator.client"]
    assert [r.levelno for r in retries] == [logging.WARNING] * 3
    assert not client.connected


def test_retries_stop_within_max_wait_time(plan: Plan) -> None:
    """With nothing listening, retrying stops before a sleep would pass max_wait_time."""
    sleeps = Sleeps(real=True)
    client = client_for(
        plan,
        free_port(),
        sleep=sleeps,
        random=lambda: 1.0,
        max_retries=100,
        max_wait_time=1.0,
        backoff_initial=0.2,
        backoff_max=0.2,
    )
    started = time.monotonic()
    with pytest.raises(AggregatorUnavailableError, match=r"max_wait_time=1 s") as raised:
        client.ping()
    elapsed = time.monotonic() - started
    # Five 0.2 s sleeps fit only if the attempts took no time at all, so at most four start.
    assert 2 <= len(sleeps.delays) <= 4
    assert raised.value.attempts == len(sleeps.delays) + 1
    assert elapsed < 1.0 + 0.5  # the last attempt's own time is the only slack


@pytest.mark.parametrize(
    ("who", "words"),
    [("expired_alice", "certificate expired on"), ("future_alice", "not valid before")],
)
def test_client_refuses_its_own_certificate_outside_its_dates(
    plan: Plan, request: pytest.FixtureRequest, who: str, words: str
) -> None:
    """An expired or not-yet-valid certificate of our own fails at once, naming the file, not after retries."""
    identity: Identity = request.getfixturevalue(who)
    sleeps = Sleeps()
    with running_aggregator(plan) as server:
        client = client_for(
            plan, server.port, certificate=identity.cert, private_key=identity.key, sleep=sleeps
        )
        with pytest.raises(ClientConfigurationError, match=words) as raised:
            client.ping()
    assert str(identity.cert) in str(raised.value)
    assert sleeps.delays == []


def test_aggregator_refuses_client_of_another_ca(plan: Plan, foreign_alice: Identity) -> None:
    """A client certificate from another CA is refused in the handshake."""
    identity = foreign_alice
    federation = make_federation(plan)
    sleeps = Sleeps()
    with running_aggregator(plan, federation) as server:
        client = client_for(
            plan,
            server.port,
            certificate=identity.cert,
            private_key=identity.key,
            sleep=sleeps,
            max_retries=1,
        )
        with pytest.raises(AggregatorUnavailableError) as raised:
            client.send_local_task_results(0, "train", 5, trained(small_model()))
    # The server's TLS stack (require_client_auth) ends the handshake before any RPC exists, so no
    # status of ours can be sent: gRPC reports UNAVAILABLE, the same as a network failure, and the
    # client cannot tell them apart; it retries within its budget, then gives up.
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.attempts == 2
    assert len(sleeps.delays) == 1
    assert federation.results() == ()


def test_reconnect_reads_rotated_client_certificate(
    plan: Plan, certs: CertsLayout, stranger: Identity, tmp_path: Path
) -> None:
    """The certificate files are read again on reconnect: replacing them changes who the client is."""
    cert, key = tmp_path / "me.crt", tmp_path / "me.key"
    shutil.copy2(certs.collaborator_cert("alice"), cert)
    shutil.copy2(certs.collaborator_key("alice"), key)
    with running_aggregator(plan) as server:
        client = client_for(plan, server.port, certificate=cert, private_key=key)
        with client:
            client.ping()
            shutil.copy2(stranger.cert, cert)
            shutil.copy2(stranger.key, key)
            client.ping()  # the open channel keeps its handshake
            client.reconnect()
            with pytest.raises(RequestRejectedError, match="'mallory'") as raised:
                client.ping()
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_retry_reconnects_with_renewed_certificate(
    plan: Plan, certs: CertsLayout, foreign_alice: Identity, tmp_path: Path
) -> None:
    """A retry opens a new channel from the files, so a certificate replaced meanwhile gets through."""
    cert, key = tmp_path / "alice.crt", tmp_path / "alice.key"
    shutil.copy2(foreign_alice.cert, cert)
    shutil.copy2(foreign_alice.key, key)

    def renew() -> None:
        shutil.copy2(certs.collaborator_cert("alice"), cert)
        shutil.copy2(certs.collaborator_key("alice"), key)

    sleeps = Sleeps(then=renew)
    with running_aggregator(plan) as server:
        client = client_for(plan, server.port, certificate=cert, private_key=key, sleep=sleeps)
        with client:
            client.ping()
    assert len(sleeps.delays) == 1  # the foreign certificate failed once, our CA's one passed


def test_insecure_plan_pings_without_tls() -> None:
    """With an insecure plan, a tls=False client pings and gets its tasks."""
    plan = make_plan(None)
    with running_aggregator(plan) as server, client_for(plan, server.port) as client:
        assert not client.settings.tls
        client.ping()
        assert client.get_tasks().tasks == TASKS


def test_configuration_errors_name_the_argument(certs: CertsLayout, tmp_path: Path) -> None:
    """Bad arguments and unreadable TLS files raise ClientConfigurationError naming what is wrong."""
    with pytest.raises(ClientConfigurationError, match="tls=True needs certificate, private_key"):
        ClientSettings(
            "localhost",
            50051,
            aggregator_id=AGGREGATOR_ID,
            federation_uuid=FEDERATION_UUID,
            collaborator_name="alice",
            root_certificate=certs.ca_bundle,
        )
    with pytest.raises(ClientConfigurationError, match=r"aggregator_port must be 1-65535, got 0"):
        ClientSettings(
            "localhost",
            0,
            aggregator_id=AGGREGATOR_ID,
            federation_uuid=FEDERATION_UUID,
            collaborator_name="alice",
            tls=False,
        )
    missing = tmp_path / "missing.crt"
    client = AggregatorGRPCClient(
        ClientSettings(
            "localhost",
            50051,
            aggregator_id=AGGREGATOR_ID,
            federation_uuid=FEDERATION_UUID,
            collaborator_name="alice",
            root_certificate=certs.ca_bundle,
            certificate=missing,
            private_key=certs.collaborator_key("alice"),
        )
    )
    with pytest.raises(ClientConfigurationError, match=r"missing\.crt"):
        client.connect()


def test_settings_report_every_problem_at_once(plan: Plan) -> None:
    """Settings with several bad values are refused once, naming each; an unknown name is a TypeError."""
    bad = {"aggregator_port": 0, "deadline": 0, "backoff_initial": 2.0, "backoff_max": 1.0}
    with pytest.raises(ClientConfigurationError) as refused:
        ClientSettings.from_plan(plan, "alice", **bad)
    assert str(refused.value) == (
        "cannot configure the client for 'alice': aggregator_port must be 1-65535, got 0; "
        "deadline must be > 0 seconds, got 0; "
        "backoff_max (1.0) must be >= backoff_initial (2.0)"
    )
    settings = ClientSettings.from_plan(plan, "alice", aggregator_port=50051)
    assert settings.problems() == []
    assert settings.target.endswith(":50051")
    with pytest.raises(TypeError, match="backoff_start"):
        ClientSettings.from_plan(plan, "alice", backoff_start=1.0)


def test_ipv6_literal_is_dialled_in_brackets(certs: CertsLayout) -> None:
    """An IPv6 aggregator address is bracketed in the target, and a ping over ::1 works."""
    plan = make_plan(certs, aggregator={"listen_address": "::1"})
    with running_aggregator(plan) as server:
        client = client_for(plan, server.port, aggregator_address="::1")
        assert client.target == f"[::1]:{server.port}"
        with client:
            client.ping()


def test_leave_is_answered_once_and_makes_alice_leave(plan: Plan) -> None:
    """Leave goes with alice's header over her certificate; a second one changes nothing; a
    heartbeat (perhaps sent before the Leave) does not bring her back, any other call does."""
    federation = make_federation(plan)
    with running_aggregator(plan, federation) as server, client_for(plan, server.port) as client:
        client.leave("the task runner failed (ValueError)")
        client.leave("another reason")
        [departure] = federation.liveness.departures()
        assert (departure.name, departure.reason) == (
            "alice",
            "the task runner failed (ValueError)",
        )
        assert client.heartbeat()
        assert federation.liveness.departures() == (departure,)
        client.ping()
        assert federation.liveness.departures() == ()


def test_leave_gives_up_within_its_own_bound_whatever_the_plan_allows(plan: Plan) -> None:
    """With nothing listening and an unbounded retry budget, Leave stops within LEAVE_SECONDS."""
    sleeps = Sleeps(real=True)
    client = client_for(
        plan,
        free_port(),
        sleep=sleeps,
        random=lambda: 1.0,
        max_retries=None,
        max_wait_time=None,
        backoff_initial=0.5,
        backoff_max=1.0,
    )
    with pytest.raises(AggregatorUnavailableError, match=r"Leave failed .*max_wait_time=5 s"):
        client.leave("gone")
    assert sum(sleeps.delays) <= LEAVE_SECONDS
