"""foedus.durable.files.replace_file, the one atomic durable write, and place_file, its last steps."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from foedus.durable.files import is_temporary, place_file, replace_file, write_bytes


@pytest.fixture
def no_umask() -> Iterator[None]:
    """Umask 0 for the test, the case where a mode left to the umask would be world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("no_umask")
def test_a_file_has_its_mode_from_creation_even_while_it_is_written(tmp_path: Path) -> None:
    """A private key's 0600 is the temporary file's already, before a byte is written."""
    seen: list[int] = []

    def write(file: BinaryIO) -> None:
        seen.append(stat.S_IMODE(os.stat(file.name).st_mode))
        file.write(b"secret")

    target = tmp_path / "k.key"
    replace_file(target, write, mode=0o600)
    assert seen == [0o600]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_bytes(target, b"public", mode=0o644)
    assert (target.read_bytes(), stat.S_IMODE(target.stat().st_mode)) == (b"public", 0o644)


def test_a_writer_that_names_the_file_writes_the_temporary_one(tmp_path: Path) -> None:
    """`file.name` is the temporary file: a library's save to a name lands in the new file."""
    target = tmp_path / "export.bin"
    target.write_bytes(b"old")
    names: list[str] = []

    def save_by_name(file: BinaryIO) -> None:
        names.append(file.name)
        Path(file.name).write_bytes(b"saved by name")

    replace_file(target, save_by_name)
    assert target.read_bytes() == b"saved by name"
    assert is_temporary(Path(names[0]), "export.bin")
    assert [path.name for path in tmp_path.iterdir()] == ["export.bin"]


def test_without_replace_a_file_already_there_is_kept(tmp_path: Path) -> None:
    """`replace=False`: `FileExistsError`, the old file untouched and no temporary file left."""
    target = tmp_path / "k.key"
    replace_file(target, lambda file: file.write(b"first"), replace=False)
    with pytest.raises(FileExistsError):
        replace_file(target, lambda file: file.write(b"second"), replace=False)
    assert target.read_bytes() == b"first"
    assert [path.name for path in tmp_path.iterdir()] == ["k.key"]


def test_place_file_puts_a_written_file_in_place(tmp_path: Path) -> None:
    """A file written elsewhere in the file system lands whole under its name; refused when the
    name is taken and not `replace`, the file is left where it was."""
    (tmp_path / "uploads").mkdir()
    (tmp_path / "rounds").mkdir()
    source = tmp_path / "uploads" / "part"
    source.write_bytes(b"upload")
    place_file(source, tmp_path / "rounds" / "alice")
    assert (tmp_path / "rounds" / "alice").read_bytes() == b"upload" and not source.exists()
    source.write_bytes(b"again")
    with pytest.raises(FileExistsError):
        place_file(source, tmp_path / "rounds" / "alice", replace=False)
    assert source.read_bytes() == b"again"
    assert (tmp_path / "rounds" / "alice").read_bytes() == b"upload"
