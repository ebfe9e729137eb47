"""Hostile input against a live aggregator over real mutual TLS, one row per bad thing.

Every row of `ROWS` starts a fresh aggregator, sends one bad thing (as collaborator bob unless the
row is about who is calling), and asserts the exact status code and a key phrase of the message.
Then it checks that the server is fine: no call is left holding a slot, nothing was logged as a
bug, and the honest collaborator alice, through the real client, completes her round with exactly
the results a clean run stores. What bob has stored is checked too: nothing, or, for the few rows
whose input is acceptable, exactly one copy of what he sent.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from foedus.aggregator.admission import Admission, UploadTimeoutError, chunks_within
from foedus.aggregator.federation import Federation
from foedus.aggregator.records import ResultTensor, TaskResult
from foedus.aggregator.server import AggregatorGRPCServer
from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor
from foedus.pki.layout import CertsLayout
from foedus.plans import Plan
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION, TRAIN
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc, base_pb2
from foedus.protos.codec import decode_tensor, encode_tensor
from foedus.protos.stream import chunk_bytes, task_results_to_chunks
from foedus.refusals.errors import LimitExceededError

from conftest import Identity
from servers import make_plan, running_aggregator, small_model
from test_server import Caller, connect

UPLOAD_SECONDS = 2.0  # limits.upload_seconds of the deadline rows
CAP = 64 * 1024  # limits.max_message_bytes and max_upload_bytes of the size rows
FLOOD = 200  # concurrent connections of the flood row
FLOOD_LIMIT = 4  # limits.max_calls_per_collaborator of the flood row
OK = grpc.StatusCode.OK
StoredResult = tuple[object, ...]


# -- what is stored ---------------------------------------------------------------------------


def summary(result: TaskResult) -> StoredResult:
    """A stored result as plain comparable values: who, round, task, size, tensors' exact bytes."""
    tensors = sorted(
        (t.name, tuple(sorted(t.tags)), t.array.dtype.str, t.array.shape, t.array.tobytes())
        for t in result.tensors
    )
    return (result.collaborator, result.round_number, result.task_name, result.data_size, tensors)


def stored(federation: Federation) -> list[StoredResult]:
    """Everything the federation holds for the round in progress, in its fixed order."""
    return [summary(result) for result in federation.results()]


def as_stored(message: aggregator_pb2.TaskResults, collaborator: str) -> StoredResult:
    """What the federation should hold once it accepted `message` from `collaborator`."""
    return summary(
        TaskResult(
            collaborator=collaborator,
            round_number=message.round_number,
            task_name=message.task_name,
            data_size=message.data_size,
            tensors=tuple(
                ResultTensor(t.name, frozenset(t.tags), decode_tensor(t, max_bytes=2**20))
                for t in message.tensors
            ),
        )
    )


# -- the honest collaborator ------------------------------------------------------------------


def honest_arrays(model: Mapping[str, Any], task: str, round_number: int) -> list[OutgoingTensor]:
    """What an honest collaborator reports for `task`: model + 1 for train, a metric for the rest."""
    if task == TRAIN:
        trained = [
            OutgoingTensor(name, np.asarray(array) + 1, tags=("trained",))
            for name, array in model.items()
        ]
        return [*trained, OutgoingTensor("loss", np.float32(0.25 + round_number), tags=("metric",))]
    return [OutgoingTensor("accuracy", np.float32(0.5 + round_number), tags=("metric",))]


def honest_round(plan: Plan, port: int, name: str = "alice") -> None:
    """`name` runs every task of the round in progress through the real client, start to end."""
    client = AggregatorGRPCClient.from_plan(
        plan, name, aggregator_address="127.0.0.1", aggregator_port=port
    )
    with client:
        tasks = client.get_tasks()
        assert tasks.tasks, tasks
        model = {
            tensor: client.get_aggregated_tensor(tensor, tasks.round_number)
            for tensor in small_model()
        }
        for task in tasks.tasks:
            client.send_local_task_results(
                tasks.round_number, task, 50, honest_arrays(model, task, tasks.round_number)
            )


# -- one row's world --------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a call ended, as its caller saw it."""

    code: grpc.StatusCode
    details: str


def outcome(call: Callable[[], object]) -> Outcome:
    """Run a blocking call; its status code and details (OK and "" when it succeeds)."""
    try:
        call()
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        return Outcome(error.code(), error.details() or "")
    return Outcome(OK, "")


def upload_readers() -> list[threading.Thread]:
    """The aggregator's threads still reading an upload stream."""
    return [thread for thread in threading.enumerate() if thread.name == "upload-reader"]


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout} s"
        time.sleep(0.01)


@dataclass
class Env:
    """One live aggregator and what a row needs to attack it."""

    plan: Plan
    federation: Federation
    server: AggregatorGRPCServer
    certs: CertsLayout
    request: pytest.FixtureRequest
    release: threading.Event = field(default_factory=threading.Event)  # unblocks held streams
    alice_done: bool = False  # the row already ran alice's honest round
    channels: list[grpc.Channel] = field(default_factory=list)

    def own(self, name: str) -> Identity:
        """The certificate and key of collaborator `name` from the federation's folder."""
        return Identity(self.certs.collaborator_cert(name), self.certs.collaborator_key(name))

    def caller(self, name: str = "bob", identity: Identity | str | None = "own") -> Caller:
        """A raw caller named `name` with its own identity, a fixture's (by name), or none."""
        if isinstance(identity, str):
            identity = (
                self.own(name) if identity == "own" else self.request.getfixturevalue(identity)
            )
        caller = connect(self.server, self.certs, identity, name)
        self.channels.append(caller.channel)
        return caller

    def close(self) -> None:
        """Let held streams end and close every channel the row opened."""
        self.release.set()
        for channel in self.channels:
            channel.close()


Attack = Callable[[Env], Outcome]
Message = Callable[[Caller], aggregator_pb2.TaskResults]


@dataclass(frozen=True)
class Row:
    """One bad thing, the status and key phrases it must be answered with, and its world."""

    id: str
    attack: Attack
    code: grpc.StatusCode
    words: tuple[str, ...] = ()
    sections: Mapping[str, Any] = field(default_factory=dict)  # plan overrides
    setup: Callable[[Env], None] | None = None  # before the attack (and in the clean run)
    stores: Message | None = None  # bob's message the federation must hold once
    max_seconds: float | None = None  # the refusal must come this fast


# -- attacks ----------------------------------------------------------------------------------


def model_plus_one(**changed: Any) -> dict[str, Any]:
    """The honest trained model (global + 1), with `changed` tensors replaced (None drops one)."""
    model = {name: np.asarray(array) + 1 for name, array in small_model().items()}
    model.update(changed)
    return {name: array for name, array in model.items() if array is not None}


def train(*extra: base_pb2.NamedTensor, **changed: Any) -> Message:
    """Bob's train results of round 0: honest but for `changed` tensors and `extra` raw ones."""

    def make(caller: Caller) -> aggregator_pb2.TaskResults:
        tensors = [encode_tensor(name, array) for name, array in model_plus_one(**changed).items()]
        loss = encode_tensor("train_loss", np.float32(0.5), tags=["metric"])
        return caller.results(tensors=[*tensors, *extra, loss])

    return make


def raw_tensor(name: str, shape: Sequence[int], data: bytes, **fields: Any) -> base_pb2.NamedTensor:
    """A tensor exactly as given, with no encoder to keep it honest."""
    return base_pb2.NamedTensor(
        name=name,
        transformer_metadata=[base_pb2.MetadataProto(int_list=shape)],
        data_bytes=data,
        **fields,
    )


def upload(message: Message, *, who: str = "bob", identity: str = "own") -> Attack:
    """Send `message` (built for `who`) in OpenFL's 2 MiB chunks."""

    def attack(env: Env) -> Outcome:
        caller = env.caller(who, identity)
        payload = message(caller)
        return outcome(lambda: caller.send(task_results_to_chunks(payload)))

    return attack


def stream(chunks: Callable[[Caller], Iterator[base_pb2.DataStream]]) -> Attack:
    """Send exactly the chunks given, as bob."""

    def attack(env: Env) -> Outcome:
        caller = env.caller()
        return outcome(lambda: caller.send(chunks(caller)))

    return attack


def ping_as(identity: str | None) -> Attack:
    """Ping as 'alice' presenting a fixture's identity (None: no client certificate)."""

    def attack(env: Env) -> Outcome:
        caller = env.caller("alice", identity)
        request = aggregator_pb2.PingRequest(header=caller.header())
        return outcome(lambda: caller.stub.Ping(request, timeout=10))

    return attack


def heartbeat(who: str = "bob", identity: str = "own", **header: str) -> Attack:
    """A heartbeat as `who`, with header fields changed; a refused one marks nobody alive, an
    accepted one its sender."""

    def attack(env: Env) -> Outcome:
        caller = env.caller(who, identity)
        request = aggregator_pb2.HeartbeatRequest(header=caller.header(**header))
        result = outcome(lambda: caller.stub.Heartbeat(request, timeout=10))
        snapshot = env.federation.liveness.snapshot()
        alive = [seen.name for seen in snapshot if seen.last_seen is not None]
        assert alive == ([who] if result.code is OK else []), snapshot
        return result

    return attack


def leave(
    who: str = "bob",
    identity: str = "own",
    reason: str = "the task runner failed (ValueError)",
    *,
    times: int = 1,
    **header: str,
) -> Attack:
    """Leave as `who`, `times` times, with header fields changed; a refused one makes nobody
    leave, an accepted one its sender, once, with the first reason cleaned of control characters."""

    def attack(env: Env) -> Outcome:
        caller = env.caller(who, identity)
        results = []
        for attempt in range(times):
            request = aggregator_pb2.LeaveRequest(
                header=caller.header(**header), reason=reason if attempt == 0 else "again"
            )
            results.append(outcome(functools.partial(caller.stub.Leave, request, timeout=10)))
        assert len({result.code for result in results}) == 1, results
        departures = env.federation.liveness.departures()
        if results[0].code is OK:
            cleaned = "".join(c for c in reason if c.isprintable() or c == " ").strip()
            assert [(d.name, d.reason) for d in departures] == [(who, cleaned)]
        else:
            assert departures == ()
        return results[0]

    return attack


def download(name: str, round_number: int = 0) -> Attack:
    """Ask for a tensor of the global model as bob."""

    def attack(env: Env) -> Outcome:
        caller = env.caller()
        request = aggregator_pb2.GetAggregatedTensorRequest(
            header=caller.header(), tensor_name=name, round_number=round_number
        )
        return outcome(lambda: caller.stub.GetAggregatedTensor(request, timeout=10))

    return attack


def get_tasks(who: str = "bob", identity: str = "own") -> Attack:
    """Ask for tasks as `who`, presenting `identity`."""

    def attack(env: Env) -> Outcome:
        caller = env.caller(who, identity)
        request = aggregator_pb2.GetTasksRequest(header=caller.header())
        return outcome(lambda: caller.stub.GetTasks(request, timeout=10))

    return attack


def download_model(who: str = "bob", identity: str = "own") -> Attack:
    """Stream the global model (`GetAggregatedModel`) as `who`, presenting `identity`."""

    def attack(env: Env) -> Outcome:
        caller = env.caller(who, identity)
        request = aggregator_pb2.GetAggregatedModelRequest(header=caller.header(), round_number=0)
        return outcome(lambda: list(caller.stub.GetAggregatedModel(request, timeout=10)))

    return attack


def revoked(env: Env) -> Outcome:
    """Bob was a collaborator; after a restart with a plan without him, he uploads anyway."""
    with running_aggregator(make_plan(env.certs)) as before:
        member = connect(before, env.certs, env.own("bob"), "bob")
        request = aggregator_pb2.PingRequest(header=member.header())
        assert outcome(lambda: member.stub.Ping(request, timeout=10)).code is OK
        member.channel.close()
    return upload(lambda caller: caller.results())(env)


def close_round_zero_without_bob(env: Env) -> None:
    """Alice and carol finish round 0 and it closes (straggler percentage 0.5): bob missed it."""
    for name in ("alice", "carol"):
        honest_round(env.plan, env.server.port, name)
    closed = env.federation.close_round_if_due()
    assert closed is not None and closed.missing == ("bob",)


def ends_halfway(caller: Caller) -> Iterator[base_pb2.DataStream]:
    """Half the bytes of honest results, then a normal end of stream."""
    payload = caller.results().SerializeToString()
    return chunk_bytes(payload[: len(payload) // 2], 64)


def over_cap(caller: Caller) -> bytes:
    """Honest-looking results whose one tensor makes the upload pass the plan's cap of CAP bytes."""
    large = encode_tensor("dense/weight", np.zeros(CAP // 4 + 1, np.float32))
    return caller.results(tensors=[large]).SerializeToString()


def cancelled_halfway(env: Env) -> Outcome:
    """Bob sends half his chunks, then his side cancels while the aggregator is reading."""
    caller = env.caller()
    chunks = list(chunk_bytes(caller.results().SerializeToString(), 64))
    asked_for_more = threading.Event()

    def half() -> Iterator[base_pb2.DataStream]:
        yield from chunks[: len(chunks) // 2]
        asked_for_more.set()
        env.release.wait(30)
        yield from chunks[len(chunks) // 2 :]

    call = caller.stub.SendLocalTaskResults.future(half(), timeout=30)
    assert asked_for_more.wait(10)
    admission = env.server.servicer.admission
    wait_until(lambda: admission.in_progress("bob") == 1)  # the aggregator is inside the call
    call.cancel()
    wait_until(lambda: admission.in_progress("bob") == 0)  # ... and has let go of it
    return Outcome(call.code(), call.details() or "")


def thousand_chunks(caller: Caller) -> aggregator_pb2.TaskResults:
    """Honest train results with 30 extra metrics, so 1,000 chunks each carry a byte or two."""
    metrics = [
        encode_tensor(f"metric_{index:02d}", np.float32(index), tags=["metric"])
        for index in range(30)
    ]
    message = train()(caller)
    message.tensors.extend(metrics)
    return message


def in_thousand_chunks(env: Env) -> Outcome:
    """Bob's results cut into exactly 1,000 non-empty chunks."""
    caller = env.caller()
    payload = thousand_chunks(caller).SerializeToString()
    cuts = [len(payload) * index // 1000 for index in range(1001)]
    pieces = [payload[start:end] for start, end in itertools.pairwise(cuts)]
    assert len(pieces) == 1000 and min(map(len, pieces)) >= 1
    chunks = [base_pb2.DataStream(size=len(piece), npbytes=piece) for piece in pieces]
    return outcome(lambda: caller.send(iter(chunks)))


def stalled(env: Env) -> Outcome:
    """Bob sends one chunk and then nothing, with a call deadline far past upload_seconds."""
    caller = env.caller()
    chunks = list(chunk_bytes(caller.results().SerializeToString(), 64))

    def first_then_nothing() -> Iterator[base_pb2.DataStream]:
        yield chunks[0]
        env.release.wait(60)
        yield from chunks[1:]

    started = time.monotonic()
    result = outcome(lambda: caller.stub.SendLocalTaskResults(first_then_nothing(), timeout=60))
    assert time.monotonic() - started >= UPLOAD_SECONDS  # cut by the server's limit, not before
    return result


def trickling(env: Env) -> Outcome:
    """Bob keeps sending, a 16-byte chunk every 0.2 s, so the whole upload would take seconds."""
    caller = env.caller()
    chunks = list(chunk_bytes(caller.results().SerializeToString(), 16))
    assert len(chunks) * 0.2 > 2 * UPLOAD_SECONDS
    sent = 0

    def slowly() -> Iterator[base_pb2.DataStream]:
        nonlocal sent
        for chunk in chunks:
            sent += 1
            yield chunk
            env.release.wait(0.2)

    result = outcome(lambda: caller.stub.SendLocalTaskResults(slowly(), timeout=60))
    assert 1 < sent < len(chunks)  # chunks kept coming, and it was cut off before the end
    return result


def flood(env: Env) -> Outcome:
    """Bob opens 200 connections at once, each uploading his honest result and holding it open.

    Exactly FLOOD_LIMIT are admitted and held; the rest are refused at once. While the admitted
    ones hold, alice runs her whole round. Then they finish: one is stored, the others are
    resends answered OK and counted once.
    """
    bob = env.caller()
    message = bob.results()
    chunks = list(task_results_to_chunks(message, 64))
    identity = env.own("bob")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=env.certs.ca_bundle.read_bytes(),
        private_key=identity.key.read_bytes(),
        certificate_chain=identity.cert.read_bytes(),
    )
    # A local subchannel pool per channel: 200 TCP+TLS connections, not one shared connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    target = f"127.0.0.1:{env.server.port}"
    channels = [grpc.secure_channel(target, credentials, options=options) for _ in range(FLOOD)]
    env.channels.extend(channels)

    def held() -> Iterator[base_pb2.DataStream]:
        yield chunks[0]
        env.release.wait(60)
        yield from chunks[1:]

    calls = [
        aggregator_pb2_grpc.AggregatorStub(channel).SendLocalTaskResults.future(held(), timeout=60)
        for channel in channels
    ]
    wait_until(lambda: sum(call.done() for call in calls) >= FLOOD - FLOOD_LIMIT, 60)
    assert env.server.servicer.admission.in_progress("bob") == FLOOD_LIMIT
    honest_round(env.plan, env.server.port)  # alice is served in the middle of the flood
    env.alice_done = True
    env.release.set()
    wait_until(lambda: all(call.done() for call in calls), 60)
    codes = Counter(call.code() for call in calls)
    assert codes == {OK: FLOOD_LIMIT, grpc.StatusCode.RESOURCE_EXHAUSTED: FLOOD - FLOOD_LIMIT}
    refused = next(call for call in calls if call.code() is not OK)
    return Outcome(refused.code(), refused.details() or "")


NAN = np.full((3, 4), np.nan, dtype=np.float32)
INF = np.full((3, 4), np.inf, dtype=np.float32)

ROWS = [
    # Refused in the TLS handshake: require_client_auth ends the connection before any RPC
    # exists, so the server cannot answer a status of ours; the client sees UNAVAILABLE.
    Row("no-client-certificate", ping_as(None), grpc.StatusCode.UNAVAILABLE),
    Row("other-ca", ping_as("foreign_alice"), grpc.StatusCode.UNAVAILABLE),
    Row("expired", ping_as("expired_alice"), grpc.StatusCode.UNAVAILABLE),
    Row("not-yet-valid", ping_as("future_alice"), grpc.StatusCode.UNAVAILABLE),
    # Who is calling.
    Row(
        "stranger-of-our-ca",
        upload(lambda c: c.results(), who="mallory", identity="stranger"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("'mallory'", "not an authorised collaborator"),
    ),
    # A person's certificate named like a collaborator is not that collaborator (its role mark).
    *(
        Row(
            f"user-certificate-named-like-a-collaborator-{rpc}",
            attack,
            grpc.StatusCode.PERMISSION_DENIED,
            (
                "certificate 'bob' is a user certificate, but the plan's collaborators names "
                "'bob', which needs a collaborator certificate: it must be issued for that role",
            ),
        )
        for rpc, attack in (
            ("GetTasks", get_tasks(identity="user_bob")),
            ("GetAggregatedModel", download_model(identity="user_bob")),
            ("SendLocalTaskResults", upload(lambda c: c.results(), identity="user_bob")),
            ("Heartbeat", heartbeat(identity="user_bob")),
        )
    ),
    # A collaborator's certificate made before the signer marked roles still works (warned).
    Row(
        "collaborator-certificate-made-before-role-marks",
        upload(lambda c: c.results(), identity="unmarked_bob"),
        OK,
        stores=lambda c: c.results(),
    ),
    Row(
        "revoked-collaborator",
        revoked,
        grpc.StatusCode.PERMISSION_DENIED,
        ("'bob'", "not an authorised collaborator"),
        sections={"collaborators": ["alice", "carol"]},
    ),
    Row(
        "cn-differs-from-sender",
        upload(lambda c: c.results(header=c.header(sender="alice"))),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.sender 'alice'", "common name 'bob'"),
        max_seconds=5,  # at once: no OpenFL-style random sleep before a refusal
    ),
    Row(
        "wrong-federation",
        upload(lambda c: c.results(header=c.header(federation_uuid="another-federation"))),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.federation_uuid 'another-federation'",),
        max_seconds=5,
    ),
    Row(
        "wrong-receiver",
        upload(lambda c: c.results(header=c.header(receiver="aggregator_other"))),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.receiver 'aggregator_other'",),
        max_seconds=5,
    ),
    # Heartbeats pass the same identity check as every RPC.
    Row(
        "heartbeat-from-stranger",
        heartbeat("mallory", "stranger"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("'mallory'", "not an authorised collaborator"),
    ),
    Row(
        "heartbeat-for-another-federation",
        heartbeat(federation_uuid="another-federation"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.federation_uuid 'another-federation'",),
    ),
    Row(
        "heartbeat-with-wrong-sender",
        heartbeat(sender="alice"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.sender 'alice'", "common name 'bob'"),
    ),
    Row(
        "heartbeat-to-wrong-receiver",
        heartbeat(receiver="aggregator_other"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.receiver 'aggregator_other'",),
    ),
    Row("heartbeat-honest", heartbeat(), OK),
    # Leave passes the same identity check as every RPC; its reason is bounded.
    Row("leave-with-other-ca", leave("alice", "foreign_alice"), grpc.StatusCode.UNAVAILABLE),
    Row(
        "leave-from-stranger",
        leave("mallory", "stranger"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("'mallory'", "not an authorised collaborator"),
    ),
    Row(
        "leave-for-another-federation",
        leave(federation_uuid="another-federation"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.federation_uuid 'another-federation'",),
    ),
    Row(
        "leave-with-wrong-sender",
        leave(sender="alice"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.sender 'alice'", "common name 'bob'"),
    ),
    Row(
        "leave-to-wrong-receiver",
        leave(receiver="aggregator_other"),
        grpc.StatusCode.PERMISSION_DENIED,
        ("header.receiver 'aggregator_other'",),
    ),
    Row(
        "leave-with-a-reason-over-the-limit",
        leave(reason="x" * 1001),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("reason is 1001 characters long", "at most 1000"),
    ),
    Row(
        "leave-with-control-characters-stripped-to-the-limit",
        leave(reason="\x1b[31m" + "\x00" * 5000 + "y" * 995 + "\u202e\n"),
        OK,
    ),
    Row("leave-honest", leave(), OK),
    Row("leave-without-a-reason", leave(reason=""), OK),
    Row("leave-resent", leave(times=3), OK),
    # What is asked for.
    Row(
        "unknown-task",
        upload(lambda c: c.results(task_name="mine_bitcoin")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("task 'mine_bitcoin' is not a task of this federation",),
    ),
    Row(
        "wrong-round",
        upload(lambda c: c.results(round_number=5)),
        grpc.StatusCode.FAILED_PRECONDITION,
        ("round 5 is not the round in progress (0)",),
    ),
    Row(
        "negative-round",
        upload(lambda c: c.results(round_number=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("round_number must be 0 or more",),
    ),
    Row(
        "stale-round",
        upload(lambda c: c.results(round_number=0)),
        grpc.StatusCode.FAILED_PRECONDITION,
        ("round 0 is closed; the federation is in round 1",),
        sections={"straggler": {"policy": "percentage", "percentage": 0.5}},
        setup=close_round_zero_without_bob,
    ),
    Row(
        "download-unknown-tensor",
        download("nope"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("tensor 'nope' is not in the global model",),
    ),
    Row(
        "download-wrong-round",
        download("dense/bias", 3),
        grpc.StatusCode.FAILED_PRECONDITION,
        ("round 3 is not the round in progress",),
    ),
    # Tensors.
    Row(
        "tensor-not-in-model",
        upload(train(backdoor=np.zeros(3, np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'backdoor' is neither a metric nor in the global model",),
    ),
    Row(
        "shape-differs",
        upload(train(**{"dense/bias": np.zeros(5, np.float32)})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'dense/bias' is float32[5], the global model's is float32[4]",),
    ),
    Row(
        "dtype-differs",
        upload(train(**{"dense/bias": np.zeros(4, np.float64)})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'dense/bias' is float64[4], the global model's is float32[4]",),
    ),
    Row(
        "bytes-differ-from-shape",
        upload(train(raw_tensor("dense/bias", [4], b"\0" * 15), **{"dense/bias": None})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'dense/bias': shape (4,) of float32 needs 16 bytes, got 15",),
    ),
    Row(
        "claims-a-huge-shape",
        upload(train(raw_tensor("dense/bias", [2**20, 2**20], b""), **{"dense/bias": None})),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ("'dense/bias'", "over the limit of"),
    ),
    Row(
        "negative-dimension",
        upload(train(raw_tensor("dense/bias", [-4], b""), **{"dense/bias": None})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("negative dimension",),
    ),
    Row(
        "unknown-dtype",
        upload(
            train(
                raw_tensor("dense/bias", [4], b"\0" * 64, foedus_dtype="<c16"),
                **{"dense/bias": None},
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("unknown dtype '<c16'",),
    ),
    Row(
        "lossy-compressed",
        upload(
            train(
                raw_tensor("dense/bias", [4], b"\0" * 16, tags=["lossy_compressed"]),
                **{"dense/bias": None},
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,  # one entry, lossy: EdenPipeline's layout
        ("'dense/bias'", "OpenFL's EdenPipeline is refused"),
    ),
    Row(
        "same-tensor-twice",
        upload(train(encode_tensor("dense/bias", np.ones(4, np.float32)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("the same tensor more than once",),
    ),
    Row(  # an OpenFL delta (use_delta_updates) is added back, to a float32 tensor only
        "delta-of-a-float64-tensor",
        upload(
            train(
                encode_tensor("embedding", np.ones((2, 3), np.float32), tags=["delta"]),
                embedding=None,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'embedding' is float32[2, 3], the global model's is float64[2, 3]",),
    ),
    Row(
        "train-lacks-a-tensor",
        upload(train(steps=None)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("lack 1 tensor(s) of the global model: 'steps'",),
    ),
    Row(
        "metric-not-a-scalar",
        upload(train(encode_tensor("accuracy", np.zeros(3, np.float32), tags=["metric"]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("metric 'accuracy' must be a numeric scalar",),
    ),
    Row(
        "validation-without-a-metric",  # measured nothing: it must not count as a report
        upload(lambda c: c.results(task_name=AGGREGATED_MODEL_VALIDATION, tensors=[])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("aggregated_model_validation results hold no metric", "tagged 'metric'"),
    ),
    Row(
        "nan-in-update",
        upload(train(**{"dense/weight": NAN})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'dense/weight'", "limits.allow_non_finite"),
    ),
    Row(
        "inf-in-update",
        upload(train(**{"dense/weight": INF})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'dense/weight'", "limits.allow_non_finite"),
    ),
    Row(
        "nan-allowed-by-plan",
        upload(train(**{"dense/weight": NAN})),
        OK,
        sections={"limits": {"allow_non_finite": True}},
        stores=train(**{"dense/weight": NAN}),
    ),
    # data_size.
    Row(
        "data-size-zero",
        upload(lambda c: c.results(data_size=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("data_size must be a positive number of samples, got 0",),
    ),
    Row(
        "data-size-negative",
        upload(lambda c: c.results(data_size=-100)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("data_size must be a positive number of samples, got -100",),
    ),
    Row(
        "data-size-absurd",  # int32's largest, above the default limits.max_data_size
        upload(lambda c: c.results(data_size=2**31 - 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("data_size", "limits.max_data_size"),
    ),
    Row(
        "data-size-over-plan-limit",
        upload(lambda c: c.results(data_size=5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("data_size", "limits.max_data_size"),
        sections={"limits": {"max_data_size": 1000}},
    ),
    # The stream.
    Row(
        "not-a-protobuf",
        stream(lambda c: chunk_bytes(b"\xff\xff\xff\xff")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("the upload is not a TaskResults", "stream ends inside"),
    ),
    Row(
        "empty-stream",
        stream(lambda c: iter(())),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("empty stream",),
    ),
    Row(
        "chunk-size-lies",
        stream(lambda c: iter([base_pb2.DataStream(size=10, npbytes=b"abc")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("chunk 0 declares 10 bytes but carries 3",),
    ),
    Row(
        "stream-ends-halfway",
        stream(ends_halfway),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("the upload is not a TaskResults", "stream ends inside tensor"),
    ),
    # Bob's own side cancels, so CANCELLED is his client's status; the row checks that the
    # aggregator let go of the call, stored nothing and goes on serving.
    Row("stream-cancelled-halfway", cancelled_halfway, grpc.StatusCode.CANCELLED, ("ancelled",)),
    Row(
        "message-over-size-cap",  # refused by gRPC itself, from the plan's max_message_bytes
        stream(lambda c: iter([base_pb2.DataStream(size=CAP + 1, npbytes=b"\0" * (CAP + 1))])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ("larger than max",),
        sections={"limits": {"max_message_bytes": CAP}},
    ),
    Row(
        "upload-over-cap",
        stream(lambda c: chunk_bytes(over_cap(c), 16 * 1024)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        (f"stream passed the limit of {CAP} bytes at chunk 4",),
        sections={"limits": {"max_upload_bytes": CAP}},
    ),
    Row("thousand-tiny-chunks", in_thousand_chunks, OK, stores=thousand_chunks),
    Row(
        "stalled-stream",
        stalled,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        (f"did not end within limits.upload_seconds ({UPLOAD_SECONDS:g} s)", "nothing of it"),
        sections={"limits": {"upload_seconds": UPLOAD_SECONDS}},
    ),
    Row(
        "trickling-stream",
        trickling,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        (f"did not end within limits.upload_seconds ({UPLOAD_SECONDS:g} s)",),
        sections={"limits": {"upload_seconds": UPLOAD_SECONDS}},
    ),
    Row(
        "200-concurrent-connections",
        flood,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        (
            "collaborator 'bob' already has 4 calls in progress",
            f"limits.max_calls_per_collaborator ({FLOOD_LIMIT})",
        ),
        sections={"limits": {"max_calls_per_collaborator": FLOOD_LIMIT}},
        stores=lambda c: c.results(),
    ),
]


@pytest.fixture(scope="module")
def clean_runs(
    certs: CertsLayout, request: pytest.FixtureRequest
) -> Callable[[Row], list[StoredResult]]:
    """What a clean run stores: alice's round with the row's setup and nothing hostile (cached)."""
    cache: dict[object, list[StoredResult]] = {}

    def clean(row: Row) -> list[StoredResult]:
        if row.setup not in cache:
            straggler = row.sections.get("straggler")
            plan = make_plan(certs, **({} if straggler is None else {"straggler": straggler}))
            federation = Federation.from_plan(plan, small_model())
            with running_aggregator(plan, federation) as server:
                if row.setup is not None:
                    row.setup(Env(plan, federation, server, certs, request))
                honest_round(plan, server.port)
            cache[row.setup] = stored(federation)
        return cache[row.setup]

    return clean


def test_a_clean_run_stores_alices_three_results(
    clean_runs: Callable[[Row], list[StoredResult]],
) -> None:
    """The baseline every row is compared with holds alice's three tasks of round 0, size 50."""
    results = clean_runs(ROWS[0])
    assert [result[:4] for result in results] == [
        ("alice", 0, task, 50)
        for task in ("aggregated_model_validation", "locally_tuned_model_validation", "train")
    ]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_hostile_input(
    row: Row,
    certs: CertsLayout,
    request: pytest.FixtureRequest,
    clean_runs: Callable[[Row], list[StoredResult]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One bad thing gets its exact status; the server lets go of it and alice's round is unchanged."""
    expected = clean_runs(row)
    plan = make_plan(certs, **row.sections)
    federation = Federation.from_plan(plan, small_model())
    with running_aggregator(plan, federation) as server:
        env = Env(plan, federation, server, certs, request)
        try:
            if row.setup is not None:
                row.setup(env)
            started = time.monotonic()
            result = row.attack(env)
            elapsed = time.monotonic() - started
            assert result.code == row.code, result.details
            for word in row.words:
                assert word in result.details, result.details
            if row.max_seconds is not None:
                assert elapsed < row.max_seconds
            if not env.alice_done:
                honest_round(plan, server.port)
            wait_until(lambda: server.servicer.admission.in_progress() == 0)
            wait_until(lambda: not upload_readers())  # no thread is left reading a stream
            bob = [] if row.stores is None else [as_stored(row.stores(env.caller()), "bob")]
        finally:
            env.close()
    assert stored(federation) == [*expected, *bob]
    bugs = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not bugs


# -- the pieces on their own ------------------------------------------------------------------


def test_admission_refuses_one_past_the_limit_and_frees_on_exit() -> None:
    """A third call of a name with limit 2 is refused naming the limit; others are not affected."""
    admission = Admission(2)
    with admission.admit("bob"), admission.admit("bob"):
        refused = pytest.raises(LimitExceededError, match=r"max_calls_per_collaborator \(2\)")
        with refused, admission.admit("bob"):
            pass
        with admission.admit("alice"):
            assert admission.in_progress("bob") == 2 and admission.in_progress() == 3
    assert admission.in_progress() == 0


def test_admission_frees_its_slot_when_the_call_fails() -> None:
    """A call that raises gives its slot back."""
    admission = Admission(1)
    with pytest.raises(RuntimeError), admission.admit("bob"):
        raise RuntimeError("boom")
    with admission.admit("bob"):
        assert admission.in_progress("bob") == 1


def test_admission_counts_exactly_under_contention() -> None:
    """Many threads entering at once never hold more than the limit, and all slots come back."""
    admission = Admission(3)
    most = 0
    lock = threading.Lock()
    start = threading.Barrier(16)

    def call() -> None:
        nonlocal most
        start.wait()
        for _ in range(200):
            try:
                with admission.admit("bob"), lock:
                    most = max(most, admission.in_progress("bob"))
            except LimitExceededError:
                pass

    threads = [threading.Thread(target=call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= most <= 3
    assert admission.in_progress() == 0


def test_chunks_within_passes_items_and_errors_through() -> None:
    """Items arrive in order; an error raised by the source is raised to the consumer as it is."""
    assert list(chunks_within(iter(range(100)), 5)) == list(range(100))

    def broken() -> Iterator[int]:
        yield 1
        raise ConnectionResetError("gone")

    with pytest.raises(ConnectionResetError, match="gone"):
        list(chunks_within(broken(), 5))


def test_chunks_within_cuts_a_stalled_source_and_leaves_no_thread() -> None:
    """A source that stops yielding is cut at the deadline; its reader ends once the source does."""
    release = threading.Event()

    def stalls() -> Iterator[int]:
        yield 1
        release.wait(30)
        yield 2

    started = time.monotonic()
    received = []
    with pytest.raises(UploadTimeoutError, match=r"limits\.upload_seconds \(0\.2 s\)"):
        for item in chunks_within(stalls(), 0.2, what="test"):
            received.append(item)
    assert received == [1] and time.monotonic() - started >= 0.2
    release.set()
    wait_until(lambda: not any(t.name == "test-reader" for t in threading.enumerate()), 5)


def test_calls_are_counted_by_header_sender_on_an_insecure_server() -> None:
    """Without TLS the header's sender is counted: alice's long poll holds her only slot, bob's is free."""
    plan = make_plan(
        None,
        aggregator={"long_poll_seconds": 30},
        limits={"max_calls_per_collaborator": 1},
    )
    federation = Federation.from_plan(plan, small_model())
    with running_aggregator(plan, federation) as server:
        honest_round(plan, server.port)  # alice has nothing left to do: her GetTasks will wait
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        caller = Caller(aggregator_pb2_grpc.AggregatorStub(channel), channel, "alice")
        poll = caller.stub.GetTasks.future(
            aggregator_pb2.GetTasksRequest(header=caller.header()), timeout=60
        )
        wait_until(lambda: server.servicer.admission.in_progress("alice") == 1)
        refused = outcome(
            lambda: caller.stub.Ping(aggregator_pb2.PingRequest(header=caller.header()), timeout=10)
        )
        assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details
        assert "limits.max_calls_per_collaborator (1)" in refused.details
        bob = aggregator_pb2.PingRequest(header=caller.header(sender="bob"))
        assert outcome(lambda: caller.stub.Ping(bob, timeout=10)).code is OK
        server.servicer.stop_long_polls()  # the poll answers now, not after 30 s
        assert poll.result(timeout=10).round_number == 0
        channel.close()
