"""The aggregator server over real mutual TLS: every refusal answers its exact status, honest callers go on."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509

from aggregator.federation import Federation
from aggregator.server import AggregatorGRPCServer
from pki.layout import CertsLayout
from pki.local import setup_local_federation
from protos import aggregator_pb2, aggregator_pb2_grpc, base_pb2
from protos.codec import decode_tensor, encode_tensor
from protos.stream import chunk_bytes, task_results_to_chunks

from conftest import Identity
from servers import (
    AGGREGATOR_ID,
    FEDERATION_UUID,
    make_federation,
    make_plan,
    running_aggregator,
    small_model,
)

UPLOAD_CAP = 1024 * 1024


@dataclass
class Caller:
    """A raw gRPC stub with one identity, so tests can send exactly the bytes they want."""

    stub: aggregator_pb2_grpc.AggregatorStub
    channel: grpc.Channel
    name: str

    def header(self, **fields: str) -> aggregator_pb2.MessageHeader:
        """A request header that is right unless `fields` say otherwise."""
        values = {
            "sender": self.name,
            "receiver": AGGREGATOR_ID,
            "federation_uuid": FEDERATION_UUID,
        }
        return aggregator_pb2.MessageHeader(**{**values, **fields})

    def results(self, **fields: object) -> aggregator_pb2.TaskResults:
        """Honest `train` results of round 0, unless `fields` say otherwise."""
        model = small_model()
        values: dict[str, object] = {
            "header": self.header(),
            "round_number": 0,
            "task_name": "train",
            "data_size": 100,
            "tensors": [encode_tensor(name, array + 1) for name, array in model.items()]
            + [encode_tensor("train_loss", np.float32(0.5), tags=["metric"])],
        }
        return aggregator_pb2.TaskResults(**{**values, **fields})

    def send(
        self, chunks: Iterator[base_pb2.DataStream]
    ) -> aggregator_pb2.SendLocalTaskResultsResponse:
        """Stream `chunks` as one SendLocalTaskResults call."""
        return self.stub.SendLocalTaskResults(chunks, timeout=10)


def connect(
    server: AggregatorGRPCServer, certs: CertsLayout, identity: Identity | None, name: str
) -> Caller:
    """A caller over TLS that trusts our CA and presents `identity` (none: no client certificate)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_bundle.read_bytes(),
        private_key=identity.key.read_bytes() if identity else None,
        certificate_chain=identity.cert.read_bytes() if identity else None,
    )
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}", credentials)
    return Caller(aggregator_pb2_grpc.AggregatorStub(channel), channel, name)


@pytest.fixture(scope="module")
def federation_and_server(certs: CertsLayout) -> Iterator[tuple[Federation, AggregatorGRPCServer]]:
    """One live aggregator for the module, with a small upload cap to test it."""
    plan = make_plan(certs, limits={"max_upload_bytes": UPLOAD_CAP})
    federation = make_federation(plan)
    with running_aggregator(plan, federation) as server:
        yield federation, server


@pytest.fixture
def server(federation_and_server: tuple[Federation, AggregatorGRPCServer]) -> AggregatorGRPCServer:
    """The module's live aggregator."""
    return federation_and_server[1]


@pytest.fixture
def alice(server: AggregatorGRPCServer, certs: CertsLayout) -> Iterator[Caller]:
    """An honest collaborator."""
    caller = connect(
        server,
        certs,
        Identity(certs.collaborator_cert("alice"), certs.collaborator_key("alice")),
        "alice",
    )
    yield caller
    caller.channel.close()


def assert_status(call: object, code: grpc.StatusCode, *words: str) -> str:
    """Run `call`, expect an RpcError with `code` whose details contain every word; return details."""
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    error = raised.value
    assert error.code() == code, error.details()
    details = error.details() or ""
    for word in words:
        assert word in details, details
    return details


def test_honest_collaborator_pings_and_gets_tasks(alice: Caller) -> None:
    """An authorised collaborator is answered, and the reply header names both ends."""
    reply = alice.stub.Ping(aggregator_pb2.PingRequest(header=alice.header()), timeout=10)
    assert (reply.header.sender, reply.header.receiver) == (AGGREGATOR_ID, "alice")
    assert reply.header.federation_uuid == FEDERATION_UUID
    tasks = alice.stub.GetTasks(aggregator_pb2.GetTasksRequest(header=alice.header()), timeout=10)
    assert tasks.round_number == 0
    assert [task.name for task in tasks.tasks] == [
        "aggregated_model_validation",
        "train",
        "locally_tuned_model_validation",
    ]
    assert not tasks.quit


@pytest.mark.parametrize("name", sorted(small_model()))
def test_global_tensors_arrive_exactly(alice: Caller, name: str) -> None:
    """Every tensor of the global model arrives with its values and dtype."""
    request = aggregator_pb2.GetAggregatedTensorRequest(
        header=alice.header(), tensor_name=name, round_number=0
    )
    reply = alice.stub.GetAggregatedTensor(request, timeout=10)
    array = decode_tensor(reply.tensor, max_bytes=2**20)
    expected = small_model()[name]
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)


def _ping(caller: Caller, **header: str) -> object:
    return lambda: caller.stub.Ping(
        aggregator_pb2.PingRequest(header=caller.header(**header)), timeout=10
    )


def test_stranger_with_our_ca_is_denied(
    server: AggregatorGRPCServer, certs: CertsLayout, stranger: Identity
) -> None:
    """A valid certificate of someone not in the plan gets PERMISSION_DENIED naming the name."""
    caller = connect(server, certs, stranger, "mallory")
    assert_status(
        _ping(caller), grpc.StatusCode.PERMISSION_DENIED, "'mallory'", "not an authorised"
    )


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"sender": "bob"}, ("header.sender 'bob'", "'alice'")),
        ({"federation_uuid": "another-federation"}, ("federation_uuid", "another-federation")),
        ({"receiver": "aggregator_other"}, ("header.receiver", "aggregator_other")),
    ],
    ids=["cn-differs-from-sender", "wrong-federation", "wrong-receiver"],
)
def test_header_that_disagrees_is_denied(
    alice: Caller, header: dict[str, str], words: tuple[str, ...]
) -> None:
    """A header that disagrees with the certificate or this federation gets PERMISSION_DENIED, at once."""
    started = time.monotonic()
    assert_status(_ping(alice, **header), grpc.StatusCode.PERMISSION_DENIED, *words)
    assert time.monotonic() - started < 2  # no OpenFL-style random sleep before answering


@pytest.mark.parametrize(
    "who", ["no-certificate", "foreign_alice", "expired_alice", "future_alice"]
)
def test_unverifiable_client_is_refused_at_handshake(
    server: AggregatorGRPCServer, certs: CertsLayout, request: pytest.FixtureRequest, who: str
) -> None:
    """Without a certificate our CA vouches for now, the TLS handshake fails: the client sees UNAVAILABLE."""
    identity = None if who == "no-certificate" else request.getfixturevalue(who)
    caller = connect(server, certs, identity, "alice")
    # require_client_auth rejects these before any RPC exists, so no status of ours can be sent.
    assert_status(_ping(caller), grpc.StatusCode.UNAVAILABLE)


@pytest.mark.parametrize(
    ("make_chunks", "code", "words"),
    [
        (
            lambda c: chunk_bytes(b"\xff\xff\xff\xff"),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("not a TaskResults",),
        ),
        (lambda c: iter(()), grpc.StatusCode.INVALID_ARGUMENT, ("empty stream",)),
        (
            lambda c: iter([base_pb2.DataStream(size=10, npbytes=b"abc")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("declares 10 bytes",),
        ),
        (
            lambda c: chunk_bytes(b"\0" * (UPLOAD_CAP + 1), 64 * 1024),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ("limit of",),
        ),
        (
            lambda c: task_results_to_chunks(
                c.results(
                    tensors=[
                        base_pb2.NamedTensor(
                            name="dense/bias",
                            transformer_metadata=[base_pb2.MetadataProto(int_list=[4])],
                            data_bytes=b"\0" * 15,
                        )
                    ]
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("needs 16 bytes, got 15",),
        ),
        (
            lambda c: task_results_to_chunks(c.results(task_name="mine_bitcoin")),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("'mine_bitcoin'",),
        ),
        (
            lambda c: task_results_to_chunks(c.results(round_number=5)),
            grpc.StatusCode.FAILED_PRECONDITION,
            ("round 5",),
        ),
        (
            lambda c: task_results_to_chunks(c.results(data_size=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("data_size",),
        ),
        (
            lambda c: task_results_to_chunks(
                c.results(tensors=[encode_tensor("backdoor", np.zeros(3, np.float32))])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("'backdoor'",),
        ),
        (
            lambda c: task_results_to_chunks(
                c.results(tensors=[encode_tensor("dense/bias", np.zeros(5, np.float32))])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("'dense/bias'", "float32[5]", "float32[4]"),
        ),
        (
            lambda c: task_results_to_chunks(c.results(header=c.header(sender="bob"))),
            grpc.StatusCode.PERMISSION_DENIED,
            ("header.sender 'bob'",),
        ),
    ],
    ids=[
        "not-a-protobuf",
        "empty-stream",
        "chunk-size-lies",
        "over-upload-cap",
        "bytes-do-not-match-shape",
        "unknown-task",
        "wrong-round",
        "data-size-zero",
        "tensor-not-in-model",
        "shape-differs-from-model",
        "sender-differs-from-cn",
    ],
)
def test_bad_results_are_refused_and_nothing_is_stored(
    federation_and_server: tuple[Federation, AggregatorGRPCServer],
    alice: Caller,
    make_chunks: object,
    code: grpc.StatusCode,
    words: tuple[str, ...],
) -> None:
    """Each bad upload answers its exact status and message; the federation stores nothing of it."""
    federation = federation_and_server[0]
    before = federation.results()
    assert_status(lambda: alice.send(make_chunks(alice)), code, *words)  # type: ignore[operator]
    assert federation.results() == before
    # The aggregator keeps serving honest callers.
    alice.stub.Ping(aggregator_pb2.PingRequest(header=alice.header()), timeout=10)


def test_unknown_tensor_request_is_invalid(alice: Caller) -> None:
    """Asking for a tensor the model does not have is INVALID_ARGUMENT naming it."""
    request = aggregator_pb2.GetAggregatedTensorRequest(
        header=alice.header(), tensor_name="nope", round_number=0
    )
    assert_status(
        lambda: alice.stub.GetAggregatedTensor(request, timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'nope'",
    )


def test_result_is_accepted_once_and_resend_is_answered_ok(certs: CertsLayout) -> None:
    """Honest results are stored exactly; the same results sent again are answered OK and counted once."""
    plan = make_plan(certs)
    federation = make_federation(plan)
    with running_aggregator(plan, federation) as server:
        caller = connect(
            server,
            certs,
            Identity(certs.collaborator_cert("bob"), certs.collaborator_key("bob")),
            "bob",
        )
        message = caller.results()
        for _ in range(2):
            reply = caller.send(task_results_to_chunks(message, chunk_size=1000))
            assert (reply.header.sender, reply.header.receiver) == (AGGREGATOR_ID, "bob")
        caller.channel.close()
    (stored,) = federation.results()
    assert (stored.collaborator, stored.task_name, stored.data_size) == ("bob", "train", 100)
    sent = {tensor.name: tensor.data_bytes for tensor in message.tensors}
    assert {tensor.name: tensor.array.tobytes() for tensor in stored.tensors} == sent
    tasks = federation.assignment("bob").tasks
    assert "train" not in tasks


def _served_certificate(port: int, ca_bundle: Path) -> x509.Certificate:
    """The certificate a fresh TLS connection to 127.0.0.1:port is shown (no client certificate)."""
    context = ssl.create_default_context(cafile=str(ca_bundle))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_rotated_server_certificate_is_served_without_restart(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """Replacing the aggregator's certificate files makes new connections see the new certificate."""
    rotated = CertsLayout(tmp_path / "certs")
    shutil.copytree(certs.root, rotated.root)
    plan = make_plan(rotated)
    with running_aggregator(plan) as server:
        before = _served_certificate(server.port, rotated.ca_bundle)
        rotated.aggregator_cert.unlink()
        rotated.aggregator_key.unlink()
        setup_local_federation(
            rotated,
            aggregator_host="localhost",
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            collaborators=["alice"],
        )
        after = _served_certificate(server.port, rotated.ca_bundle)
        assert after.serial_number != before.serial_number
        assert after == x509.load_pem_x509_certificate(rotated.aggregator_cert.read_bytes())
        # The new certificate still serves collaborators.
        caller = connect(
            server,
            rotated,
            Identity(rotated.collaborator_cert("alice"), rotated.collaborator_key("alice")),
            "alice",
        )
        caller.stub.Ping(aggregator_pb2.PingRequest(header=caller.header()), timeout=10)
        caller.channel.close()
