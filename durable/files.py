"""Files the services write whole: atomically and on disk (the folder too) before they return.

A crash leaves the old file or the new one, never a part: the bytes go to a temporary file
beside it (`.NAME.RANDOM.tmp`, see `is_temporary`), are fsynced, renamed into place, and the
folder is fsynced so the rename survives. `replace_file` is the one routine that does it: every
file foedus replaces whole goes through it; `place_file`, its last steps, puts a file written
otherwise (an upload, as it arrived) in place the same way.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import yaml

TEMPORARY_SUFFIX = ".tmp"


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value met twice in full: foedus's YAML readers refuse aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        """Never an anchor and alias, whatever the value."""
        return True


def write_yaml(document: Mapping[str, Any], path: Path) -> None:
    """Write `document` to `path` as YAML, atomically and durably; `OSError`, `yaml.YAMLError`."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def dump(file: BinaryIO) -> None:
        yaml.dump(document, file, Dumper=_NoAliasDumper, sort_keys=False, encoding="utf-8")

    replace_file(path, dump)


def write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data`, atomically and durably (`replace_file`); `OSError`."""
    replace_file(path, lambda file: file.write(data), mode=mode)


def write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Replace `path` with `text` in UTF-8, atomically and durably (`replace_file`); `OSError`."""
    write_bytes(path, text.encode("utf-8"), mode=mode)


def replace_file(
    path: Path,
    write: Callable[[BinaryIO], object],
    *,
    mode: int | None = None,
    before_rename: Callable[[], None] | None = None,
    replace: bool = True,
) -> None:
    """Replace `path` with what `write` writes to the open file it is given, atomically and
    durably; `OSError`, or whatever `write` or `before_rename` raises, and then the temporary
    file is gone (a crash may leave it: `is_temporary` knows it).

    `write` gets the temporary file open for binary writing at offset 0 (a writer that must
    name a file, a library's save, writes to `file.name`, the temporary file itself, without
    replacing it). The file has `mode` from its creation on, never wider for an instant (a
    private key's 0o600), or, when `mode` is None, the mode `open()` gives a new file (the
    umask decides). `before_rename` runs once the new bytes are on disk in the temporary file
    (a failpoint); the folder is fsynced after the rename, so the new file survives a crash.
    Not `replace`: `FileExistsError` if `path` exists, checked in the step that puts the new
    file there (a hard link, then the temporary name removed), so no other file is ever lost.
    """
    folder = path.parent
    temporary = folder / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
    # O_EXCL: never over another's file; created with `mode` (the umask can only narrow it).
    descriptor = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode
    )
    try:
        try:
            if mode is not None:
                os.fchmod(descriptor, mode)  # exactly `mode`, whatever the umask
        finally:
            os.close(descriptor)
        with temporary.open("r+b") as file:  # opened by name: `file.name` is the temporary
            write(file)
        place_file(temporary, path, before_rename=before_rename, replace=replace)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def place_file(
    source: Path,
    path: Path,
    *,
    before_rename: Callable[[], None] | None = None,
    replace: bool = True,
) -> None:
    """Make the file `source` durable as `path`, on the same file system (an upload written
    bit by bit, or `replace_file`'s temporary): `source` fsynced, `before_rename` run, renamed
    over `path` (not `replace`: linked, `FileExistsError` if `path` exists, then `source`
    removed), and the folder of `path` fsynced; `OSError` (raised before the rename, it leaves
    `source` where it was, for the caller to remove)."""
    descriptor = os.open(source, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if before_rename is not None:
        before_rename()
    if replace:
        source.replace(path)
    else:
        os.link(source, path)
        source.unlink()
    fsync_folder(path.parent)


def is_temporary(path: Path, of: str | None = None) -> bool:
    """Whether `path` is a temporary file `replace_file` left behind (for the file named `of`)."""
    prefix = "." if of is None else f".{of}."
    return path.name.startswith(prefix) and path.name.endswith(TEMPORARY_SUFFIX)


def numbered_files(folder: Path, name: re.Pattern[str]) -> list[int]:
    """The numbers of the files in `folder` whose whole name `name` matches (its first group,
    a decimal number), smallest first: a folder of one file per round. None yet: no folder, so
    []; `OSError` when it cannot be listed."""
    try:
        entries = [entry.name for entry in folder.iterdir()]
    except FileNotFoundError:
        return []
    return sorted(int(match[1]) for entry in entries if (match := name.fullmatch(entry)))


def make_folders(path: Path) -> None:
    """Create `path` and its missing parents so that a crash does not lose the new entries
    (each parent fsynced after its new folder); `OSError` names the folder that failed."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        fsync_folder(folder.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
