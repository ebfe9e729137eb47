"""OpenFL collaborators' compression pipelines at a foedus aggregator: decoded, or refused by name.

The tensors are OpenFL's own (the committed vectors of `tests/data/openfl_pipelines.json`, made by
OpenFL 1.9's pipelines), sent as an OpenFL collaborator sends them: in a `TaskResults`, deltas
tagged `delta` (`use_delta_updates: true`). Driven through `receive_upload` without a socket,
then the refusals through a real aggregator over mutual TLS, whose federation goes on to accept
an honest KCPipeline upload.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from foedus.aggregator.records import Array
from foedus.aggregator.upload import ReceivedUpload, read_tensors_file, receive_upload
from foedus.compression.errors import CompressedTooLargeError
from foedus.compression.openfl import Metadata, UnsupportedPipelineError
from foedus.pki.layout import CertsLayout
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.stream import chunk_bytes
from foedus.refusals.errors import InvalidRequestError

from conftest import Identity
from openfl_vectors import Vector, load_vectors
from servers import make_federation, make_plan, running_aggregator
from test_server import connect

VECTORS = load_vectors()
DELTAS = [vector for vector in VECTORS if "delta" in vector.tags]
HEADER = aggregator_pb2.MessageHeader(sender="bob", receiver="aggregator_test")
LOSSY = ("delta", "lossy_compressed", "trained")
MAX_TENSOR_BYTES = 2**20


def base_of(shape: Sequence[int]) -> Array:
    """The round's global tensor a delta is taken from."""
    return np.random.default_rng(24).standard_normal(tuple(shape)).astype(np.float32)


def named(
    name: str,
    tags: Sequence[str],
    metadata: Sequence[Metadata],
    data: bytes,
    *,
    report: bool = False,
) -> base_pb2.NamedTensor:
    """A NamedTensor as OpenFL's `construct_named_tensor` builds it (`lossless` false on a delta)."""
    tensor = base_pb2.NamedTensor(
        name=name, round_number=0, report=report, lossless="delta" not in tags, data_bytes=data
    )
    tensor.tags.extend(tags)
    for entry in metadata:
        proto = tensor.transformer_metadata.add()
        proto.int_to_float.update(entry.int_to_float)
        proto.int_list.extend(entry.int_list)
        proto.bool_list.extend(entry.bool_list)
    return tensor


def from_vector(name: str, vector: Vector) -> base_pb2.NamedTensor:
    """The vector's tensor, named `name`."""
    return named(name, vector.tags, vector.metadata, vector.data)


def raw_delta(name: str, delta: Array) -> base_pb2.NamedTensor:
    """A delta as NoCompressionPipeline sends it (the lossless path: tag `compressed`)."""
    values = np.ascontiguousarray(delta, dtype="<f4")
    return named(
        name,
        ("compressed", "delta", "trained"),
        [Metadata(int_list=values.shape)],
        values.tobytes(),
    )


def metric(name: str = "loss", value: float = 0.5) -> base_pb2.NamedTensor:
    """A metric as OpenFL's NoCompressionPipeline sends it."""
    data = np.float32(value).tobytes()
    return named(name, ("compressed", "metric"), [Metadata()], data, report=True)


def upload(
    tensors: Sequence[base_pb2.NamedTensor], header: aggregator_pb2.MessageHeader = HEADER
) -> bytes:
    """The serialized `TaskResults` of round 0's train holding `tensors`."""
    return aggregator_pb2.TaskResults(
        header=header, round_number=0, task_name="train", data_size=100, tensors=tensors
    ).SerializeToString()


def pieces(data: bytes, size: int = 4093) -> Iterator[bytes]:
    return (data[start : start + size] for start in range(0, len(data), size))


def receive(data: bytes, folder: Path, model: Mapping[str, Array]) -> ReceivedUpload:
    """Receive as the aggregator does: OpenFL deltas added to the raw global model."""
    return receive_upload(
        pieces(data),
        folder,
        on_head=lambda head: None,
        model_dtype=lambda name: model[name].dtype if name in model else None,
        max_tensor_bytes=MAX_TENSOR_BYTES,
        expected_bytes=len(data),
        base=lambda name: None,  # a foedus site's coded tensors: none here
        raw_base=model.get,
    )


def arrays(received: ReceivedUpload) -> dict[str, Array]:
    return {tensor.name: tensor.array for tensor in received.tensors}


def eden() -> base_pb2.NamedTensor:
    """An EdenPipeline delta, its layout from OpenFL's source (OpenFL's venv has no PyTorch)."""
    table = {0: 7.0, 1: 16.0, 2: 0.5, 3: 16.0}
    return named("w", LOSSY, [Metadata(int_to_float=table, int_list=(8, 16))], b"\x00" * 8)


# -- decoded, deltas added back -----------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=[vector.name for vector in VECTORS])
def test_each_vector_is_taken_as_its_sender_meant(vector: Vector, tmp_path: Path) -> None:
    """Each pipeline's tensor becomes raw float32: a delta plus the global model's tensor in
    float32, anything else its values; the kept file is a raw upload with neither tag."""
    base = base_of(vector.shape)
    received = receive(upload([from_vector("w", vector)]), tmp_path, {"w": base})
    expected = vector.sent.reshape(vector.shape)
    if "delta" in vector.tags:
        expected = np.add(base, expected, dtype=np.float32)
    (tensor,) = received.tensors
    assert tensor.array.dtype == np.float32
    assert tensor.array.tobytes() == expected.tobytes()
    assert tensor.tags == {"compressed", "trained"}
    assert tensor.finite
    _, stored = read_tensors_file(received.file.path, max_tensor_bytes=MAX_TENSOR_BYTES)
    assert stored[0].array.tobytes() == expected.tobytes()
    assert list(tmp_path.iterdir()) == [received.file.path]


def test_a_random_shift_metric_is_decoded_too(tmp_path: Path) -> None:
    """RandomShiftPipeline codes every tensor, metrics too: a metric comes back as its value."""
    (scalar,) = (v for v in VECTORS if v.name == "RandomShiftPipeline()/scalar")
    tensor = named("loss", ("compressed", "metric"), scalar.metadata, scalar.data, report=True)
    received = receive(upload([tensor]), tmp_path, {})
    assert arrays(received)["loss"].tobytes() == scalar.sent.tobytes()


def test_a_foedus_raw_upload_is_not_touched(tmp_path: Path) -> None:
    """Plain tensors (one metadata entry, no delta, not lossy) take the raw path: no new file."""
    model = {"w": base_of((3, 4))}
    tensor = named(
        "w", ("compressed", "trained"), [Metadata(int_list=(3, 4))], model["w"].tobytes()
    )
    data = upload([tensor, metric()])
    received = receive(data, tmp_path, model)
    assert received.file.size == len(data)  # the spool as sent, not a transcoded file
    assert arrays(received)["w"].tobytes() == model["w"].tobytes()


# -- refused ------------------------------------------------------------------------------------

MODEL = {"w": base_of((8, 16)), "b": base_of((4,))}


def refusals() -> list[tuple[str, base_pb2.NamedTensor, grpc.StatusCode, str]]:
    """(id, tensor, status, words of its message) per refused tensor, for `MODEL`."""
    (kc,) = (v for v in VECTORS if v.name == "KCPipeline()/delta")
    bomb = gzip.compress(bytes(4 * 128 * 64), mtime=0)  # 64 times the bytes 128 values need
    unknown = [*kc.metadata, Metadata(), Metadata()]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("eden", eden(), invalid, "OpenFL's EdenPipeline is refused"),
        ("unknown", named("w", LOSSY, unknown, kc.data), invalid, "not one of OpenFL 1.9's"),
        ("delta-metric", raw_delta("loss", np.float32(0.1)), invalid, "not in the global model"),
        (
            "other-shape",
            raw_delta("w", np.zeros((16, 8), np.float32)),
            invalid,
            "float32[16, 8], the global model's is float32[8, 16]",
        ),
        (
            "bomb",
            named("w", LOSSY, kc.metadata, bomb),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "inflates past",
        ),
    ]


REFUSALS = refusals()
ERRORS = {
    "eden": UnsupportedPipelineError,
    "unknown": UnsupportedPipelineError,
    "bomb": CompressedTooLargeError,
}


@pytest.mark.parametrize(
    ("refused", "tensor", "words"),
    [(refusal[0], refusal[1], refusal[3]) for refusal in REFUSALS],
    ids=[refusal[0] for refusal in REFUSALS],
)
def test_a_tensor_no_pipeline_can_give_is_refused_with_nothing_kept(
    refused: str, tensor: base_pb2.NamedTensor, words: str, tmp_path: Path
) -> None:
    """Eden and unknown pipelines by name, a delta that is no model tensor's, a payload that
    inflates past its values: refused, naming the tensor, and no file is left behind."""
    with pytest.raises(ERRORS.get(refused, InvalidRequestError)) as raised:
        receive(upload([tensor, metric()]), tmp_path, MODEL)
    assert words in str(raised.value)
    assert f"tensor {tensor.name!r}" in str(raised.value)
    assert not any(tmp_path.iterdir())


def test_refusals_through_a_real_aggregator_leave_the_federation_going(
    certs: CertsLayout,
) -> None:
    """Over mutual TLS each refused OpenFL upload gets its exact status and a message naming
    what to do, then the same collaborator's honest KCPipeline upload (use_delta_updates) is
    accepted: its deltas added to the raw global model."""
    plan = make_plan(certs)
    federation = make_federation(plan, MODEL)
    bob = Identity(certs.collaborator_cert("bob"), certs.collaborator_key("bob"))
    (kc,) = (v for v in VECTORS if v.name == "KCPipeline()/delta")
    bias = np.array([0.25, -0.5, 0.0, 1.0], np.float32)
    with running_aggregator(plan, federation) as server:
        caller = connect(server, certs, bob, "bob")
        try:
            for refused, tensor, status, words in REFUSALS:
                data = upload([tensor, metric()], caller.header())
                with pytest.raises(grpc.RpcError) as raised:
                    caller.send(chunk_bytes(data, 4096))
                error = raised.value
                assert isinstance(error, grpc.Call)
                assert error.code() == status, (refused, error.details())
                assert words in (error.details() or ""), (refused, error.details())
            honest = [from_vector("w", kc), raw_delta("b", bias), metric()]
            caller.send(chunk_bytes(upload(honest, caller.header()), 4096))
        finally:
            caller.channel.close()
        assert server.servicer.admission.in_progress() == 0
    (result,) = federation.results()
    got = {tensor.name: tensor.array for tensor in result.tensors}
    expected_w = np.add(MODEL["w"], kc.sent.reshape(8, 16), dtype=np.float32)
    assert got["w"].tobytes() == expected_w.tobytes()
    assert got["b"].tobytes() == np.add(MODEL["b"], bias, dtype=np.float32).tobytes()
    assert float(got["loss"]) == 0.5
