"""The streamed model's chunks, spooled to a file without a name and read back for each request.

`test_model_stream.py` serves them over real mutual TLS; here the spool itself: the same bytes
whether a tensor is in memory or mapped from a model file (copied in the kernel, or through a
buffer where the kernel cannot), nothing left in the folder, the file closed with its last user.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator import encoded_model, mapped
from foedus.aggregator.encoded_model import SpooledChunks, model_chunks
from foedus.aggregator.mapped import FileRange
from foedus.protos import aggregator_pb2
from foedus.protos.codec import encode_tensor
from foedus.refusals.errors import StorageError

WEIGHT = np.arange(1000, dtype=np.float32).reshape(10, 100)


def mapped_from(folder: Path, array: np.ndarray, *, offset: int = 13) -> np.memmap:
    """`array` mapped read-only from a file in `folder`, after `offset` bytes of something else."""
    path = folder / "model.bin"
    path.write_bytes(b"x" * offset + array.tobytes() + b"tail")
    return np.memmap(path, dtype=array.dtype, mode="r", offset=offset, shape=array.shape)


def joined(chunks: Iterable[bytes]) -> tuple[aggregator_pb2.ModelChunk, bytes]:
    """The metadata chunk and the data of all the others."""
    messages = [aggregator_pb2.ModelChunk.FromString(chunk) for chunk in chunks]
    return messages[0], b"".join(message.data for message in messages[1:])


def test_a_mapped_tensor_spools_the_same_bytes_as_one_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copied from its file or written from memory, the chunks are the same bytes."""
    copied: list[int] = []
    if mapped._copy_file_range is not None:  # Linux: the kernel copies the pieces

        def counting(source: int, target: int, count: int, offset: int) -> int:
            copied.append(count)
            return os.copy_file_range(source, target, count, offset)

        monkeypatch.setattr(mapped, "_copy_file_range", counting)
    spool = tmp_path / "state" / "uploads"  # made when first needed
    from_memory = list(model_chunks("weight", WEIGHT, 3, 1000, folder=spool))
    assert copied == []
    from_file = list(model_chunks("weight", mapped_from(tmp_path, WEIGHT), 3, 1000, folder=spool))
    assert from_file == from_memory
    if mapped._copy_file_range is not None:
        assert sum(copied) == WEIGHT.nbytes
    assert len(from_memory) == 1 + 4  # metadata, then 4000 bytes in pieces of 1000
    meta, data = joined(from_memory)
    assert meta.data_size == WEIGHT.nbytes and data == WEIGHT.tobytes()
    expected = encode_tensor("weight", WEIGHT, round_number=3, tags=encoded_model.MODEL_TAGS)
    expected.ClearField("data_bytes")
    assert meta.tensor == expected
    assert list(spool.iterdir()) == []  # the spool has no name


def test_without_a_copy_in_the_kernel_the_bytes_go_through_a_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where `os.copy_file_range` is missing (not Linux), the file is read and written instead."""
    monkeypatch.setattr(mapped, "_copy_file_range", None)
    monkeypatch.setattr(mapped, "COPY_BYTES", 7)  # several blocks per piece
    _, data = joined(
        model_chunks("weight", mapped_from(tmp_path, WEIGHT), 0, 1500, folder=tmp_path)
    )
    assert data == WEIGHT.tobytes()


def test_a_mapped_tensor_whose_file_is_gone_is_read_through_its_mapping(tmp_path: Path) -> None:
    """A round's model file may be tidied away while its mapping lives on: still served."""
    array = mapped_from(tmp_path, WEIGHT)
    (tmp_path / "model.bin").unlink()
    _, data = joined(model_chunks("weight", array, 0, 1000, folder=tmp_path))
    assert data == WEIGHT.tobytes()


def test_a_file_shorter_than_its_tensor_is_a_storage_error(tmp_path: Path) -> None:
    """A range past the end of its file is refused, not sent short."""
    source = tmp_path / "short.bin"
    source.write_bytes(b"0123456789")
    spool = SpooledChunks(tmp_path)
    descriptor = os.open(source, os.O_RDONLY)
    try:
        with pytest.raises(StorageError, match="ends before"):
            spool.append(b"head", FileRange(descriptor, 4, 100))
    finally:
        os.close(descriptor)


def test_every_iteration_reads_the_messages_anew(tmp_path: Path) -> None:
    """Each request reads the same messages, in order, as many times as it is asked."""
    spool = SpooledChunks(tmp_path)
    spool.append(b"one")
    spool.append(b"t", memoryview(b"wo"), b"")
    spool.append()
    assert len(spool) == 3
    assert list(spool) == list(spool) == [b"one", b"two", b""]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_the_spool_is_closed_with_its_last_reference(tmp_path: Path) -> None:
    """No descriptor outlives the spool: an older round's model is let go once nothing reads it."""
    before = len(os.listdir("/proc/self/fd"))
    spool = SpooledChunks(tmp_path)
    spool.append(b"message")
    reading = iter(spool)
    assert next(reading) == b"message"
    assert len(os.listdir("/proc/self/fd")) == before + 1
    del spool  # a request still reading keeps it open
    assert len(os.listdir("/proc/self/fd")) == before + 1
    del reading
    assert len(os.listdir("/proc/self/fd")) == before
