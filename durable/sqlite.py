"""SQLite as the services keep it: WAL, every commit synced, one writer thread at a time.

`SqliteStore` is the base of the aggregator's, the director's and the envoy's state classes:
one connection shared by the service's threads behind one lock, each write one `BEGIN IMMEDIATE`
transaction, every SQLite failure raised as the service's own error naming the database.
`lock_state_folder` and `connect` open a state folder and its database the way the director and
the envoy do (a `meta` table holding the schema version, and the migrations from older versions);
the aggregator has its own versioning
(`PRAGMA user_version`, with migrations) and locks its output folder itself, with `hold_lock`
as the others hold their lock files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Builds the service's own error from a message (its StorageError, StateError, ...).
ErrorType = Callable[[str], Exception]


class SqliteStore:
    """A service's state in one SQLite connection, shared by its threads behind one lock."""

    def __init__(self, connection: sqlite3.Connection, database: Path, error: ErrorType) -> None:
        """Keep `connection` to `database`; its failures are raised as `error`."""
        self._db = connection
        self._lock = threading.Lock()
        self._database = database
        self._error = error

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, committed (and synced) on leaving; the service's error on failure."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                raise self._error(f"{self._database}: {error}") from None

    def _query_one(self, sql: str, parameters: Sequence[object] = ()) -> tuple[Any, ...] | None:
        rows = self._query_all(sql, parameters)
        return rows[0] if rows else None

    def _query_all(
        self, sql: str, parameters: Sequence[object] = ()
    ) -> list[tuple[Any, ...]]:  # columns as SQLite gives them
        with self._lock:
            try:
                return list(self._db.execute(sql, parameters))
            except sqlite3.Error as error:
                raise self._error(f"{self._database}: {error}") from None


def make_state_folder(folder: Path, service: str, error: ErrorType) -> None:
    """Create `folder` for `service`'s state (the director, an envoy) if it is not there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as problem:
        raise error(
            f"{folder}: cannot use as the {service}'s state folder: {problem.strerror}"
        ) from None


def lock_state_folder(folder: Path, name: str, service: str, error: ErrorType) -> int:
    """Make `folder` and hold its lock file `name` for this process; the descriptor to close."""
    make_state_folder(folder, service, error)
    try:
        lock = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as problem:
        raise error(
            f"{folder}: cannot use as the {service}'s state folder: {problem.strerror}"
        ) from None
    return hold_lock(lock, error(f"{folder}: another {service} is using this state folder"))


def hold_lock(descriptor: int, busy: Exception) -> int:
    """An exclusive lock on `descriptor` for this process; else it is closed and `busy` raised."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        raise busy from None
    return descriptor


def connect(
    database: Path,
    schema: str,
    version: int,
    service: str,
    error: ErrorType,
    *,
    timeout: float = 5.0,
    migrations: Mapping[int, str] | None = None,
) -> sqlite3.Connection:
    """The database with `schema` made, WAL, every commit synced; its `meta` version checked.

    `migrations` holds, by version, the SQL statement that makes a state of that version the
    next one's: an older state is migrated, one version at a time, each in one transaction that
    first reads the version again (another process, say `envoy approve`, may have migrated it
    meanwhile). `schema` runs first, so what it creates with IF NOT EXISTS needs no migration.
    """
    try:
        connection = sqlite3.connect(
            database, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(schema)
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            connection.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(version),)
            )
        else:
            found = int(row[0]) if row[0].isdigit() else -1
            steps = migrations or {}
            if found != version and not (
                0 < found < version and all(old in steps for old in range(found, version))
            ):
                raise error(f"{database}: state version {row[0]}, this {service} reads {version}")
            for old in range(found, version):
                _migrate(connection, steps[old], old)
    except sqlite3.Error as problem:
        raise error(f"{database}: {problem}") from None
    return connection


def _migrate(connection: sqlite3.Connection, sql: str, old: int) -> None:
    """Migrate a state of version `old` to the next, in one transaction (all of it or none)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        row = connection.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is not None and row[0] == str(old):  # else migrated meanwhile by another process
            connection.execute(sql)
            connection.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(old + 1),))
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
