"""The output folder: exact, deterministic, atomic model files; checked reads; metrics lines; crash leftovers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pytest

from foedus.aggregator.storage import (
    OutputFolder,
    model_bytes,
    read_model,
    read_model_tensors,
    tensors_bytes,
    write_model,
    write_model_slices,
    write_tensors,
)
from foedus.durable.files import replace_file
from foedus.history.rows import MetricsRow
from foedus.protos import base_pb2
from foedus.protos.codec import encode_tensor
from foedus.refusals.errors import ModelFileError, StorageError

from servers import small_model

LIMIT = 2**20


def test_model_round_trips_exactly(tmp_path: Path) -> None:
    """Every tensor comes back from the file with its dtype, shape and bytes."""
    model = {**small_model(), "half": np.array([1.5, -0.25], dtype=np.float16)}
    path = tmp_path / "model.pbuf"
    write_model(path, model, round_number=4)
    loaded = read_model(path, LIMIT)
    assert sorted(loaded) == sorted(model)
    # Read a block at a time: a large tensor is mapped from the file, never held whole.
    large = {"large": np.arange(LIMIT // 8, dtype=np.float64)}
    write_model(tmp_path / "large.pbuf", large)
    mapped = read_model(tmp_path / "large.pbuf", LIMIT)["large"]
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, large["large"])
    for name, array in model.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert loaded[name].tobytes() == array.tobytes(), name


def test_file_is_an_openfl_model_proto_in_name_order(tmp_path: Path) -> None:
    """The file parses as a ModelProto whose tensors are sorted by name and tagged `model`."""
    path = tmp_path / "model.pbuf"
    write_model(path, small_model(), round_number=2)
    proto = base_pb2.ModelProto.FromString(path.read_bytes())
    names = [tensor.name for tensor in proto.tensors]
    assert names == sorted(small_model())
    assert all("model" in tensor.tags and tensor.round_number == 2 for tensor in proto.tensors)


def test_same_model_gives_the_same_bytes(tmp_path: Path) -> None:
    """Writing the same model twice, its tensors in another order, gives byte-identical files."""
    model = small_model()
    write_model(tmp_path / "a.pbuf", model)
    write_model(tmp_path / "b.pbuf", dict(reversed(list(model.items()))))
    assert (tmp_path / "a.pbuf").read_bytes() == (tmp_path / "b.pbuf").read_bytes()


def test_atomic_write_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    """Overwriting a model leaves only the new file in the folder."""
    path = tmp_path / "last_model.pbuf"
    write_model(path, small_model())
    changed = {**small_model(), "steps": np.array(8, dtype=np.int64)}
    write_model(path, changed)
    assert [entry.name for entry in tmp_path.iterdir()] == ["last_model.pbuf"]
    assert read_model(path, LIMIT)["steps"] == 8


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda good: good[: len(good) // 2], "model.pbuf"),
        (lambda good: b"\xff" * 64, "model.pbuf"),
        (lambda good: b"", "no tensors"),
        (
            lambda good: base_pb2.ModelProto(
                tensors=[encode_tensor("a", np.zeros(2)), encode_tensor("a", np.zeros(2))]
            ).SerializeToString(),
            "more than once",
        ),
        (
            lambda good: base_pb2.ModelProto(
                tensors=[encode_tensor("big", np.zeros(LIMIT, dtype=np.float32))]
            ).SerializeToString(),
            "over the limit",
        ),
    ],
    ids=["truncated", "garbage", "empty", "duplicate-name", "over-limit"],
)
def test_corrupt_model_file_raises_model_file_error(
    tmp_path: Path, make: object, words: str
) -> None:
    """A model file that is cut short, garbage, empty, ambiguous or too large raises ModelFileError."""
    path = tmp_path / "model.pbuf"
    write_model(path, small_model())
    path.write_bytes(make(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ModelFileError, match=words) as raised:
        read_model(path, LIMIT)
    assert str(path) in str(raised.value)


def test_missing_model_file_is_named(tmp_path: Path) -> None:
    """Reading a model that is not there names the file."""
    with pytest.raises(ModelFileError, match="not found"):
        read_model(tmp_path / "nope.pbuf", LIMIT)


def test_metrics_are_appended_one_json_line_per_round(tmp_path: Path) -> None:
    """Each round appends one strict-JSON line; a NaN metric is written as null."""
    output = OutputFolder(tmp_path / "out" / "nested")
    output.append_metrics(MetricsRow(0, {"train": {"loss": 0.5}}, seconds=1.25))
    output.append_metrics(MetricsRow(1, {"train": {"loss": math.nan}}, seconds=0.5))
    lines = output.metrics.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["round"] for row in rows] == [0, 1]
    assert rows[0]["metrics"] == {"train": {"loss": 0.5}}
    assert rows[1]["metrics"] == {"train": {"loss": None}}
    assert "NaN" not in lines[1]
    assert list(rows[0]) == sorted(rows[0])
    assert [row.metrics for row in output.read_metrics()] == [
        {"train": {"loss": 0.5}},
        {"train": {"loss": None}},
    ]


def test_a_crash_before_the_rename_leaves_the_old_file_and_a_temporary_one(tmp_path: Path) -> None:
    """Interrupted between writing and renaming, the old model stays whole; the temporary file is recognised and removed."""
    output = OutputFolder(tmp_path)
    output.save_last(small_model(), 1)
    before = output.last_model.read_bytes()

    class Crash(BaseException):
        pass

    def crash() -> None:
        raise Crash

    with pytest.raises(Crash):
        replace_file(output.last_model, lambda file: file.write(b"new"), before_rename=crash)
    assert output.last_model.read_bytes() == before
    # A real crash leaves the temporary file behind; `remove_temporaries` clears it.
    (tmp_path / ".last_model.pbuf.x1y2.tmp").write_bytes(b"new")
    (tmp_path / ".notes.txt.tmp").write_bytes(b"not ours")
    output.remove_temporaries()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".notes.txt.tmp", "last_model.pbuf"]


def test_restore_model_writes_only_what_differs(tmp_path: Path) -> None:
    """`restore_model` leaves a file with the right bytes alone and replaces one with other bytes."""
    output = OutputFolder(tmp_path)
    assert output.restore_model(output.best_model, small_model(), 2) is True
    assert output.restore_model(output.best_model, small_model(), 2) is False
    assert output.restore_model(output.best_model, small_model(), 3) is True
    assert output.best_model.read_bytes() == model_bytes(small_model(), round_number=3)


def test_a_metrics_line_cut_short_is_removed(tmp_path: Path) -> None:
    """`read_metrics` drops a last line a crash cut short, so the next row starts on its own line."""
    output = OutputFolder(tmp_path)
    output.append_metrics(MetricsRow(0))
    with output.metrics.open("a", encoding="utf-8") as file:
        file.write('{"round": 1, "metr')
    assert output.read_metrics() == [MetricsRow(0)]
    output.append_metrics(MetricsRow(1))
    assert [row.round_number for row in output.read_metrics()] == [0, 1]
    assert output.metrics.read_text(encoding="utf-8") == "".join(
        MetricsRow(number).to_json() + "\n" for number in (0, 1)
    )


def test_tagged_tensors_round_trip_with_their_tags(tmp_path: Path) -> None:
    """A results file keeps each tensor's values, dtype and tags, and its bytes do not depend on order."""
    tensors = [
        ("w", np.arange(4, dtype=np.float64), frozenset({"trained"})),
        ("accuracy", np.array(0.5, dtype=np.float32), frozenset({"metric"})),
    ]
    data = tensors_bytes(tensors, round_number=3)
    assert tensors_bytes(reversed(tensors), round_number=3) == data
    path = tmp_path / "results.pbuf"
    path.write_bytes(data)
    loaded = {tensor.name: tensor for tensor in read_model_tensors(path, LIMIT)}
    for name, array, tags in tensors:
        assert loaded[name].array.tobytes() == array.tobytes()
        assert loaded[name].array.dtype == array.dtype
        assert tags <= loaded[name].tags


def test_streamed_files_hold_the_serialized_bytes(tmp_path: Path) -> None:
    """`write_tensors` writes exactly the bytes of `tensors_bytes` and returns their digest."""
    rng = np.random.default_rng(3)
    tensors = [
        ("f32", rng.random((3, 4), dtype=np.float32), frozenset({"model"})),
        ("big-endian", np.arange(60, dtype=">i8").reshape(6, 10)[:, ::2], frozenset({"a", "b"})),
        ("scalar", np.array(3.5), frozenset()),
        ("empty", np.zeros((0, 5), dtype=np.int32), frozenset({"metric"})),
        ("flags", np.array([True, False]), frozenset()),
        ("half", rng.random(70000).astype(np.float16), frozenset({"model"})),
        ("fortran", np.asfortranarray(rng.random((50, 70))), frozenset()),
    ]
    for round_number in (0, 300):
        path = tmp_path / f"{round_number}.pbuf"
        digest = write_tensors(path, reversed(tensors), round_number=round_number)
        data = tensors_bytes(tensors, round_number=round_number)
        assert path.read_bytes() == data
        assert digest == blake3.blake3(data).hexdigest()


def test_a_tensor_that_cannot_be_saved_leaves_no_file(tmp_path: Path) -> None:
    """A dtype the codec cannot store is a `StorageError`, and no temporary file stays behind."""
    tensors = [("text", np.array(["a"]), frozenset())]
    with pytest.raises(StorageError, match="cannot save"):
        write_tensors(tmp_path / "m.pbuf", tensors)
    assert list(tmp_path.iterdir()) == []


def _rss_file_mb() -> float:
    """This process's resident pages mapped from files (RssFile), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_mapped_model_is_saved_without_reading_its_mapping(tmp_path: Path) -> None:
    """Saving a model mapped from its file gives the bytes of the same model in memory, and its
    pages never become resident in this process (they are copied from file to file)."""
    model = {**small_model(), "large": np.linspace(-1, 1, 16 * 2**20, dtype=np.float32)}
    write_model(tmp_path / "state.pbuf", model, round_number=3)
    mapped = read_model(tmp_path / "state.pbuf", 2**30)
    assert isinstance(mapped["large"], np.memmap)
    before = _rss_file_mb()
    sha = write_model(tmp_path / "last.pbuf", mapped, round_number=3)
    assert _rss_file_mb() - before < 16  # 64 MiB through the mapping would show
    data = (tmp_path / "last.pbuf").read_bytes()
    assert data == (tmp_path / "state.pbuf").read_bytes()
    assert sha == blake3.blake3(data).hexdigest()
    assert float(np.asarray(mapped["large"]).sum()) < 1  # through the mapping: the measure works
    assert _rss_file_mb() - before > 48


def test_a_mapped_model_whose_file_is_gone_is_saved_from_its_mapping(tmp_path: Path) -> None:
    """A model file may be tidied away while its mapping lives on: the model still saves whole."""
    model = {**small_model(), "large": np.arange(100_000, dtype=np.float32)}
    write_model(tmp_path / "state.pbuf", model, round_number=2)
    expected = (tmp_path / "state.pbuf").read_bytes()
    mapped = read_model(tmp_path / "state.pbuf", 2**30)
    (tmp_path / "state.pbuf").unlink()
    sha = write_model(tmp_path / "last.pbuf", mapped, round_number=2)
    assert (tmp_path / "last.pbuf").read_bytes() == expected
    assert sha == blake3.blake3(expected).hexdigest()


def test_a_model_written_a_slice_at_a_time_is_the_model_written_whole(tmp_path: Path) -> None:
    """`write_model_slices` with the slices in any order writes `write_model`'s bytes and hash,
    and hands back its tensors mapped as `read_model` reads them."""
    model = {
        **small_model(),
        "half": np.array([1.5, -0.25, 3.0], dtype=np.float16),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "w": np.arange(1000, dtype=np.float64).reshape(10, 100) / 7,
        "big": np.arange(40_000, dtype=np.float32).reshape(200, 200) / 3,  # over 64 KiB: mapped
    }
    expected = write_model(tmp_path / "whole.pbuf", model, round_number=5)
    rng = np.random.default_rng(1)

    def fill(sink: Callable[[str, int, np.ndarray], None]) -> None:
        pieces = [
            (name, start, array.reshape(-1)[start : start + 37].copy())
            for name, array in model.items()
            for start in range(0, array.size, 37)
        ]
        for index in rng.permutation(len(pieces)):
            sink(*pieces[index])

    layout = {name: np.broadcast_to(np.zeros((), a.dtype), a.shape) for name, a in model.items()}
    written = write_model_slices(tmp_path / "sliced.pbuf", layout, fill, round_number=5)
    data = (tmp_path / "sliced.pbuf").read_bytes()
    assert data == (tmp_path / "whole.pbuf").read_bytes()
    assert written.digest == expected == blake3.blake3(data).hexdigest()
    mapped, read = written.mapped(), read_model(tmp_path / "sliced.pbuf", 2**20)
    assert list(mapped) == sorted(model)
    for name, array in read.items():
        assert mapped[name].dtype == array.dtype and mapped[name].shape == array.shape, name
        assert np.array_equal(mapped[name], array) and not mapped[name].flags.writeable, name
        assert isinstance(mapped[name], np.memmap) == isinstance(array, np.memmap), name
    assert isinstance(mapped["big"], np.memmap)


def test_outputs_written_without_a_hash_are_the_same_bytes(tmp_path: Path) -> None:
    """`write_model(hashed=False)` writes the bytes `write_model` writes and returns no digest,
    from arrays in memory and from arrays mapped from a file (copied in the kernel)."""
    model = {**small_model(), "big": np.arange(40_000, dtype=np.float32) / 3}
    write_model(tmp_path / "hashed.pbuf", model, round_number=2)
    mapped = read_model(tmp_path / "hashed.pbuf", 2**20)
    assert isinstance(mapped["big"], np.memmap)
    for name, source in (("plain", model), ("copied", mapped)):
        assert write_model(tmp_path / f"{name}.pbuf", source, round_number=2, hashed=False) == ""
        assert (tmp_path / f"{name}.pbuf").read_bytes() == (tmp_path / "hashed.pbuf").read_bytes()
