"""Files the services write whole: atomically and on disk (the folder too) before they return.

A crash leaves the old file or the new one, never a part: the bytes go to a temporary file
beside it, are fsynced, renamed into place, and the folder is fsynced so the rename survives.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a value met twice in full: foedus's YAML readers refuse aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        """Never an anchor and alias, whatever the value."""
        return True


def write_yaml(document: Mapping[str, Any], path: Path) -> None:
    """Write `document` to `path` as YAML, atomically and durably; `OSError`, `yaml.YAMLError`."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def dump(temporary: Path) -> None:
        with temporary.open("w", encoding="utf-8") as file:
            yaml.dump(document, file, Dumper=_NoAliasDumper, sort_keys=False)

    replace_file(path, dump)


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Replace `path` with the file `write` writes at the temporary path it is given, atomically
    and durably (for writers that take a file name, not an open file); `OSError`, or whatever
    `write` raises, and then the temporary file is gone."""
    folder = path.parent
    temporary = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # Created as open() creates files (the umask decides its mode), and never over another's.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(temporary.stat().st_mode)
    try:
        write(temporary)
        os.chmod(temporary, mode)  # a writer that made the file again made it with its own mode
        place_file(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def place_file(temporary: Path, path: Path) -> None:
    """Make the written file `temporary` durable as `path` (same file system): fsync it,
    rename it over `path`, fsync the folder; `OSError`."""
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    fsync_folder(path.parent)


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
