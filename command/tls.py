"""A command's start-up check of the TLS files it names: one line that says where and how to fix it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pki.errors import KeyFileError, MissingTLSFileError
from pki.tls import check_tls_files


def tls_files_problem(
    files: Sequence[tuple[str, Path]], key: Path, *, where: str, make: str
) -> str | None:
    """What is wrong with the TLS `files` and the `key`'s mode, in one line, or None.

    A missing or unreadable file is named after `where` (the config file and its field), with
    `make` (how to make it) when it is absent; an exposed key's line names the key file itself.
    """
    try:
        check_tls_files(files, key)
    except MissingTLSFileError as error:
        hint = f" ({make})" if error.absent else ""
        return f"{where}: {error}{hint}"
    except KeyFileError as error:
        return str(error)
    return None
