"""foedus's streamed model download (`GetAggregatedModel`) over real mutual TLS, and its client.

The stream lifts the one-message limit of OpenFL's unary `GetAggregatedTensor`; each tensor's
chunks are encoded once per round. The client falls back to the unary RPC on an aggregator that
does not stream (OpenFL's), which a server here plays by leaving the method out.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from foedus.aggregator import encoded_model
from foedus.aggregator.records import Array
from foedus.aggregator.server import SERVICE, AggregatorGRPCServer, method_handlers
from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor
from foedus.collaborator.errors import ResponseValidationError
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import server_credentials
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import decode_tensor, encode_tensor

from conftest import Identity
from servers import (
    AGGREGATOR_ID,
    FEDERATION_UUID,
    make_federation,
    make_plan,
    running_aggregator,
    small_model,
)
from test_server import Caller, connect

MIB = 1024 * 1024


def large_model() -> dict[str, Array]:
    """The small model and a tensor of 5 MiB: over one message of 1 MiB, several 2 MiB chunks."""
    rng = np.random.default_rng(0)
    return {**small_model(), "large": rng.standard_normal((1280, 1024)).astype(np.float32)}


@pytest.fixture
def alice_of(certs: CertsLayout) -> Iterator[list[Caller]]:
    """Callers made for alice; closed at the end."""
    callers: list[Caller] = []
    yield callers
    for caller in callers:
        caller.channel.close()


def alice(server: AggregatorGRPCServer, certs: CertsLayout, callers: list[Caller]) -> Caller:
    identity = Identity(certs.collaborator_cert("alice"), certs.collaborator_key("alice"))
    caller = connect(server, certs, identity, "alice")
    callers.append(caller)
    return caller


def client_for(certs: CertsLayout, port: int, **overrides: object) -> AggregatorGRPCClient:
    plan = make_plan(certs, limits={"max_message_bytes": MIB})
    return AggregatorGRPCClient.from_plan(
        plan, "alice", aggregator_address="127.0.0.1", aggregator_port=port, **overrides
    )


def test_a_fixed_stream_window_carries_the_model_both_ways(certs: CertsLayout) -> None:
    """Under `limits.stream_window_bytes` at its least (64 KiB), a 5 MiB tensor, many windows
    long, arrives whole both ways: downloaded, then sent back as the train result."""
    plan = make_plan(certs, limits={"stream_window_bytes": 64 * 1024})
    model = large_model()
    federation = make_federation(plan, model)
    with (
        running_aggregator(plan, federation) as server,
        AggregatorGRPCClient.from_plan(
            plan, "alice", aggregator_address="127.0.0.1", aggregator_port=server.port
        ) as client,
    ):
        fetched = client.get_aggregated_model([], 0)
        np.testing.assert_array_equal(fetched["large"], model["large"])
        sent = [OutgoingTensor(name, array, tags=("trained",)) for name, array in fetched.items()]
        client.send_local_task_results(0, "train", 10, sent)
    (stored,) = federation.results()
    stored_bytes = {t.name: t.array.tobytes() for t in stored.tensors}
    assert stored_bytes == {name: array.tobytes() for name, array in model.items()}


def test_the_whole_model_arrives_exactly_past_the_message_limit(certs: CertsLayout) -> None:
    """A 5 MiB tensor streams under a 1 MiB message limit that refuses it as one message."""
    plan = make_plan(certs, limits={"max_message_bytes": MIB})
    model = large_model()
    with (
        running_aggregator(plan, make_federation(plan, model)) as server,
        client_for(certs, server.port) as client,
    ):
        fetched = client.get_aggregated_model([], 0)
        assert sorted(fetched) == sorted(model)
        for name, array in model.items():
            assert fetched[name].dtype == array.dtype and not fetched[name].flags.writeable
            np.testing.assert_array_equal(fetched[name], array, err_msg=name)
        some = client.get_aggregated_model(["steps", "embedding"], 0)
        assert sorted(some) == ["embedding", "steps"]
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
            client.get_aggregated_tensor("large", 0)


def test_chunks_are_framed_and_encoded_once(
    certs: CertsLayout, alice_of: list[Caller], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header first, then per tensor its metadata and data in chunks; one encoding per round."""
    encoded: list[str] = []
    model_chunks = encoded_model.model_chunks

    def counting(
        name: str, array: Array, round_number: int, chunk_size: int, *, folder: Path | None
    ) -> encoded_model.SpooledChunks:
        encoded.append(name)
        return model_chunks(name, array, round_number, chunk_size, folder=folder)

    monkeypatch.setattr(encoded_model, "model_chunks", counting)
    plan = make_plan(certs, limits={"max_message_bytes": MIB})
    model = large_model()
    with running_aggregator(plan, make_federation(plan, model)) as server:
        caller = alice(server, certs, alice_of)
        for _ in range(2):
            request = aggregator_pb2.GetAggregatedModelRequest(
                header=caller.header(), round_number=0, tensor_names=["large", "steps"]
            )
            chunks = list(caller.stub.GetAggregatedModel(request, timeout=10))
            assert chunks[0].header.receiver == "alice" and not chunks[0].HasField("tensor")
            assert [c.tensor.name for c in chunks if c.HasField("tensor")] == ["large", "steps"]
            steps_at = next(i for i, c in enumerate(chunks) if c.tensor.name == "steps")
            large = chunks[1:steps_at]
            assert large[0].data_size == model["large"].nbytes
            assert all(len(c.data) < MIB for c in large) and len(large) > 5
            joined = b"".join(c.data for c in large)
            tensor = base_pb2.NamedTensor()
            tensor.CopyFrom(large[0].tensor)
            tensor.data_bytes = joined
            np.testing.assert_array_equal(decode_tensor(tensor, max_bytes=8 * MIB), model["large"])
            assert tensor == encode_tensor(
                "large", model["large"], round_number=0, tags=encoded_model.MODEL_TAGS
            )
    assert sorted(encoded) == ["large", "steps"]


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"tensor_names": ["nope"]}, grpc.StatusCode.INVALID_ARGUMENT, "'nope'"),
        ({"tensor_names": ["steps", "steps"]}, grpc.StatusCode.INVALID_ARGUMENT, "more than once"),
        ({"round_number": 1}, grpc.StatusCode.FAILED_PRECONDITION, "round 1"),
        ({"round_number": -1}, grpc.StatusCode.INVALID_ARGUMENT, "round_number"),
        ({"header": {"sender": "bob"}}, grpc.StatusCode.PERMISSION_DENIED, "bob"),
        ({"header": {"federation_uuid": "x"}}, grpc.StatusCode.PERMISSION_DENIED, "federation"),
    ],
)
def test_bad_requests_are_refused_with_their_status(
    certs: CertsLayout,
    alice_of: list[Caller],
    fields: dict[str, object],
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    """Each bad request ends the stream with its status before any chunk; the server goes on."""
    plan = make_plan(certs)
    with running_aggregator(plan, make_federation(plan)) as server:
        caller = alice(server, certs, alice_of)
        header = caller.header(**fields.pop("header", {}))  # type: ignore[arg-type]
        values: dict[str, object] = {"header": header, "round_number": 0, **fields}
        request = aggregator_pb2.GetAggregatedModelRequest(**values)  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as refused:
            list(caller.stub.GetAggregatedModel(request, timeout=10))
        assert refused.value.code() is code
        assert fragment in (refused.value.details() or "")
        honest = aggregator_pb2.GetAggregatedModelRequest(header=caller.header(), round_number=0)
        assert (
            len(list(caller.stub.GetAggregatedModel(honest, timeout=10))) == 1 + 4 + 4
        )  # header, then metadata and data of each tensor


def test_client_falls_back_to_unary_on_an_aggregator_that_does_not_stream(
    certs: CertsLayout,
) -> None:
    """Against a server without GetAggregatedModel (as OpenFL's), tensors come one by one."""
    plan = make_plan(certs)
    aggregator = AggregatorGRPCServer(plan, make_federation(plan))
    handlers = method_handlers(aggregator.servicer)
    del handlers["GetAggregatedModel"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    assert plan.tls.certs is not None
    port = server.add_secure_port(
        "127.0.0.1:0",
        server_credentials(
            plan.tls.certs.aggregator_cert, plan.tls.certs.aggregator_key, plan.tls.certs.ca_bundle
        ),
    )
    server.start()
    try:
        with client_for(certs, port) as client:
            for _ in range(2):  # the second time without trying the stream again
                fetched = client.get_aggregated_model(["steps", "dense/bias"], 0)
                np.testing.assert_array_equal(fetched["steps"], small_model()["steps"])
            with pytest.raises(Exception, match="name the tensors"):
                client.get_aggregated_model([], 0)
    finally:
        server.stop(0).wait()


def header_chunk(**fields: str) -> aggregator_pb2.ModelChunk:
    values = {"sender": AGGREGATOR_ID, "receiver": "alice", "federation_uuid": FEDERATION_UUID}
    return aggregator_pb2.ModelChunk(header=aggregator_pb2.MessageHeader(**{**values, **fields}))


def tensor_chunks(
    name: str, array: Array, *, round_number: int = 0
) -> list[aggregator_pb2.ModelChunk]:
    return [
        aggregator_pb2.ModelChunk.FromString(chunk)
        for chunk in encoded_model.model_chunks(name, array, round_number, 8)
    ]


WEIGHT = np.arange(6, dtype=np.float32)


@pytest.mark.parametrize(
    ("chunks", "fragment"),
    [
        ([header_chunk(sender="mallory")], "header.sender"),
        ([], "ended before its header"),
        ([header_chunk(), *tensor_chunks("weight", WEIGHT)[:-1]], "16 of the 24 bytes"),
        (
            [
                header_chunk(),
                *tensor_chunks("weight", WEIGHT),
                aggregator_pb2.ModelChunk(data=b"x"),
            ],
            "more data",
        ),
        ([header_chunk(), aggregator_pb2.ModelChunk(data=b"x")], "before a tensor"),
        ([header_chunk(), *tensor_chunks("other", WEIGHT)], "'other'"),
        ([header_chunk(), *tensor_chunks("weight", WEIGHT, round_number=3)], "got round 3"),
        ([header_chunk(), *tensor_chunks("weight", WEIGHT)[:1]], "0 of the 24 bytes"),
        ([header_chunk()], "lacks 'weight'"),
        (
            [header_chunk(), *tensor_chunks("weight", WEIGHT), *tensor_chunks("weight", WEIGHT)],
            "came twice",
        ),
        (
            [
                header_chunk(),
                aggregator_pb2.ModelChunk(
                    tensor=tensor_chunks("weight", WEIGHT)[0].tensor, data_size=2**40
                ),
            ],
            "announced",
        ),
    ],
)
def test_client_refuses_a_bad_model_stream(
    certs: CertsLayout, chunks: list[aggregator_pb2.ModelChunk], fragment: str
) -> None:
    """What a broken or hostile aggregator streams is checked before it is trusted or allocated."""
    client = client_for(certs, 1, max_tensor_bytes=2**41)
    with pytest.raises(ResponseValidationError, match=fragment):
        client._assemble_model(iter(chunks), ["weight"], 0)


def test_client_bounds_what_it_allocates(certs: CertsLayout) -> None:
    """A tensor over the client's max_tensor_bytes is refused before any allocation."""
    client = client_for(certs, 1, max_tensor_bytes=16)
    with pytest.raises(ResponseValidationError, match="over the limit of 16 bytes"):
        client._assemble_model(iter([header_chunk(), *tensor_chunks("weight", WEIGHT)]), [], 0)


def test_strangers_get_no_model(
    certs: CertsLayout, stranger: Identity, foreign_alice: Identity, alice_of: list[Caller]
) -> None:
    """A certificate of our CA not in the plan is refused by name; one of another CA in the handshake."""
    plan = make_plan(certs)
    with running_aggregator(plan, make_federation(plan)) as server:
        for identity, name, code, fragment in (
            (stranger, "mallory", grpc.StatusCode.PERMISSION_DENIED, "'mallory'"),
            (foreign_alice, "alice", grpc.StatusCode.UNAVAILABLE, ""),
        ):
            caller = connect(server, certs, identity, name)
            alice_of.append(caller)
            request = aggregator_pb2.GetAggregatedModelRequest(
                header=caller.header(), round_number=0
            )
            with pytest.raises(grpc.RpcError) as refused:
                list(caller.stub.GetAggregatedModel(request, timeout=10))
            assert refused.value.code() is code
            assert fragment in (refused.value.details() or "")
