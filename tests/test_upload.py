"""Receiving an upload to disk as it arrives (`foedus.aggregator.upload`), driven without a socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.records import Array
from foedus.aggregator.storage import write_model
from foedus.aggregator.upload import (
    MAX_SMALL_TENSOR_BYTES,
    ReceivedUpload,
    read_tensors_file,
    receive_upload,
)
from foedus.protos import aggregator_pb2
from foedus.protos.codec import TensorFormatError, TensorTooLargeError, encode_tensor
from foedus.protos.results_reader import Head
from foedus.protos.stream import StreamError
from foedus.refusals.errors import InvalidRequestError, PreconditionError

MODEL = {
    "weight": np.linspace(-1, 1, 3000, dtype=np.float32).reshape(30, 100),
    "counts": np.arange(7, dtype=np.int64),
    "half": np.ones(5, np.float16),
}


def payload(tensors: dict[str, Array] | None = None, **metrics: float) -> bytes:
    """A serialized TaskResults of `tensors` (the model by default) and metrics."""
    results = aggregator_pb2.TaskResults(
        header=aggregator_pb2.MessageHeader(sender="alice"),
        round_number=3,
        task_name="train",
        data_size=100,
    )
    for name, array in (MODEL if tensors is None else tensors).items():
        results.tensors.append(encode_tensor(name, array))
    for name, value in metrics.items():
        results.tensors.append(encode_tensor(name, np.float32(value), tags=["metric"]))
    return results.SerializeToString()


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    return (data[start : start + size] for start in range(0, len(data), size))


def receive(
    data: bytes | Iterator[bytes],
    folder: Path,
    heads: list[Head] | None = None,
    **options: object,
) -> ReceivedUpload:
    chunks = pieces(data, 4096) if isinstance(data, bytes) else data
    settings: dict[str, object] = {"max_tensor_bytes": 2**20, **options}
    return receive_upload(
        chunks,
        folder,
        on_head=(heads if heads is not None else []).append,
        model_dtype=lambda name: MODEL[name].dtype if name in MODEL else None,
        **settings,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 10**6])
def test_the_file_is_the_upload_and_the_tensors_are_mapped_from_it(
    tmp_path: Path, chunk_size: int
) -> None:
    """Whatever the chunking, the file holds the bytes as sent and each tensor reads back exactly."""
    data = payload(accuracy=0.5)
    received = receive(pieces(data, chunk_size), tmp_path, expected_bytes=len(data))
    assert received.file.path.read_bytes() == data
    assert received.file.size == len(data) and len(received.file.digest) == 64
    assert received.head.round_number == 3 and received.head.task_name == "train"
    tensors = {tensor.name: tensor for tensor in received.tensors}
    for name, array in MODEL.items():
        got = tensors[name].array
        assert got.dtype == array.dtype and not got.flags.writeable
        np.testing.assert_array_equal(got, array)
    assert isinstance(tensors["weight"].array, np.memmap)  # mapped, not copied
    assert tensors["weight"].finite is True and tensors["half"].finite is True
    assert tensors["counts"].finite is None  # integers have no NaN to look for
    assert tensors["accuracy"].tags == frozenset({"metric", "compressed"})
    assert float(tensors["accuracy"].array) == 0.5


@pytest.mark.parametrize("where", [0, 1, 1499, 2999])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_found_wherever_the_chunks_cut(
    tmp_path: Path, where: int, bad: float
) -> None:
    """A value cut in two by a chunk boundary is checked whole."""
    weight = MODEL["weight"].copy()
    weight.reshape(-1)[where] = bad
    data = payload({**MODEL, "weight": weight})
    for chunk_size in (3, 4096):
        received = receive(pieces(data, chunk_size), tmp_path / str(chunk_size))
        tensors = {tensor.name: tensor for tensor in received.tensors}
        assert tensors["weight"].finite is False
        assert tensors["half"].finite is True


def test_large_finite_values_are_not_mistaken_for_overflow(tmp_path: Path) -> None:
    """Values whose sum overflows are still finite (the quick sum is only a first look)."""
    big = np.full(3000, np.finfo(np.float32).max, np.float32).reshape(30, 100)
    received = receive(payload({**MODEL, "weight": big}), tmp_path)
    assert {t.name: t.finite for t in received.tensors}["weight"] is True


def test_the_head_is_checked_before_the_tensors_arrive(tmp_path: Path) -> None:
    """A refusal from `on_head` stops the upload at its first bytes and keeps nothing."""
    data = payload()
    read: list[int] = []

    def chunks() -> Iterator[bytes]:
        for piece in pieces(data, 64):
            read.append(len(piece))
            yield piece

    def refuse(head: Head) -> None:
        raise PreconditionError(f"round {head.round_number} is closed")

    with pytest.raises(PreconditionError, match="round 3 is closed"):
        receive_upload(
            chunks(), tmp_path, on_head=refuse, model_dtype=lambda _: None, max_tensor_bytes=2**20
        )
    assert sum(read) < 200 < len(data)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("data", "error", "fragment"),
    [
        (b"", StreamError, "empty stream"),
        (payload()[:-5], StreamError, "the upload is not a TaskResults"),
        (b"\x08", StreamError, "the upload is not a TaskResults"),
        (
            payload({"stranger": np.zeros(MAX_SMALL_TENSOR_BYTES // 4 + 1, np.float32)}),
            InvalidRequestError,
            "too large to be a metric",
        ),
        (payload({"weight": np.zeros(2**18 + 1, np.float32)}), TensorTooLargeError, "limit"),
    ],
)
def test_bad_uploads_are_refused_and_leave_no_file(
    tmp_path: Path, data: bytes, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        receive(data, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused(tmp_path: Path) -> None:
    tensor = encode_tensor("weight", MODEL["weight"])
    tensor.data_bytes = tensor.data_bytes[:-4]
    results = aggregator_pb2.TaskResults(task_name="train", tensors=[tensor])
    with pytest.raises(TensorFormatError, match="needs 12000 bytes, got 11996"):
        receive(results.SerializeToString(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_upload_shorter_than_declared_is_refused(tmp_path: Path) -> None:
    data = payload()
    with pytest.raises(StreamError, match="cut short"):
        receive(data, tmp_path, expected_bytes=len(data) + 1)
    assert list(tmp_path.iterdir()) == []


def test_a_kept_upload_reads_back_as_it_arrived(tmp_path: Path) -> None:
    """`read_tensors_file` gives the same head and tensors from the file alone."""
    received = receive(payload(loss=0.25), tmp_path)
    head, tensors = read_tensors_file(received.file.path, max_tensor_bytes=2**20)
    assert head == received.head
    assert [t.name for t in tensors] == [t.name for t in received.tensors]
    for again, first in zip(tensors, received.tensors, strict=True):
        assert again.tags == first.tags
        np.testing.assert_array_equal(again.array, first.array)
        assert again.array.dtype == first.array.dtype


def test_a_model_file_reads_back_mapped(tmp_path: Path) -> None:
    """A `ModelProto` file (the state's models) reads the same way, its tensors mapped."""
    path = tmp_path / "model.pbuf"
    model = {**MODEL, "big": np.arange(MAX_SMALL_TENSOR_BYTES, dtype=np.float32)}
    write_model(path, model, round_number=4)
    head, tensors = read_tensors_file(path, max_tensor_bytes=2**20, tensors_field=1)
    assert head.task_name == "" and [t.name for t in tensors] == sorted(model)
    for tensor in tensors:
        np.testing.assert_array_equal(tensor.array, model[tensor.name])
        assert tensor.array.dtype == model[tensor.name].dtype
    arrays = {t.name: t.array for t in tensors}
    assert isinstance(arrays["big"], np.memmap)  # large: mapped; small: read
    assert not isinstance(arrays["weight"], np.memmap)
