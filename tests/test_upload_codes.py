"""Coded uploads (issue #24): the aggregator decodes them into the raw upload they stand for.

Uploads are made as a site makes them: `coded_tensor_frame` around the compression encoders'
payloads of the delta from the global model (the XOR of the bits for lossless). Driven through
`receive_upload` without a socket, then each refusal through a real aggregator over mutual TLS,
whose federation goes on to accept an honest coded upload.
"""

from __future__ import annotations

import dataclasses
import os
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foedus.aggregator.digest import new_digest
from foedus.aggregator.records import Array
from foedus.aggregator.upload import ReceivedUpload, read_tensors_file, receive_upload
from foedus.compression.codes import Code
from foedus.compression.download import round_trip
from foedus.compression.lossless import compress_chunk, compress_chunks
from foedus.compression.quantize import (
    bfloat16_decode,
    bfloat16_encode,
    int8_decode,
    int8_encode,
)
from foedus.compression.topk import kept_count, topk_decode, topk_encode, topk_max_size
from foedus.pki.layout import CertsLayout
from foedus.plans.schema import CodeSettings, CompressionSettings
from foedus.protos import aggregator_pb2
from foedus.protos.codec import (
    TensorFrame,
    coded_tensor_frame,
    decode_tensor,
    tensor_field_frame,
)
from foedus.protos.dtypes import FLOAT32
from foedus.protos.results_reader import TENSORS_FIELD
from foedus.protos.stream import StreamError, chunk_bytes
from foedus.refusals.errors import InvalidRequestError
from foedus.refusals.grpc import status_of

from conftest import Identity
from servers import make_federation, make_plan, running_aggregator, small_model
from test_server import connect

LOSSLESS = CodeSettings(Code.LOSSLESS)
INT8 = CodeSettings(Code.INT8)
BFLOAT16 = CodeSettings(Code.BFLOAT16)
TOPK = CodeSettings(Code.TOPK, 0.1, "float32")
TOPK_INT8 = CodeSettings(Code.TOPK, 0.01, "int8")
HEADER = aggregator_pb2.MessageHeader(sender="bob", receiver="aggregator_test")


def big_model() -> dict[str, Array]:
    """A model whose largest tensor is several lossless chunks, beside a few other dtypes."""
    rng = np.random.default_rng(24)
    return {
        "conv": rng.standard_normal((300, 1000), dtype=np.float32),  # 1.2 MB: 2 chunks
        "bias": np.linspace(-1, 1, 10, dtype=np.float32),
        "counts": np.arange(5, dtype=np.int64),
        "half": np.ones((2, 3), np.float16),
        "empty": np.zeros((0, 3), np.float32),
    }


def trained_from(model: Mapping[str, Array]) -> dict[str, Array]:
    """A site's trained model: the global one moved a little (ints counted on)."""
    rng = np.random.default_rng(7)
    trained: dict[str, Array] = {}
    for name, array in model.items():
        if array.dtype.kind == "f":
            step = rng.standard_normal(array.shape) * 0.01
            trained[name] = (array + step).astype(array.dtype)
        else:
            trained[name] = array + 1
    return trained


@dataclass(frozen=True)
class Coded:
    """One tensor of an upload: its frame, and the values the aggregator must make of it."""

    frame: TensorFrame
    expected: Array


def coded(name: str, trained: Array, base: Array, settings: CodeSettings) -> Coded:
    """`trained` as a site sends it under `settings`: a delta from `base`, or raw."""
    code = settings.code
    if code is Code.NONE or (code.lossy and trained.dtype != FLOAT32):
        return Coded(tensor_field_frame(TENSORS_FIELD, name, trained), trained)
    if code is Code.LOSSLESS:
        bits = np.bitwise_xor(trained.reshape(-1).view(np.uint8), base.reshape(-1).view(np.uint8))
        payload = b"".join(compress_chunks(bits, trained.dtype.itemsize))
        return Coded(frame(name, payload, trained), trained)
    delta = np.subtract(trained, base, dtype=np.float32).reshape(-1)
    count = delta.size
    if code is Code.BFLOAT16:
        payload = bfloat16_encode(delta)
        decoded = bfloat16_decode(payload, count)
    elif code is Code.INT8:
        payload = int8_encode(delta)
        decoded = int8_decode(payload, count)
    else:
        assert settings.fraction is not None
        payload = topk_encode(delta, settings.fraction, values_code=settings.values)
        decoded = topk_decode(payload, count)
    expected = np.add(base.reshape(-1), decoded, dtype=np.float32).reshape(base.shape)
    return Coded(frame(name, payload, trained, code=code), expected)


def frame(
    name: str,
    payload: bytes,
    like: Array,
    *,
    code: Code = Code.LOSSLESS,
    delta: bool = True,
    dtype: np.dtype[np.generic] | None = None,
    shape: tuple[int, ...] | None = None,
) -> TensorFrame:
    """A coded tensor of `like`'s dtype and shape (unless told otherwise) around `payload`."""
    return coded_tensor_frame(
        TENSORS_FIELD,
        name,
        payload,
        dtype=like.dtype if dtype is None else dtype,
        shape=like.shape if shape is None else shape,
        code=code,
        delta=delta,
    )


def honest(
    settings: CodeSettings, model: Mapping[str, Array], **replaced: TensorFrame
) -> list[Coded]:
    """A site's train results of `model` + a step under `settings`, a raw metric after them;
    `replaced` frames instead of some."""
    tensors = [
        coded(name, array, model[name], settings) for name, array in trained_from(model).items()
    ]
    loss = np.float32(0.5)
    tensors.append(Coded(tensor_field_frame(TENSORS_FIELD, "loss", loss, tags=["metric"]), loss))
    names = [*model, "loss"]
    return [
        Coded(replaced[name], tensor.expected) if name in replaced else tensor
        for name, tensor in zip(names, tensors, strict=True)
    ]


def upload(tensors: Sequence[Coded], header: aggregator_pb2.MessageHeader = HEADER) -> bytes:
    """The serialized `TaskResults` of round 0's train with `tensors`."""
    head = aggregator_pb2.TaskResults(
        header=header, round_number=0, task_name="train", data_size=100
    ).SerializeToString()
    return head + b"".join(bytes(part) for tensor in tensors for part in tensor.frame.parts())


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[start : start + size] for start in range(0, len(data), size))


def receive(
    data: bytes,
    folder: Path,
    model: Mapping[str, Array],
    settings: CodeSettings,
    chunk_size: int = 65536,
) -> ReceivedUpload:
    return receive_upload(
        pieces(data, chunk_size),
        folder,
        on_head=lambda head: None,
        model_dtype=lambda name: model[name].dtype if name in model else None,
        max_tensor_bytes=2**24,
        expected_bytes=len(data),
        base=model.get,
        upload_code=settings,
    )


def arrays(received: ReceivedUpload) -> dict[str, Array]:
    return {tensor.name: tensor.array for tensor in received.tensors}


# -- coded uploads made raw -------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [4093, 2**20])
def test_a_lossless_upload_gives_the_trained_bits_back_in_a_raw_file(
    tmp_path: Path, chunk_size: int
) -> None:
    """XOR deltas of every dtype decode to exactly the trained bits; the file that replaces the
    spool is the raw TaskResults a site would have sent, its size and digest its own."""
    model = big_model()
    tensors = honest(LOSSLESS, model)
    data = upload(tensors)
    received = receive(data, tmp_path, model, LOSSLESS, chunk_size)
    trained = {**trained_from(model), "loss": np.float32(0.5)}
    got = arrays(received)
    assert got.keys() == trained.keys()
    for name, array in trained.items():
        assert got[name].dtype == array.dtype and got[name].tobytes() == array.tobytes(), name
    assert isinstance(got["conv"], np.memmap)  # mapped from the new file, not held
    assert list(tmp_path.iterdir()) == [received.file.path]  # the coded spool is gone
    raw = received.file.path.read_bytes()
    assert len(data) < len(raw) == received.file.size
    digest = new_digest()
    digest.update(raw)
    assert received.file.digest == digest.hexdigest()
    message = aggregator_pb2.TaskResults.FromString(raw)
    assert (message.header, message.round_number, message.task_name, message.data_size) == (
        HEADER,
        0,
        "train",
        100,
    )
    for tensor in message.tensors:
        assert not tensor.foedus_code and not tensor.foedus_delta and tensor.lossless
        assert "lossy_compressed" not in tensor.tags
        assert decode_tensor(tensor, max_bytes=2**24).tobytes() == trained[tensor.name].tobytes()
    _, read_back = read_tensors_file(received.file.path, max_tensor_bytes=2**24)
    assert {t.name: t.array.tobytes() for t in read_back} == {
        name: array.tobytes() for name, array in trained.items()
    }
    finite = {tensor.name: tensor.finite for tensor in received.tensors}
    assert finite == {
        "conv": True,
        "bias": True,
        "counts": None,
        "half": True,
        "empty": True,
        "loss": None,
    }


@pytest.mark.parametrize(
    "settings", [BFLOAT16, INT8, TOPK, TOPK_INT8], ids=["bfloat16", "int8", "topk", "topk-int8"]
)
def test_a_lossy_upload_gives_base_plus_decoded(tmp_path: Path, settings: CodeSettings) -> None:
    """float32 tensors come back as base + decode(payload) in float32, bit for bit; other
    dtypes travel raw and are taken as they are."""
    model = big_model()
    tensors = honest(settings, model)
    received = receive(upload(tensors), tmp_path, model, settings)
    got = arrays(received)
    for name, tensor in zip([*model, "loss"], tensors, strict=True):
        assert got[name].dtype == tensor.expected.dtype, name
        assert got[name].tobytes() == np.asarray(tensor.expected).tobytes(), name
    assert not np.array_equal(got["conv"], model["conv"])  # the update arrived
    assert list(tmp_path.iterdir()) == [received.file.path]
    assert {t.name: t.finite for t in received.tensors}["conv"] is True


def test_an_upload_without_coded_tensors_is_kept_as_it_came(tmp_path: Path) -> None:
    """Raw tensors are always accepted, whatever the plan's code (OpenFL sites send them)."""
    model = big_model()
    data = upload(honest(CodeSettings(), model))
    received = receive(data, tmp_path, model, INT8)
    assert received.file.path.read_bytes() == data


def test_a_coded_delta_that_overflows_is_found_non_finite(tmp_path: Path) -> None:
    """NaN and infinities are looked for in base + decoded, not in the payload's bytes."""
    model = {"w": np.full(600, 3e38, np.float32)}
    delta = np.full(600, 3e38, np.float32)  # finite itself; base + it is not
    tensors = [Coded(frame("w", int8_encode(delta), model["w"], code=Code.INT8), model["w"])]
    received = receive(upload(tensors), tmp_path, model, INT8)
    (tensor,) = received.tensors
    assert tensor.finite is False and np.isinf(tensor.array).all()


def test_decoding_holds_a_few_megabytes_whatever_the_tensor(tmp_path: Path) -> None:
    """A 16 MB tensor sent lossless (its noisy bits barely compress) is decoded a slice at a
    time: the payload and the decoded tensor are never held whole."""
    rng = np.random.default_rng(1)
    model = {"w": rng.standard_normal(4 * 2**20, dtype=np.float32)}
    trained = {"w": rng.standard_normal(4 * 2**20, dtype=np.float32)}
    data = upload([coded("w", trained["w"], model["w"], LOSSLESS)])
    assert len(data) > 8 * 2**20
    tracemalloc.start()
    try:
        received = receive(data, tmp_path, model, LOSSLESS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, peak
    assert arrays(received)["w"].tobytes() == trained["w"].tobytes()


@pytest.mark.parametrize("values", ["float32", "int8"])
@pytest.mark.parametrize("count", [1, 2, 127, 128, 129, 1000, 20000, 300000])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_the_bound_on_a_topk_payload_holds_for_every_encoding(
    values: str, count: int, fraction: float
) -> None:
    """No honest topk payload is longer than the bound the aggregator refuses past, whether its
    largest values are spread (the widest gaps) or bunched."""
    rng = np.random.default_rng(count)
    spread = np.zeros(count, np.float32)
    spread[:: max(1, count // kept_count(count, fraction))] = 1
    for vector in (rng.standard_normal(count, dtype=np.float32), spread):
        payload = topk_encode(vector, fraction, values_code=values)
        assert len(payload) <= topk_max_size(count, kept_count(count, fraction))


# -- refusals ---------------------------------------------------------------------------------

MODEL = small_model()  # the test servers' global model
WEIGHT = MODEL["dense/weight"]  # float32 (3, 4)
BIAS = MODEL["dense/bias"]  # float32 (4,)


def int8_of(values: Array) -> bytes:
    return int8_encode(np.asarray(values, np.float32).reshape(-1))


def topk_out_of_range() -> bytes:
    """A topk payload for 12 values whose two kept ones lie past them, at 22 and 23."""
    values = np.zeros(24, np.float32)
    values[22:] = 1
    return topk_encode(values, 1 / 12)


@dataclass(frozen=True)
class Refusal:
    """One bad coded upload under the plan's `settings`: its status and key phrases."""

    id: str
    settings: CodeSettings
    tensors: Callable[[], list[Coded]]
    code: grpc.StatusCode
    words: tuple[str, ...]


INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

REFUSALS = [
    Refusal(
        "another-code-than-the-plans",
        LOSSLESS,
        lambda: honest(
            LOSSLESS, MODEL, **{"dense/weight": frame("w", int8_of(WEIGHT), WEIGHT, code=Code.INT8)}
        ),
        INVALID,
        ("tensor 'w' is coded int8, where the plan's compression.upload is lossless",),
    ),
    Refusal(
        "coded-where-the-plan-says-none",
        CodeSettings(),
        lambda: honest(LOSSLESS, MODEL),
        INVALID,
        ("is coded lossless, where the plan's compression.upload is none",),
    ),
    Refusal(
        "not-a-delta",
        INT8,
        lambda: honest(
            INT8,
            MODEL,
            **{
                "dense/weight": frame(
                    "dense/weight", int8_of(WEIGHT), WEIGHT, code=Code.INT8, delta=False
                )
            },
        ),
        INVALID,
        ("tensor 'dense/weight' is coded int8 but is not a delta",),
    ),
    Refusal(
        "lossless-chunk-inflating-past-its-size",
        LOSSLESS,
        lambda: honest(
            LOSSLESS,
            MODEL,
            **{"dense/bias": frame("dense/bias", compress_chunk(bytes(32), 4), BIAS)},
        ),
        EXHAUSTED,
        ("tensor 'dense/bias'", "declares 32 raw bytes", "refused before it is inflated"),
    ),
    Refusal(
        "lossless-cut-short",
        LOSSLESS,
        lambda: honest(
            LOSSLESS,
            MODEL,
            **{
                "dense/weight": frame(
                    "dense/weight", compress_chunk(WEIGHT.tobytes(), 4)[:-3], WEIGHT
                )
            },
        ),
        INVALID,
        ("lossless tensor 'dense/weight'", "end inside chunk 0 of 1"),
    ),
    Refusal(
        "topk-index-out-of-range",
        TOPK,
        lambda: honest(
            TOPK,
            MODEL,
            **{"dense/weight": frame("dense/weight", topk_out_of_range(), WEIGHT, code=Code.TOPK)},
        ),
        INVALID,
        ("tensor 'dense/weight'", "topk index out of range"),
    ),
    Refusal(
        "topk-past-the-plans-fraction",
        TOPK,
        lambda: honest(
            TOPK,
            MODEL,
            **{
                "dense/weight": frame(
                    "dense/weight", topk_encode(WEIGHT.reshape(-1), 1.0), WEIGHT, code=Code.TOPK
                )
            },
        ),
        EXHAUSTED,
        ("topk payload of tensor 'dense/weight'", "compression.upload.fraction (0.1)"),
    ),
    Refusal(
        "int8-payload-of-the-wrong-size",
        INT8,
        lambda: honest(
            INT8,
            MODEL,
            **{"dense/weight": frame("dense/weight", int8_of(WEIGHT[:2]), WEIGHT, code=Code.INT8)},
        ),
        INVALID,
        ("int8 payload of tensor 'dense/weight'", "where 12 values in blocks of 256 need"),
    ),
    Refusal(
        "bfloat16-payload-of-the-wrong-size",
        BFLOAT16,
        lambda: honest(
            BFLOAT16,
            MODEL,
            **{"dense/bias": frame("dense/bias", bytes(6), BIAS, code=Code.BFLOAT16)},
        ),
        INVALID,
        ("bfloat16 payload of tensor 'dense/bias': 6 bytes where 4 values need 8",),
    ),
    Refusal(
        "shape-differs-from-the-global-model",
        LOSSLESS,
        lambda: honest(
            LOSSLESS,
            MODEL,
            **{
                "dense/weight": frame(
                    "dense/weight", compress_chunk(WEIGHT.tobytes(), 4), WEIGHT, shape=(4, 3)
                )
            },
        ),
        INVALID,
        ("tensor 'dense/weight' is float32[4, 3], the global model's is float32[3, 4]",),
    ),
    Refusal(
        "dtype-differs-from-the-global-model",
        LOSSLESS,
        lambda: honest(
            LOSSLESS,
            MODEL,
            **{
                "steps": frame(
                    "steps", compress_chunk(bytes(4), 4), MODEL["steps"], dtype=np.dtype("<i4")
                )
            },
        ),
        INVALID,
        ("tensor 'steps' is int32[], the global model's is int64[]",),
    ),
    Refusal(
        "lossy-code-on-integers",
        INT8,
        lambda: honest(
            INT8,
            MODEL,
            **{"steps": frame("steps", int8_of(np.float32(7)), MODEL["steps"], code=Code.INT8)},
        ),
        INVALID,
        ("tensor 'steps': int8 codes float32 values, not int64",),
    ),
    Refusal(
        "a-coded-tensor-twice",
        INT8,
        lambda: [*honest(INT8, MODEL), coded("dense/weight", WEIGHT + 1, WEIGHT, INT8)],
        INVALID,
        ("results name the same tensor more than once ('dense/weight', coded)",),
    ),
    Refusal(
        "a-coded-metric",
        INT8,
        lambda: honest(
            INT8,
            MODEL,
            loss=frame("loss", int8_of(np.float32(0.5)), np.float32(0.5), code=Code.INT8),
        ),
        INVALID,
        ("tensor 'loss' is coded int8 but is not in the global model",),
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[refusal.id for refusal in REFUSALS])
def test_a_bad_coded_upload_is_refused_and_nothing_is_kept(
    tmp_path: Path, refusal: Refusal
) -> None:
    """Each bad coded tensor is refused with its status and message; no file is left."""
    with pytest.raises(Exception) as raised:  # the status is what is checked
        receive(upload(refusal.tensors()), tmp_path, MODEL, refusal.settings)
    assert status_of(raised.value) == refusal.code, raised.value
    for word in refusal.words:
        assert word in str(raised.value), raised.value
    assert not any(tmp_path.iterdir())


SERVED = {
    "none": CodeSettings(),
    "lossless": LOSSLESS,
    "bfloat16": BFLOAT16,
    "int8": INT8,
    "topk": TOPK,
}


def test_every_refusal_is_sent_to_a_real_aggregator() -> None:
    """Each row's plan code is one a real aggregator below runs with."""
    assert {refusal.id for refusal in REFUSALS if refusal.settings not in SERVED.values()} == set()


@pytest.mark.parametrize("settings", SERVED.values(), ids=SERVED.keys())
def test_refusals_through_a_real_aggregator_leave_the_federation_going(
    certs: CertsLayout, settings: CodeSettings
) -> None:
    """Over mutual TLS each bad upload of the plan's code gets its exact status, then the
    same site's honest coded upload is accepted, decoded to the values it stands for."""
    plan = dataclasses.replace(make_plan(certs), compression=CompressionSettings(upload=settings))
    federation = make_federation(plan)
    bob = Identity(certs.collaborator_cert("bob"), certs.collaborator_key("bob"))
    with running_aggregator(plan, federation) as server:
        caller = connect(server, certs, bob, "bob")
        try:
            for refusal in REFUSALS:
                if refusal.settings != settings:
                    continue
                data = upload(refusal.tensors(), caller.header())
                with pytest.raises(grpc.RpcError) as raised:
                    caller.send(chunk_bytes(data, 4096))
                error = raised.value
                assert isinstance(error, grpc.Call)
                assert error.code() == refusal.code, (refusal.id, error.details())
                for word in refusal.words:
                    assert word in (error.details() or ""), (refusal.id, error.details())
            tensors = honest(settings, MODEL)
            caller.send(chunk_bytes(upload(tensors, caller.header()), 4096))
        finally:
            caller.channel.close()
        assert server.servicer.admission.in_progress() == 0
    (result,) = federation.results()
    assert (result.collaborator, result.task_name) == ("bob", "train")
    got = {tensor.name: tensor.array for tensor in result.tensors}
    for name, tensor in zip([*MODEL, "loss"], tensors, strict=True):
        assert got[name].tobytes() == np.asarray(tensor.expected).tobytes(), name


# -- hostile bytes ----------------------------------------------------------------------------

FUZZED = [LOSSLESS, BFLOAT16, INT8, TOPK_INT8]


@st.composite
def mangled(draw: st.DrawFn) -> tuple[CodeSettings, bytes]:
    """An honest coded upload of the small model with a few bytes changed, cut or added."""
    chosen = draw(st.sampled_from(FUZZED))
    data = bytearray(upload(honest(chosen, MODEL)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return chosen, bytes(data)


@settings(
    max_examples=int(os.environ.get("FOEDUS_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=mangled(), chunk_size=st.integers(1, 200))
def test_mangled_coded_uploads_give_results_or_our_refusals(
    case: tuple[CodeSettings, bytes],
    chunk_size: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Whatever was changed, a coded upload decodes, or is refused by one of our errors with
    nothing kept; never another exception."""
    chosen, data = case
    folder = tmp_path_factory.mktemp("coded")
    try:
        received = receive_upload(
            pieces(data, chunk_size),
            folder,
            on_head=lambda head: None,
            model_dtype=lambda name: MODEL[name].dtype if name in MODEL else None,
            max_tensor_bytes=4096,
            base=MODEL.get,
            upload_code=chosen,
        )
    except (StreamError, InvalidRequestError):
        assert not any(folder.iterdir())
        return
    assert list(folder.iterdir()) == [received.file.path]
    for tensor in received.tensors:
        assert not tensor.tags & {"lossy_compressed"}


def test_under_a_lossy_download_deltas_are_added_to_the_decoded_model(certs: CertsLayout) -> None:
    """With int8 both ways a site trains on the int8-decoded model, so its delta is taken from
    that model, and the aggregator adds it back to that same decoded model."""
    plan = dataclasses.replace(
        make_plan(certs),
        compression=CompressionSettings(upload=INT8, download=CodeSettings(Code.INT8)),
    )
    federation = make_federation(plan)
    received = {name: round_trip(Code.INT8, array) for name, array in MODEL.items()}
    assert not np.array_equal(received["dense/weight"], WEIGHT)  # the download lost a little
    bob = Identity(certs.collaborator_cert("bob"), certs.collaborator_key("bob"))
    with running_aggregator(plan, federation) as server:
        caller = connect(server, certs, bob, "bob")
        try:
            tensors = honest(INT8, received)
            caller.send(chunk_bytes(upload(tensors, caller.header()), 4096))
        finally:
            caller.channel.close()
    (result,) = federation.results()
    got = {tensor.name: tensor.array for tensor in result.tensors}
    for name, tensor in zip([*MODEL, "loss"], tensors, strict=True):
        assert got[name].tobytes() == np.asarray(tensor.expected).tobytes(), name
