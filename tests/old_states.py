"""Test helper: a state turned back into what an older aggregator wrote, to test its migration."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path


def named_by_sha256(root: Path, *, version: int = 2) -> dict[str, str]:
    """Make the state in `root` (``OUTPUT_DIR/state``) name its files by SHA-256, as schema
    versions 1 and 2 did: the digest columns get their old names back and the SHA-256 of each
    file still there, and the schema version is `version`.

    Returns the digests the state had, by file name, to compare with what a migration computes.
    """
    connection = sqlite3.connect(root / "state.sqlite", isolation_level=None)
    try:
        digests = dict(connection.execute("SELECT model_file, model_digest FROM federation"))
        digests.update(connection.execute("SELECT file, digest FROM results"))

        def sha256(name: str) -> str:
            path = root / name
            return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "gone"

        connection.execute("BEGIN")
        connection.execute("ALTER TABLE federation RENAME COLUMN model_digest TO model_sha256")
        connection.execute("ALTER TABLE federation RENAME COLUMN best_digest TO best_sha256")
        connection.execute("ALTER TABLE results RENAME COLUMN digest TO sha256")
        (model,) = connection.execute("SELECT model_file FROM federation").fetchone()
        connection.execute("UPDATE federation SET model_sha256 = ?", (sha256(model),))
        for (name,) in list(connection.execute("SELECT file FROM results")):
            connection.execute("UPDATE results SET sha256 = ? WHERE file = ?", (sha256(name), name))
        connection.execute("DROP TABLE departures")  # version 4's
        _drop_secure(connection)  # version 5's
        if version < 2:
            connection.execute("DROP TABLE presence")
        connection.execute(f"PRAGMA user_version = {version}")
        connection.execute("COMMIT")
    finally:
        connection.close()
    return digests


def before_departures(root: Path) -> None:
    """Make the state in `root` (``OUTPUT_DIR/state``) what schema version 3 wrote: no
    ``departures`` table (who has left)."""
    connection = sqlite3.connect(root / "state.sqlite", isolation_level=None)
    try:
        connection.execute("BEGIN")
        connection.execute("DROP TABLE departures")
        _drop_secure(connection)
        connection.execute("PRAGMA user_version = 3")
        connection.execute("COMMIT")
    finally:
        connection.close()


def before_secure(root: Path) -> None:
    """Make the state in `root` (``OUTPUT_DIR/state``) what schema version 4 wrote: no tables of
    secure aggregation's stages."""
    connection = sqlite3.connect(root / "state.sqlite", isolation_level=None)
    try:
        connection.execute("BEGIN")
        _drop_secure(connection)
        connection.execute("PRAGMA user_version = 4")
        connection.execute("COMMIT")
    finally:
        connection.close()


def _drop_secure(connection: sqlite3.Connection) -> None:
    connection.execute("DROP TABLE secure_posts")
    connection.execute("DROP TABLE secure_closes")


def schema_of(folder: Path) -> tuple[int, list[str]]:
    """The schema version of the state in `folder` (``OUTPUT_DIR``) and its `results` columns."""
    connection = sqlite3.connect(folder / "state" / "state.sqlite")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        columns = [row[1] for row in connection.execute("PRAGMA table_info(results)")]
    finally:
        connection.close()
    return version, columns
