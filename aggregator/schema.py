"""The aggregator state's database: its tables, its versions and their migrations, how it is opened.

The schema has a version (``PRAGMA user_version``): version 1 (before ``presence``) is migrated
to 2 when opened, version 2 (files named by SHA-256) to 3, version 3 (before ``departures``)
to 4, and version 4 (before secure aggregation's ``secure_posts`` and ``secure_closes``) to 5;
a newer version is refused. What each table holds, and in which order
it is written, is `foedus.aggregator.state`'s to say; this module only makes and opens the database:
read-write by the aggregator (`connect`: WAL, every commit synced), read-only by
``aggregator status`` (`connect_read_only`, which writes nothing, not even a file).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from urllib.parse import quote

from foedus.aggregator.digest import file_digests
from foedus.aggregator.liveness import Departure
from foedus.aggregator.record_json import record_from_json
from foedus.aggregator.state_files import make_folder
from foedus.aggregator.store import SavedPresence, Standing
from foedus.durable.files import fsync_folder
from foedus.refusals.errors import StorageError

logger = logging.getLogger(__name__)

# 2 added presence; 3 names files by BLAKE3, not SHA-256 (`_migrate_digests`); 4 added departures;
# 5 added secure aggregation's stages
SCHEMA_VERSION = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS federation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    uuid TEXT NOT NULL,
    round INTEGER NOT NULL,
    model_file TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    closing TEXT,
    last_model_rounds INTEGER,
    best_value REAL,
    best_rounds INTEGER,
    best_file TEXT,
    best_digest TEXT
);
CREATE TABLE IF NOT EXISTS results (
    round INTEGER NOT NULL,
    collaborator TEXT NOT NULL,
    task TEXT NOT NULL,
    data_size INTEGER NOT NULL,
    file TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (round, collaborator, task)
);
CREATE TABLE IF NOT EXISTS closed_rounds (
    round INTEGER PRIMARY KEY,
    record TEXT NOT NULL
);
"""
# Version 2: who is online, for `aggregator status` (times are Unix seconds).
_PRESENCE = """
CREATE TABLE IF NOT EXISTS presence (
    collaborator TEXT PRIMARY KEY,
    presence TEXT NOT NULL,
    since REAL NOT NULL,
    last_seen REAL,
    saved REAL NOT NULL
);
"""
# Version 4: who has left, and why (times are Unix seconds).
_DEPARTURES = """
CREATE TABLE IF NOT EXISTS departures (
    collaborator TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since REAL NOT NULL
);
"""
# Version 5: the round in progress's secure aggregation: each site's accepted post to a stage (as
# it arrived: `foedus.secure.wire.post_bytes`) and each stage's close with its members (JSON).
_SECURE = """
CREATE TABLE IF NOT EXISTS secure_posts (
    round INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    collaborator TEXT NOT NULL,
    message BLOB NOT NULL,
    PRIMARY KEY (round, stage, collaborator)
);
CREATE TABLE IF NOT EXISTS secure_closes (
    round INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    members TEXT NOT NULL,
    PRIMARY KEY (round, stage)
);
"""
# What each version's state gets to become the next one's; from DIGESTS_FROM, `_migrate_digests`.
_MIGRATIONS = {1: _PRESENCE, 3: _DEPARTURES, 4: _SECURE}
DIGESTS_FROM = 2
PRESENCE_FROM = 2  # versions before kept no presence
DEPARTURES_FROM = 4  # versions before kept no departures


class NotAStateError(Exception):
    """The folder holds no foedus state of this plan's federation; the message says what is there."""


def connect(database: Path) -> sqlite3.Connection:
    """The database, created with its schema if new: WAL, every commit synced."""
    try:
        make_folder(database.parent)
        existed = database.exists()
        connection = sqlite3.connect(
            database, timeout=10, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as error:
        raise StorageError(f"{database}: cannot open: {error}") from None
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageError(f"{database}: cannot use write-ahead logging (got {mode})")
        connection.execute("PRAGMA synchronous=FULL")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if not 0 <= version <= SCHEMA_VERSION:
            raise StorageError(
                f"{database}: state of schema version {version}; this aggregator reads "
                f"versions up to {SCHEMA_VERSION}"
            )
        if version == 0:
            connection.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} {_PRESENCE} {_DEPARTURES} {_SECURE} "
                f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        while 0 < version < SCHEMA_VERSION:
            if version == DIGESTS_FROM:
                _migrate_digests(connection, database.parent)
            else:
                connection.executescript(
                    f"BEGIN IMMEDIATE; {_MIGRATIONS[version]} "
                    f"PRAGMA user_version = {version + 1}; COMMIT;"
                )
            logger.info("%s: state migrated from schema version %d", database, version)
            version += 1
        if not existed:
            fsync_folder(database.parent)
    except sqlite3.Error as error:
        connection.close()
        raise StorageError(f"{database}: {error}") from None
    except BaseException:
        connection.close()
        raise
    return connection


def connect_read_only(database: Path, running: bool) -> tuple[sqlite3.Connection, int]:
    """The database opened to be read only, and its schema version (which it does not migrate).

    Of a `running` aggregator (or one killed before it folded its ``-wal`` file in), read-only:
    in WAL mode a reader never blocks the writer. Of a stopped one, immutable, so no file is
    created (a ``-wal`` or ``-shm`` file made by another user would stop the aggregator later).
    `NotAStateError` for a version this aggregator does not read; `StorageError` if it cannot open.
    """
    wal = database.with_name(database.name + "-wal")
    mode = "mode=ro" if running or wal.exists() else "mode=ro&immutable=1"
    try:
        connection = sqlite3.connect(
            f"file:{quote(str(database))}?{mode}", uri=True, timeout=5, isolation_level=None
        )
    except sqlite3.Error as error:
        raise StorageError(f"{database}: cannot open: {error}") from None
    try:
        connection.execute("PRAGMA query_only = ON")
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        if not 1 <= version <= SCHEMA_VERSION:
            raise NotAStateError(
                f"{database}: not a foedus aggregator state this version reads "
                f"(schema version {version})"
            )
    except sqlite3.DatabaseError as error:
        connection.close()
        raise read_failure(database, error) from None
    except BaseException:
        connection.close()
        raise
    return connection, version


def read_only_standing(database: Path, running: bool) -> Standing | None:
    """`read_standing` of the database opened by `connect_read_only`, then closed."""
    connection, version = connect_read_only(database, running)
    try:
        return read_standing(connection, version, running=running)
    except sqlite3.DatabaseError as error:
        raise read_failure(database, error) from None
    finally:
        connection.close()


def read_failure(database: Path, error: sqlite3.DatabaseError) -> Exception:
    """What a failed read-only read says: busy now (`StorageError`), or not a state of ours."""
    if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
        return StorageError(f"{database}: cannot read now: {error}")
    return NotAStateError(f"{database}: not a foedus aggregator state ({error})")


def read_standing(
    connection: sqlite3.Connection, version: int, *, running: bool
) -> Standing | None:
    """Every row ``aggregator status`` needs, in one read transaction (None: no federation row).

    `version` is the database's schema version: a state before presence or departures were
    kept reads as having none. The caller holds the connection for itself meanwhile.
    """
    connection.execute("BEGIN")
    try:
        federation = connection.execute(
            "SELECT uuid, round, closing FROM federation WHERE id = 1"
        ).fetchone()
        if federation is None:
            return None
        uuid, round_number, closing = federation
        results = connection.execute(
            "SELECT collaborator, task FROM results WHERE round = ? ORDER BY collaborator, task",
            (round_number,),
        ).fetchall()
        presence = (
            connection.execute(
                "SELECT collaborator, presence, since, last_seen, saved FROM presence"
            ).fetchall()
            if version >= PRESENCE_FROM
            else []
        )
        last = connection.execute(
            "SELECT record FROM closed_rounds ORDER BY round DESC LIMIT 1"
        ).fetchone()
        departures = (
            connection.execute(
                "SELECT collaborator, reason, since FROM departures ORDER BY collaborator"
            ).fetchall()
            if version >= DEPARTURES_FROM
            else []
        )
    finally:
        connection.execute("COMMIT")
    return Standing(
        uuid=str(uuid),
        round_number=int(round_number),
        closing=closing is not None,
        results=tuple((str(name), str(task)) for name, task in results),
        presence=tuple(SavedPresence(*row) for row in presence),
        last_round=None if last is None else record_from_json(last[0]),
        departures=tuple(Departure(str(n), str(r), float(t)) for n, r, t in departures),
        running=running,
    )


def _migrate_digests(connection: sqlite3.Connection, root: Path) -> None:
    """Schema version 2 to 3: the files named by SHA-256 named by their digest, in one transaction.

    Each file is read once, checked against its SHA-256 as its digest is computed. One that does
    not match, or cannot be read, is given an empty digest, which no file has: recovery then
    refuses it as it did before (a result is dropped and asked for again, a model stops the
    aggregator). A crash in the middle leaves version 2 as it was, and the next start migrates.
    """

    def digest_of(name: str | None, sha256: str | None) -> str | None:
        if name is None or sha256 is None:
            return sha256
        try:
            old, new = file_digests(root / name)
        except OSError:
            return ""
        return new if old == sha256 else ""

    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute("ALTER TABLE federation RENAME COLUMN model_sha256 TO model_digest")
        connection.execute("ALTER TABLE federation RENAME COLUMN best_sha256 TO best_digest")
        connection.execute("ALTER TABLE results RENAME COLUMN sha256 TO digest")
        for model, model_sha, best, best_sha in list(
            connection.execute(
                "SELECT model_file, model_digest, best_file, best_digest FROM federation"
            )
        ):
            connection.execute(
                "UPDATE federation SET model_digest = ?, best_digest = ? WHERE id = 1",
                (digest_of(model, model_sha), digest_of(best, best_sha)),
            )
        for round_number, collaborator, task, name, sha256 in list(
            connection.execute("SELECT round, collaborator, task, file, digest FROM results")
        ):
            connection.execute(
                "UPDATE results SET digest = ? WHERE round = ? AND collaborator = ? AND task = ?",
                (digest_of(name, sha256), round_number, collaborator, task),
            )
        connection.execute(f"PRAGMA user_version = {DIGESTS_FROM + 1}")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
    logger.info("%s: the state's files are now named by BLAKE3 digests", root)
