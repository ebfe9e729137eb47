"""The aggregator server over real mutual TLS: honest callers, resends, certificate rotation.

Each kind of hostile input, with its exact status, is a row of `test_hostile_input.py`, which
uses the raw `Caller` defined here; the status of each refusal is `test_refusals.py`'s.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509

from foedus.aggregator import encoded_model
from foedus.aggregator.encoded_model import OPENFL_MODEL_TAGS, EncodedModel
from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Array
from foedus.aggregator.server import AggregatorGRPCServer
from foedus.pki.layout import CertsLayout
from foedus.pki.local import setup_local_federation
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc, base_pb2
from foedus.protos.codec import decode_tensor, encode_tensor
from foedus.protos.stream import (
    UPLOAD_BYTES_METADATA,
    task_results_to_chunks,
)

from conftest import Identity
from servers import (
    AGGREGATOR_ID,
    FEDERATION_UUID,
    make_federation,
    make_plan,
    running_aggregator,
    small_model,
)


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
    """One live aggregator for the module."""
    plan = make_plan(certs)
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


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The (tensor name, round) of every tensor the servicer encodes from now on."""
    calls: list[tuple[str, int]] = []

    def counting(
        name: str, array: Array, *, round_number: int, tags: tuple[str, ...]
    ) -> base_pb2.NamedTensor:
        calls.append((name, round_number))
        return encode_tensor(name, array, round_number=round_number, tags=tags)

    monkeypatch.setattr(encoded_model, "encode_tensor", counting)
    return calls


def test_global_tensor_is_encoded_once_for_all_requests(
    certs: CertsLayout, encodes: list[tuple[str, int]]
) -> None:
    """Every request for a global tensor of the round gets the same encoding, made once."""
    plan = make_plan(certs)
    federation = make_federation(plan)
    with running_aggregator(plan, federation) as server:
        callers = [
            connect(
                server, certs, Identity(certs.collaborator_cert(n), certs.collaborator_key(n)), n
            )
            for n in ("alice", "bob")
        ]
        for caller in callers * 2:
            for name in sorted(small_model()):
                request = aggregator_pb2.GetAggregatedTensorRequest(
                    header=caller.header(), tensor_name=name, round_number=0
                )
                reply = caller.stub.GetAggregatedTensor(request, timeout=10)
                assert (reply.header.receiver, reply.round_number) == (caller.name, 0)
                assert reply.tensor == encode_tensor(
                    name, small_model()[name], round_number=0, tags=OPENFL_MODEL_TAGS
                )
        for caller in callers:
            caller.channel.close()
    assert sorted(encodes) == [(name, 0) for name in sorted(small_model())]


def test_encoded_model_keeps_one_round(encodes: list[tuple[str, int]]) -> None:
    """A request for a newer round empties the cache; a late one for an older round does not."""
    cache = EncodedModel()
    weight, bias = np.ones(3, np.float32), np.zeros(2, np.float32)
    first = cache.tensor(0, "weight", weight)
    assert cache.tensor(0, "weight", weight) is first
    cache.tensor(0, "bias", bias)
    newer = cache.tensor(1, "weight", weight)
    assert newer.round_number == 1
    late = cache.tensor(0, "weight", weight)
    assert late.round_number == 0
    assert cache.tensor(1, "weight", weight) is newer
    cache.tensor(1, "bias", bias)
    assert encodes == [("weight", 0), ("bias", 0), ("weight", 1), ("weight", 0), ("bias", 1)]


def test_encoded_model_encodes_a_different_array_again(encodes: list[tuple[str, int]]) -> None:
    """An entry serves only the array it was made from, never a stale encoding."""
    cache = EncodedModel()
    cache.tensor(0, "weight", np.ones(3, np.float32))
    replaced = cache.tensor(0, "weight", np.full(3, 2, np.float32))
    np.testing.assert_array_equal(decode_tensor(replaced, max_bytes=12), np.full(3, 2, np.float32))
    assert len(encodes) == 2


def test_encoded_model_is_shared_by_threads(encodes: list[tuple[str, int]]) -> None:
    """Concurrent first requests for a tensor wait for one encoding and all get it."""
    cache = EncodedModel()
    array = np.arange(1000, dtype=np.float32)
    start = threading.Barrier(8)
    got: list[base_pb2.NamedTensor] = []

    def request() -> None:
        start.wait()
        got.append(cache.tensor(4, "weight", array))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8
    assert all(tensor is got[0] for tensor in got)
    np.testing.assert_array_equal(decode_tensor(got[0], max_bytes=4000), array)
    assert encodes == [("weight", 4)]


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


@pytest.mark.parametrize(
    ("declared", "code", "words"),
    [
        ("{size_plus_one}", grpc.StatusCode.INVALID_ARGUMENT, "upload cut short"),
        ("lots", grpc.StatusCode.INVALID_ARGUMENT, "must be a byte count"),
        (str(2**40), grpc.StatusCode.RESOURCE_EXHAUSTED, "declares 1099511627776 bytes"),
    ],
    ids=["stream-shorter-than-declared", "declared-size-not-a-number", "declared-over-cap"],
)
def test_declared_upload_size_is_enforced(
    federation_and_server: tuple[Federation, AggregatorGRPCServer],
    alice: Caller,
    declared: str,
    code: grpc.StatusCode,
    words: str,
) -> None:
    """A stream that ends short of the size its sender declared is refused, and nothing is stored."""
    federation = federation_and_server[0]
    before = federation.results()
    payload = alice.results().SerializeToString()
    value = declared.format(size_plus_one=len(payload) + 1)
    with pytest.raises(grpc.RpcError) as raised:
        alice.stub.SendLocalTaskResults(
            task_results_to_chunks(alice.results()),
            timeout=10,
            metadata=((UPLOAD_BYTES_METADATA, value),),
        )
    assert raised.value.code() == code, raised.value.details()
    assert words in (raised.value.details() or "")
    assert federation.results() == before


def test_declared_upload_size_that_matches_is_accepted(certs: CertsLayout) -> None:
    """An upload whose declared size matches what arrived is stored as usual."""
    plan = make_plan(certs)
    federation = make_federation(plan)
    with running_aggregator(plan, federation) as server:
        bob = Identity(certs.collaborator_cert("bob"), certs.collaborator_key("bob"))
        caller = connect(server, certs, bob, "bob")
        message = caller.results()
        caller.stub.SendLocalTaskResults(
            task_results_to_chunks(message),
            timeout=10,
            metadata=((UPLOAD_BYTES_METADATA, str(len(message.SerializeToString()))),),
        )
        caller.channel.close()
    assert [result.collaborator for result in federation.results()] == ["bob"]
