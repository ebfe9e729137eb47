"""foedus.model and the `model` command: model files as writable arrays, inspected and exported."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from foedus import model
from foedus.aggregator.storage import read_model
from foedus.cli import main
from foedus.command.exits import EXIT_SIGPIPE
from foedus.durable.files import replace_file
from foedus.pki.layout import CertsLayout
from foedus.plans.runners import load_runner
from foedus.plans.schema import RunnerSettings
from foedus.protos.dtypes import bfloat16_dtype

from federation_processes import REPO, FederationRun, final_accuracy, run_federation


def mixed() -> dict[str, np.ndarray]:
    """A tensor of each kind a model holds: float32, int64, bfloat16, a 0-d one, an empty one."""
    return {
        "weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "steps": np.array(41, dtype=np.int64),
        "scale": np.array([1.5, -0.0, 3.0e38, np.inf], dtype=bfloat16_dtype()),
        "empty": np.zeros((0, 5), dtype=np.float64),
        "counts": np.array([[1, -2], [3, 2**62]], dtype=np.int64),
    }


def assert_same(loaded: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """The same names, dtypes, shapes and bytes."""
    assert sorted(loaded) == sorted(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert loaded[name].tobytes() == array.tobytes(), name


@pytest.fixture(scope="module")
def federation(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> FederationRun:
    """A real short federation of the digits runner, started from a model `model.save` wrote
    (`aggregator.initial_model`): its best model is the one people download."""
    folder = tmp_path_factory.mktemp("federation")
    plan = yaml.safe_load((REPO / "plans" / "local.yaml").read_text(encoding="utf-8"))
    settings = RunnerSettings(
        plan["runner"]["name"], plan["runner"]["seed"], plan["runner"]["settings"]
    )
    initial = load_runner(settings).initial_model(settings)
    rng = np.random.default_rng(3)
    model.save(
        folder / "initial.pbuf",
        {
            name: (rng.normal(size=array.shape) / 100).astype(array.dtype)
            for name, array in initial.items()
        },
    )
    run = run_federation(
        folder, certs, 2, aggregator={"initial_model": str(folder / "initial.pbuf")}
    )
    assert set(run.exit_codes.values()) == {0}, run
    assert final_accuracy(run.aggregator_stdout) >= 0.8, run.aggregator_stdout
    return run


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`model ARGV...` in this process: its exit code, stdout and stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- foedus.model ------------------------------------------------------------------------------


def test_save_and_load_round_trip_every_kind_of_tensor_writable(tmp_path: Path) -> None:
    """float32, int64, bfloat16, 0-d and empty tensors come back exact, writable, in file order."""
    path = tmp_path / "model.pbuf"
    model.save(path, mixed())
    loaded = model.load(path)
    assert_same(loaded, mixed())
    assert list(loaded) == sorted(mixed())  # the file's order: foedus writes names sorted
    for name, array in loaded.items():
        assert array.flags.writeable, name
        assert type(array) is np.ndarray, name
    loaded["weight"][0, 0] = 5.0  # theirs to change: the file stays as it was
    assert model.load(path)["weight"][0, 0] == 0.0
    assert_same(read_model(path, 2**20), mixed())  # the aggregator's reader reads the same file


def test_load_without_copy_gives_read_only_arrays_of_the_same_values(tmp_path: Path) -> None:
    """`copy=False` maps instead of copying: the same values, read-only."""
    path = tmp_path / "model.pbuf"
    model.save(path, {"big": np.arange(100_000, dtype=np.float32)})
    mapped = model.load(path, copy=False)["big"]
    assert not mapped.flags.writeable
    assert np.array_equal(mapped, np.arange(100_000, dtype=np.float32))


def test_a_saved_model_is_what_the_aggregator_writes(tmp_path: Path) -> None:
    """`save` writes the bytes of the aggregator's own model files: an initial model it takes."""
    from foedus.aggregator.storage import model_bytes  # noqa: PLC0415

    model.save(tmp_path / "initial.pbuf", mixed())
    assert (tmp_path / "initial.pbuf").read_bytes() == model_bytes(mixed())


def test_bad_files_are_one_error_naming_the_file(tmp_path: Path) -> None:
    """A truncated file, a file that is no model, an empty file, a missing one, a tensor over the
    limit: `ModelFileError`, its message starting with the file's path."""
    whole = tmp_path / "whole.pbuf"
    model.save(whole, mixed())
    data = whole.read_bytes()
    cases = {
        "truncated.pbuf": (data[: len(data) - 7], "not a ModelProto file"),
        "notes.txt": (b"these are not the weights you are looking for\n", "not a ModelProto"),
        "empty.pbuf": (b"", "holds no tensors"),
    }
    for name, (content, says) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(model.ModelFileError) as raised:
            model.load(path)
        assert str(raised.value).startswith(f"{path}: "), raised.value
        assert says in str(raised.value), raised.value
        assert "TaskResults" not in str(raised.value)  # the reader names the message it reads
    with pytest.raises(model.ModelFileError, match="model file not found"):
        model.load(tmp_path / "absent.pbuf")
    with pytest.raises(model.ModelFileError, match="over the limit of 40 bytes"):
        model.load(whole, max_tensor_bytes=40)


def test_save_refuses_what_is_not_a_model_naming_the_file(tmp_path: Path) -> None:
    """No tensors, a nameless tensor, a dtype foedus does not send, a missing folder: nothing written."""
    path = tmp_path / "out.pbuf"
    cases: list[tuple[object, str]] = [
        ({}, "at least one tensor"),
        ({"": np.zeros(2)}, "non-empty strings"),
        ({"z": np.zeros(2, dtype=np.complex64)}, "dtype complex64 cannot be sent"),
    ]
    for arrays, says in cases:
        with pytest.raises(model.StorageError) as raised:
            model.save(path, arrays)  # type: ignore[arg-type]
        assert str(raised.value).startswith(f"{path}: ") and says in str(raised.value)
    missing = tmp_path / "absent" / "out.pbuf"
    with pytest.raises(model.StorageError, match=f"^{missing}: cannot write"):
        model.save(missing, {"x": np.zeros(2)})
    assert sorted(tmp_path.iterdir()) == []  # no file, no temporary left


# -- the model command -------------------------------------------------------------------------


def test_inspect_lists_each_tensor_the_total_and_the_files_sha256(
    federation: FederationRun, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real federation's best model: one line per tensor, the total, the digest sha256sum gives."""
    path = federation.output_dir / "best_model.pbuf"
    tensors = read_model(path, 2**30)
    code, out, err = run(capsys, "inspect", str(path))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["TENSOR", "DTYPE", "SHAPE", "BYTES"]
    rows = [line.split(maxsplit=2) for line in lines[1 : 1 + len(tensors)]]
    assert [row[0] for row in rows] == list(tensors)
    for (_, dtype, rest), array in zip(rows, tensors.values(), strict=True):
        shape, size = rest.rsplit(maxsplit=1)
        assert (dtype, shape, int(size)) == (array.dtype.name, str(list(array.shape)), array.nbytes)
    total = sum(array.nbytes for array in tensors.values())
    assert lines[1 + len(tensors)] == (
        f"total: {len(tensors)} tensors, {total} bytes of values; the file is "
        f"{path.stat().st_size} bytes"
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert lines[2 + len(tensors) :] == [f"sha256: {digest}  {path}"]


def test_inspect_json_names_dtypes_shapes_and_bfloat16(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--json`: one object with each tensor (bfloat16 by name, 0-d as []), the totals, the digest."""
    path = tmp_path / "model.pbuf"
    model.save(path, mixed())
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    assert code == 0
    document = json.loads(out)
    assert document["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert document["file_bytes"] == path.stat().st_size
    assert document["tensor_bytes"] == sum(array.nbytes for array in mixed().values())
    tensors = {row["name"]: row for row in document["tensors"]}
    assert tensors["scale"] == {"name": "scale", "dtype": "bfloat16", "shape": [4], "bytes": 8}
    assert tensors["steps"] == {"name": "steps", "dtype": "int64", "shape": [], "bytes": 8}
    assert tensors["empty"]["shape"] == [0, 5]


def test_export_to_safetensors_and_npz_reads_back_equal(
    federation: FederationRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both formats, chosen by OUT's suffix, read back by their own libraries as the same arrays."""
    path = federation.output_dir / "best_model.pbuf"
    expected = read_model(path, 2**30)
    for suffix in ("safetensors", "npz"):
        out_path = tmp_path / f"best.{suffix}"
        code, out, err = run(capsys, "export", str(path), "-o", str(out_path))
        assert (code, err) == (0, ""), err
        assert out == f"{out_path}: {len(expected)} tensors as {suffix}\n"
        if suffix == "npz":
            with np.load(out_path, allow_pickle=False) as data:
                back = {name: data[name] for name in data.files}
        else:
            back = load_file(str(out_path))
        assert_same(back, expected)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.npz", "best.safetensors"]


def test_export_keeps_bfloat16_in_safetensors_and_widens_it_exactly_in_npz(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """safetensors stores BF16 as it is; .npz (no bfloat16) gets exact float32 and says so."""
    path = tmp_path / "model.pbuf"
    model.save(path, mixed())
    target = tmp_path / "weights.bin"
    assert run(capsys, "export", str(path), "-o", str(target), "--format", "safetensors")[0] == 0
    raw = target.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    assert header["scale"]["dtype"] == "BF16" and header["scale"]["shape"] == [4]
    start, end = header["scale"]["data_offsets"]
    assert raw[8 + header_size + start : 8 + header_size + end] == mixed()["scale"].tobytes()
    others = {name: array for name, array in mixed().items() if name != "scale"}
    readable = tmp_path / "others.safetensors"
    model.save(tmp_path / "others.pbuf", others)
    assert run(capsys, "export", str(tmp_path / "others.pbuf"), "-o", str(readable))[0] == 0
    assert_same(load_file(str(readable)), others)

    code, out, _ = run(capsys, "export", str(path), "-o", str(tmp_path / "m.npz"))
    assert code == 0
    assert out.splitlines()[1] == (
        "bfloat16 written as float32 (exact; .npz has no bfloat16): scale"
    )
    with np.load(tmp_path / "m.npz", allow_pickle=False) as data:
        assert data["scale"].dtype == np.float32
        assert data["scale"].tolist() == mixed()["scale"].astype(np.float32).tolist()
        assert_same({"counts": data["counts"]}, {"counts": mixed()["counts"]})


def test_export_refuses_an_existing_out_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing OUT is left as it is (exit 2, one line) until --force replaces it."""
    path = tmp_path / "model.pbuf"
    model.save(path, {"x": np.ones(3, np.float32)})
    target = tmp_path / "x.npz"
    target.write_bytes(b"mine")
    code, out, err = run(capsys, "export", str(path), "-o", str(target))
    assert (code, out) == (2, "")
    assert err == f"model: error: {target}: exists; give --force to replace it\n"
    assert target.read_bytes() == b"mine"
    assert run(capsys, "export", str(path), "-o", str(target), "--force")[0] == 0
    with np.load(target) as data:
        assert data["x"].tolist() == [1.0, 1.0, 1.0]
    code, _, err = run(capsys, "export", str(path), "-o", str(path), "--format", "npz", "--force")
    assert (code, err) == (2, f"model: error: {path}: is FILE itself; write the export elsewhere\n")
    code, _, err = run(capsys, "export", str(path), "-o", str(tmp_path / "x.pt"))
    assert code == 2 and "cannot tell the format from its suffix" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pbuf", "x.npz"]


def test_a_bad_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect and export of a file that is not a model: exit 2, one line naming it, nothing written."""
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model\n", encoding="utf-8")
    for argv in (["inspect", str(bad)], ["export", str(bad), "-o", str(tmp_path / "x.npz")]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, "")
        assert (
            err.startswith(f"model: error: {bad}: not a ModelProto file") and err.count("\n") == 1
        )
    code, _, err = run(capsys, "inspect", str(tmp_path / "absent.pbuf"))
    assert (code, err) == (2, f"model: error: {tmp_path / 'absent.pbuf'}: model file not found\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_help_names_both_commands_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` at each level exits 0; a usage error is one line, exit 2."""
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for text in ("inspect", "export", "exit status", "OUT that exists"):
        assert text in out, text
    code, out, _ = run(capsys, "export", "--help")
    assert code == 0 and "--force" in out and "BF16" in out
    code, _, err = run(capsys, "export", "model.pbuf")
    assert code == 2 and err.count("\n") == 1 and "-o/--output" in err


def test_the_model_command_runs_as_a_process(federation: FederationRun, tmp_path: Path) -> None:
    """The installed `model` script: inspect a real best model, then a bad file exits 2 in one line."""
    script = Path(sys.executable).parent / "model"
    path = federation.output_dir / "best_model.pbuf"
    done = subprocess.run(
        [str(script), "inspect", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-1] == (
        f"sha256: {hashlib.sha256(path.read_bytes()).hexdigest()}  {path}"
    )
    bad = tmp_path / "weights.pt"
    bad.write_bytes(bytes(range(256)))
    done = subprocess.run(
        [str(script), "inspect", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"model: error: {bad}: ") and done.stderr.count("\n") == 1


def test_output_goes_to_the_stream_given(tmp_path: Path) -> None:
    """`main(argv, out)` writes to `out`, so callers can capture it without swapping stdout."""
    path = tmp_path / "model.pbuf"
    model.save(path, {"x": np.ones(2, np.float32)})
    out = io.StringIO()
    assert main(["inspect", str(path)], out) == 0
    assert out.getvalue().splitlines()[1].split() == ["x", "float32", "[2]", "8"]


def test_an_export_cut_short_leaves_the_old_out_and_no_temporary(tmp_path: Path) -> None:
    """`foedus.durable.files.replace_file`, which exports write through: a writer that fails midway
    leaves OUT as it was and nothing beside it."""
    target = tmp_path / "best.safetensors"
    target.write_bytes(b"the old export")

    def half_then_fail(file: BinaryIO) -> None:
        file.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_file(target, half_then_fail)
    assert target.read_bytes() == b"the old export"
    assert [path.name for path in tmp_path.iterdir()] == ["best.safetensors"]
    replace_file(target, lambda file: file.write(b"new"))
    assert target.read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_inspect_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """`model inspect FILE | head -1` of a model of many tensors: 141 as every foedus command
    whose reader has gone (foedus.command.output), nothing on stderr."""
    path = tmp_path / "wide.pbuf"
    model.save(path, {f"layer{index:05d}.weight": np.zeros(1, np.float32) for index in range(4000)})
    script = Path(sys.executable).parent / "model"
    with subprocess.Popen(
        [str(script), "inspect", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().split() == [b"TENSOR", b"DTYPE", b"SHAPE", b"BYTES"]
        process.stdout.close()  # as head does after its line: the rest meets a closed pipe
        assert process.wait(timeout=60) == EXIT_SIGPIPE
        assert process.stderr.read() == b""


def test_npz_refuses_a_tensor_named_as_a_savez_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tensor named `file` cannot be a keyword of numpy.savez: one line pointing to safetensors,
    which takes it."""
    path = tmp_path / "model.pbuf"
    model.save(path, {"file": np.ones(2, np.float32)})
    code, _, err = run(capsys, "export", str(path), "-o", str(tmp_path / "m.npz"))
    assert (code, err) == (
        2,
        f"model: error: {path}: tensor 'file': .npz cannot hold a tensor of that name with "
        "numpy.savez; export to .safetensors instead\n",
    )
    assert run(capsys, "export", str(path), "-o", str(tmp_path / "m.safetensors"))[0] == 0
    assert load_file(str(tmp_path / "m.safetensors"))["file"].tolist() == [1.0, 1.0]
