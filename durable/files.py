"""Files the services write whole: atomically and on disk (the folder too) before they return.

A crash leaves the old file or the new one, never a part: the text goes to a temporary file
beside it, is fsynced, renamed into place, and the folder is fsynced so the rename survives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def write_yaml(document: Mapping[str, Any], path: Path) -> None:
    """Write `document` to `path` as YAML, atomically and durably; `OSError`, `yaml.YAMLError`."""
    folder = path.parent
    temporary = folder / f".{path.name}.tmp"
    folder.mkdir(parents=True, exist_ok=True)
    with temporary.open("w", encoding="utf-8") as file:
        yaml.safe_dump(document, file, sort_keys=False)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
