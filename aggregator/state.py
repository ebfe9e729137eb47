"""DurableState: the aggregator's memory on disk, so that ``aggregator start`` after a crash resumes.

Everything lives in ``OUTPUT_DIR/state/``, beside the user-facing outputs::

    state/state.sqlite                        bookkeeping (SQLite, WAL, synchronous=FULL)
    state/models/round-<n>.pbuf               global models: the current round's, and the best
    state/rounds/<round>/<collaborator>-<task>.upload  the current round's accepted results
    state/uploads/                            uploads being received, not yet accepted, and
                                              the round's model chunks (`aggregator.encoded_model`,
                                              a file without a name)

An accepted result is kept as it was streamed (`aggregator.upload`): the serialized `TaskResults`
written as it arrived, fsynced, renamed into place, the folder fsynced, so accepting it writes
no byte twice. Results handed over in memory (`.pbuf`) and models are `ModelProto` files
(`aggregator.storage`) written atomically the same way. A file is never changed once written, and
the database names it with its digest (`aggregator.digest`; of an upload: hashed as it
arrived), checked when the state is recovered and whenever a `ModelProto` file written earlier is read back. Because no
file changes, the federation holds the global model as its file mapped (`commit_round` maps the
one it has just written and returns it). The database holds:

* ``federation`` (one row): the federation's uuid, the round in progress, the file of its global
  model, the reporters of a close decided but not committed (``closing``), the training rounds of
  ``last_model.pbuf``, and the best score with its training rounds and model file;
* ``results``: one row per accepted result (round, collaborator, task, data_size, file, digest),
  kept for the current round and the one before (to answer a late resend OK, counted once);
* ``closed_rounds``: one row per closed round, its `RoundRecord` as JSON, from which the rows of
  ``metrics.jsonl`` are written again if a crash lost them; the record's ``sites`` (each
  reporter's own metrics) is absent from rounds closed by an aggregator before it was kept, and
  read as empty;
* ``presence``: who is online or offline and since when (`aggregator.liveness`), for
  ``aggregator status`` only: written by the runtime on a transition and at a bounded rate
  (`save_presence`), never per call, and never read back by the aggregator;
* ``departures``: the collaborators that have left (the foedus ``Leave`` RPC), with their reason
  and when (`aggregator.liveness`): written before ``Leave`` is answered, removed when the
  collaborator calls again, and read back at recovery, so a restart still does not wait for them.

The schema has a version (``PRAGMA user_version``): version 1 (before ``presence``) is migrated
to 2 when opened, version 2 (files named by SHA-256) to 3, and version 3 (before
``departures``) to 4; a newer version is refused.

Order of writes. An accept (`stage`, then `record`): the federation has checked everything
(the upload's bytes on their way to its file), then the file is made durable in its place, then
its row is committed, then the aggregator answers
OK; of a result refused or recognised as a resend nothing is kept (its upload file is removed). A round close: `decide_close`
commits who reported; the aggregate is computed from their files, read in collaborator order;
the new global model's file is written; then ONE transaction moves to the next round, names the
model file, keeps the round's record, updates the best and forgets older results; only then are
the round's result files and unreferenced model files deleted, and only after that does the
runtime write ``last_model.pbuf``, ``best_model.pbuf`` and the metrics row. So disk use stays at
one round of results plus at most two models.

Recovery (`DurableState.open` on an existing state): the uuid must be the plan's
(`ForeignStateError` otherwise; ``--reset`` or another folder start over); temporary and
unreferenced files (a crash between a file and its row, or before a deletion) are removed; the
current round's model and results are checked against their digests (a result that fails is
dropped with a warning, so its collaborator is asked for it again), and uploads a crash cut
short are removed; a close that was decided is redone with the same reporters, so a round killed
while aggregating gives the same model. The straggler cut-off starts again from the first hand-out after the restart.

The state belongs to one federation uuid; other changes to the plan are not detected. One
aggregator at a time: the output folder is locked (``flock``) while the state is open.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aggregator.digest import file_digest, file_digests
from aggregator.failpoints import failpoint
from aggregator.liveness import Departure, Seen
from aggregator.records import (
    Accepted,
    Array,
    AveragedModel,
    Best,
    Progress,
    ResultTensor,
    RoundCommit,
    RoundRecord,
    TaskResult,
)
from aggregator.storage import (
    BEST_MODEL,
    LAST_MODEL,
    METRICS,
    is_temporary,
    read_model_tensors,
    write_model,
    write_model_slices,
    write_tensors,
)
from aggregator.upload import read_tensors_file
from durable.files import fsync_folder
from durable.sqlite import SqliteStore, hold_lock
from refusals.errors import ModelFileError, StorageError

logger = logging.getLogger(__name__)

STATE_DIR = "state"
DATABASE = "state.sqlite"
MODELS = "models"
ROUNDS = "rounds"
UPLOADS = "uploads"  # uploads being received (`aggregator.upload`), not yet accepted
UPLOAD_SUFFIX = ".upload"  # an accepted result kept as it was sent: a serialized TaskResults
# 2 added presence; 3 names files by BLAKE3, not SHA-256 (`_migrate_digests`); 4 added departures
SCHEMA_VERSION = 4
OUTPUTS = (LAST_MODEL, BEST_MODEL, METRICS)

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
# What each version's state gets to become the next one's; from DIGESTS_FROM, `_migrate_digests`.
_MIGRATIONS = {1: _PRESENCE, 3: _DEPARTURES}
DIGESTS_FROM = 2


class ForeignStateError(StorageError):
    """The output folder holds the state or outputs of another federation or run."""


@dataclass(frozen=True)
class StoredFile:
    """A file of the state (relative to ``state/``) and the digest of its bytes."""

    name: str
    digest: str


@dataclass(frozen=True)
class Recovered:
    """What `DurableState.open` found: where the federation stands and what it did so far."""

    progress: Progress
    fresh: bool  # the state was created now: nothing to resume
    last_model_rounds: int | None  # training rounds of last_model.pbuf; None: nothing trained
    records: tuple[RoundRecord, ...]  # every closed round, in order
    dropped: tuple[str, ...] = ()  # result files that failed their check and were dropped


class DurableState(SqliteStore):
    """The durable `ResultStore` of one federation in one output folder; open with `open`."""

    def __init__(
        self,
        folder: Path,
        connection: sqlite3.Connection,
        lock: int,
        *,
        max_tensor_bytes: int,
    ) -> None:
        """Use `open`; this only keeps what it prepared."""
        self.folder = folder
        self.root = folder / STATE_DIR
        self.upload_folder: Path | None = self.root / UPLOADS
        self.max_tensor_bytes = max_tensor_bytes
        super().__init__(connection, self.root / DATABASE, StorageError)
        self._folder_lock = lock
        self._model = StoredFile("", "")
        self._best_file: StoredFile | None = None
        self._best: Best | None = None
        self._last_model_rounds: int | None = None
        self.recovered = Recovered(Progress(0, {}), fresh=True, last_model_rounds=None, records=())

    # -- opening, resetting, closing ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        folder: Path,
        federation_uuid: str,
        initial_model: Callable[[], Mapping[str, Array]],
        *,
        max_tensor_bytes: int,
        reset: bool = False,
    ) -> DurableState:
        """Open (or create) the state in `folder` and recover it; `reset` wipes it first.

        `initial_model` is called only when the state is created. Raises `ForeignStateError`
        when the folder belongs to another federation uuid, or holds outputs without a state;
        `StorageError` when the state cannot be read or written, or another aggregator uses it.
        """
        folder = Path(folder)
        lock = _lock_folder(folder)
        try:
            if reset:
                removed = wipe(folder)
                if removed:
                    logger.warning("--reset: removed %s from %s", ", ".join(removed), folder)
            state = cls._open_locked(folder, federation_uuid, initial_model, max_tensor_bytes)
        except BaseException:
            os.close(lock)
            raise
        state._folder_lock = lock
        return state

    @classmethod
    def _open_locked(
        cls,
        folder: Path,
        federation_uuid: str,
        initial_model: Callable[[], Mapping[str, Array]],
        max_tensor_bytes: int,
    ) -> DurableState:
        root = folder / STATE_DIR
        database = root / DATABASE
        model: Mapping[str, Array] | None = None
        if not database.exists():
            leftovers = [name for name in OUTPUTS if (folder / name).exists()]
            if leftovers:
                raise ForeignStateError(
                    f"{folder}: holds {', '.join(leftovers)} of an earlier run but no saved "
                    f"state ({STATE_DIR}/{DATABASE})"
                )
            model = initial_model()  # before anything is created: a bad runner leaves no trace
        connection = _connect(database)
        state = cls(folder, connection, -1, max_tensor_bytes=max_tensor_bytes)
        try:
            row = state._query_one("SELECT uuid FROM federation WHERE id = 1")
            fresh = row is None
            if row is None:
                model = initial_model() if model is None else model
                state._create(federation_uuid, model)
            elif row[0] != federation_uuid:
                raise ForeignStateError(
                    f"{folder}: holds the saved state of federation {row[0]!r}, not of this "
                    f"plan's federation {federation_uuid!r}"
                )
            # Also a new state's model is read back: mapped from its file, it holds no memory
            # of ours, where the arrays it was made from would hold all of it.
            del model
            state.recovered = state._recover(fresh)
        except BaseException:
            connection.close()
            raise
        return state

    def close(self) -> None:
        """Close the database and let another aggregator use the folder."""
        with self._lock:
            self._db.close()
            if self._folder_lock >= 0:
                os.close(self._folder_lock)
                self._folder_lock = -1

    def __enter__(self) -> DurableState:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- ResultStore ---------------------------------------------------------------------------

    def stage(self, result: TaskResult) -> Accepted:
        """Make the result's file durable in its place; not accepted until `record`.

        A streamed upload's file is kept as it is (made durable, then renamed into place);
        a result in memory has its tensors written to a `ModelProto` file.
        """
        stem = f"{ROUNDS}/{result.round_number}/{result.collaborator}-{result.task_name}"
        upload = result.upload
        name = stem + (".pbuf" if upload is None else UPLOAD_SUFFIX)
        path = self.root / name
        _make_folder(path.parent)
        if upload is None:
            digest = write_tensors(
                path,
                ((tensor.name, tensor.array, tensor.tags) for tensor in result.tensors),
                round_number=result.round_number,
            )
        else:
            _keep(upload.path, path)
            digest = upload.digest
        return Accepted(
            result.collaborator,
            result.round_number,
            result.task_name,
            result.data_size,
            StoredFile(name, digest),
        )

    def record(self, accepted: Accepted) -> None:
        """Commit the result's row: from now on it is accepted, also after a crash."""
        stored = _stored(accepted)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO results (round, collaborator, task, data_size, file, digest) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    accepted.round_number,
                    accepted.collaborator,
                    accepted.task_name,
                    accepted.data_size,
                    stored.name,
                    stored.digest,
                ),
            )
        failpoint("after_accept")

    def discard(self, accepted: Accepted) -> None:
        """Remove the file of a staged result that was refused after all."""
        (self.root / _stored(accepted).name).unlink(missing_ok=True)

    def load(self, accepted: Accepted) -> TaskResult:
        """The result read back from its file.

        A kept upload's tensors are mapped from its file, checked against its digest when the
        state was recovered (this process wrote the others, hashing them as they arrived);
        a `ModelProto` result file is read whole and checked now.
        """
        stored = _stored(accepted)
        path = self.root / stored.name
        if stored.name.endswith(UPLOAD_SUFFIX):
            _, tensors = read_tensors_file(path, max_tensor_bytes=self.max_tensor_bytes)
        else:
            tensors = self._read(stored)
        return TaskResult(
            collaborator=accepted.collaborator,
            round_number=accepted.round_number,
            task_name=accepted.task_name,
            data_size=accepted.data_size,
            tensors=tensors,
        )

    def decide_close(self, round_number: int, reporters: Sequence[str]) -> None:
        """Commit who reported in the round being closed, so a crash recomputes the same round."""
        with self._transaction() as db:
            db.execute(
                "UPDATE federation SET closing = ? WHERE id = 1 AND round = ?",
                (json.dumps(list(reporters)), round_number),
            )

    def commit_round(self, commit: RoundCommit) -> Mapping[str, Array] | None:
        """Write the next round's model file, then commit the round in one transaction, then tidy.

        The new model is averaged a slice at a time straight into its file, and returned mapped
        from it (None when the model did not change) for the federation to hold: no copy of it
        is ever in memory.
        """
        record = commit.record
        finished_round = record.round_number
        current = self._model
        model = current
        kept: dict[str, Array] | None = None
        if commit.model is not None:
            model, kept = self._average_into_file(finished_round + 1, commit.model)
        best_file, best = self._best_file, self._best
        if commit.best is not None:
            best_file, best = (current if commit.best_is_round_model else model), commit.best
        last_rounds = finished_round + 1 if record.trained else self._last_model_rounds
        failpoint("before_round_commit")
        with self._transaction() as db:
            db.execute(
                "UPDATE federation SET round = ?, model_file = ?, model_digest = ?, "
                "closing = NULL, last_model_rounds = ?, best_value = ?, best_rounds = ?, "
                "best_file = ?, best_digest = ? WHERE id = 1",
                (
                    finished_round + 1,
                    model.name,
                    model.digest,
                    last_rounds,
                    None if best is None else best.value,
                    None if best is None else best.training_rounds,
                    None if best_file is None else best_file.name,
                    None if best_file is None else best_file.digest,
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO closed_rounds (round, record) VALUES (?, ?)",
                (finished_round, record_to_json(record)),
            )
            db.execute("DELETE FROM results WHERE round < ?", (finished_round,))
        self._model, self._best_file, self._best = model, best_file, best
        self._last_model_rounds = last_rounds
        self._tidy(finished_round + 1, keep=None)
        return kept

    def save_presence(self, snapshot: Sequence[Seen], *, saved: float | None = None) -> None:
        """Keep who is online and since when, replacing what was kept (for `aggregator status`)."""
        now = time.time() if saved is None else saved
        with self._transaction() as db:
            db.execute("DELETE FROM presence")
            db.executemany(
                "INSERT INTO presence (collaborator, presence, since, last_seen, saved) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (seen.name, seen.presence.value, seen.since, seen.last_seen, now)
                    for seen in snapshot
                ],
            )

    def record_leave(self, departure: Departure) -> None:
        """Commit that a collaborator has left (kept until it calls again)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO departures (collaborator, reason, since) VALUES (?, ?, ?)",
                (departure.name, departure.reason, departure.since),
            )

    def record_rejoin(self, name: str) -> None:
        """Commit that a collaborator that had left called again."""
        with self._transaction() as db:
            db.execute("DELETE FROM departures WHERE collaborator = ?", (name,))

    # -- what the runtime needs after a restart --------------------------------------------

    def best_model(self) -> Mapping[str, Array] | None:
        """The model of the best score so far (None: no best yet)."""
        if self._best_file is None:
            return None
        return {tensor.name: tensor.array for tensor in self._read(self._best_file)}

    def disk_files(self) -> list[str]:
        """Every file under ``state/`` but the database's, relative to it, sorted (for tests)."""
        return sorted(
            str(path.relative_to(self.root))
            for path in self.root.rglob("*")
            if path.is_file() and not path.name.startswith(DATABASE)
        )

    # -- inside ------------------------------------------------------------------------------

    def _create(self, federation_uuid: str, model: Mapping[str, Array]) -> None:
        """A new state at round 0 with `model`: its file first, then the row."""
        first = self._write_model(0, model)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO federation (id, uuid, round, model_file, model_digest) "
                "VALUES (1, ?, 0, ?, ?)",
                (federation_uuid, first.name, first.digest),
            )
        logger.info("new aggregator state in %s for federation %s", self.root, federation_uuid)

    def _recover(self, fresh: bool) -> Recovered:
        """Load the committed state, check its files, remove what a crash left behind."""
        row = self._query_one(
            "SELECT round, model_file, model_digest, closing, last_model_rounds, best_value, "
            "best_rounds, best_file, best_digest FROM federation WHERE id = 1"
        )
        if row is None:
            raise StorageError(f"{self.root / DATABASE}: the federation row is missing")
        (round_number, model_file, model_sha, closing, last_rounds, best_value, best_rounds) = row[
            :7
        ]
        best_file, best_sha = row[7], row[8]
        self._model = StoredFile(model_file, model_sha)
        self._last_model_rounds = last_rounds
        if best_value is not None and best_file is not None:
            self._best = Best(float(best_value), int(best_rounds))
            self._best_file = StoredFile(best_file, best_sha)
        model = {tensor.name: tensor.array for tensor in self._read(self._model)}
        accepted, dropped = self._recover_results(round_number)
        previous = frozenset(
            (collaborator, task)
            for collaborator, task in self._query_all(
                "SELECT collaborator, task FROM results WHERE round = ?", (round_number - 1,)
            )
        )
        records = tuple(
            record_from_json(text)
            for (text,) in self._query_all("SELECT record FROM closed_rounds ORDER BY round")
        )
        self._tidy(round_number, keep={_stored(item).name for item in accepted})
        departures = tuple(
            Departure(str(name), str(reason), float(since))
            for name, reason, since in self._query_all(
                "SELECT collaborator, reason, since FROM departures ORDER BY collaborator"
            )
        )
        return Recovered(
            progress=Progress(
                round_number=round_number,
                model=model,
                accepted=tuple(accepted),
                previous=previous,
                closing=None if closing is None else tuple(json.loads(closing)),
                best=self._best,
                departures=departures,
            ),
            fresh=fresh,
            last_model_rounds=last_rounds,
            records=records,
            dropped=tuple(dropped),
        )

    def _recover_results(self, round_number: int) -> tuple[list[Accepted], list[str]]:
        """The current round's accepted results whose files are whole; the others dropped."""
        accepted: list[Accepted] = []
        dropped: list[str] = []
        rows = self._query_all(
            "SELECT collaborator, task, data_size, file, digest FROM results WHERE round = ? "
            "ORDER BY collaborator, task",
            (round_number,),
        )
        for collaborator, task, data_size, name, digest in rows:
            stored = StoredFile(name, digest)
            try:
                _check_digest(self.root / name, digest)
            except StorageError as error:
                logger.warning(
                    "dropping %s's %s result of round %d, which will be asked for again: %s",
                    collaborator,
                    task,
                    round_number,
                    error,
                )
                with self._transaction() as db:
                    db.execute(
                        "DELETE FROM results WHERE round = ? AND collaborator = ? AND task = ?",
                        (round_number, collaborator, task),
                    )
                (self.root / name).unlink(missing_ok=True)
                dropped.append(name)
                continue
            accepted.append(Accepted(collaborator, round_number, task, data_size, stored))
        return accepted, dropped

    def _write_model(self, round_number: int, model: Mapping[str, Array]) -> StoredFile:
        name = f"{MODELS}/round-{round_number}.pbuf"
        path = self.root / name
        _make_folder(path.parent)
        return StoredFile(name, write_model(path, model, round_number=round_number))

    def _average_into_file(
        self, round_number: int, model: AveragedModel
    ) -> tuple[StoredFile, dict[str, Array]]:
        """The new model's file, and its tensors mapped from it (not read back: just written)."""
        name = f"{MODELS}/round-{round_number}.pbuf"
        path = self.root / name
        _make_folder(path.parent)
        written = write_model_slices(path, model.reference, model.into, round_number=round_number)
        return StoredFile(name, written.digest), written.mapped()

    def _read(self, stored: StoredFile) -> tuple[ResultTensor, ...]:
        """The tensors of a `ModelProto` state file, mapped from it, after checking its digest."""
        path = self.root / stored.name
        _check_digest(path, stored.digest)
        return read_model_tensors(path, self.max_tensor_bytes)

    def _tidy(self, round_number: int, keep: set[str] | None) -> None:
        """Delete result files of rounds before `round_number`, unreferenced models, temporaries.

        With `keep` (at recovery) the files of `round_number` not in it go too: they were
        written by a crash before their row was committed. Without it (after a commit) the
        round just opened is left alone.
        """
        rounds = self.root / ROUNDS
        if rounds.is_dir():
            for folder in rounds.iterdir():
                if not folder.name.isdigit() or int(folder.name) < round_number:
                    shutil.rmtree(folder, ignore_errors=True)
                elif keep is not None:
                    if int(folder.name) > round_number:
                        shutil.rmtree(folder, ignore_errors=True)
                        continue
                    for path in folder.iterdir():
                        if f"{ROUNDS}/{folder.name}/{path.name}" not in keep:
                            path.unlink(missing_ok=True)
        if keep is not None:  # uploads cut by the crash, never accepted: they are asked for again
            shutil.rmtree(self.root / UPLOADS, ignore_errors=True)
        models = self.root / MODELS
        kept = {self._model.name} | ({self._best_file.name} if self._best_file else set())
        if models.is_dir():
            for path in models.iterdir():
                if f"{MODELS}/{path.name}" not in kept:
                    path.unlink(missing_ok=True)


def wipe(folder: Path) -> list[str]:
    """Remove the state and outputs of the aggregator in `folder`; the names removed."""
    removed: list[str] = []
    root = Path(folder) / STATE_DIR
    try:
        if root.exists():
            shutil.rmtree(root)
            removed.append(f"{STATE_DIR}/")
        for name in OUTPUTS:
            path = Path(folder) / name
            if path.exists():
                path.unlink()
                removed.append(name)
        if Path(folder).is_dir():
            for path in Path(folder).iterdir():
                if is_temporary(path, LAST_MODEL) or is_temporary(path, BEST_MODEL):
                    path.unlink()
            fsync_folder(Path(folder))
    except OSError as error:
        raise StorageError(f"{folder}: cannot reset: {error.strerror or error}") from None
    return removed


def record_to_json(record: RoundRecord) -> str:
    """A round's record as JSON (NaN metrics kept as NaN)."""
    return json.dumps(
        {
            "round": record.round_number,
            "final_validation": record.final_validation,
            "reporters": list(record.reporters),
            "missing": list(record.missing),
            "metrics": {task: dict(values) for task, values in record.metrics.items()},
            "seconds": record.seconds,
            "trained": record.trained,
            "sites": {
                site: {task: dict(values) for task, values in tasks.items()}
                for site, tasks in record.sites.items()
            },
        },
        sort_keys=True,
    )


def record_from_json(text: object) -> RoundRecord:
    """The record `record_to_json` wrote (also before it kept ``sites``)."""
    data = json.loads(str(text))
    return RoundRecord(
        round_number=int(data["round"]),
        final_validation=bool(data["final_validation"]),
        reporters=tuple(data["reporters"]),
        missing=tuple(data["missing"]),
        metrics={
            task: {name: float(value) for name, value in values.items()}
            for task, values in data["metrics"].items()
        },
        seconds=float(data["seconds"]),
        trained=bool(data["trained"]),
        sites={
            site: {
                task: {name: float(value) for name, value in values.items()}
                for task, values in tasks.items()
            }
            for site, tasks in data.get("sites", {}).items()
        },
    )


def _keep(temporary: Path, path: Path) -> None:
    """Make the file `temporary` durable as `path` (same file system): fsync, rename, fsync folder."""
    try:
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except OSError as error:
        raise StorageError(f"{path}: cannot keep the upload: {error.strerror or error}") from None


def _check_digest(path: Path, digest: str) -> None:
    """`ModelFileError` unless the file at `path` has that digest; read a block at a time."""
    try:
        actual = file_digest(path)
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if actual != digest:
        raise ModelFileError(f"{path}: the file does not match its digest in {DATABASE}")


def _stored(accepted: Accepted) -> StoredFile:
    if not isinstance(accepted.handle, StoredFile):
        raise TypeError(f"not a result staged by DurableState: {accepted!r}")
    return accepted.handle


def _connect(database: Path) -> sqlite3.Connection:
    """The database, created with its schema if new: WAL, every commit synced."""
    try:
        _make_folder(database.parent)
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
                f"BEGIN IMMEDIATE; {_SCHEMA} {_PRESENCE} {_DEPARTURES} "
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


def _lock_folder(folder: Path) -> int:
    """An exclusive lock on `folder` for this process (released when the descriptor closes)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise StorageError(f"{folder}: cannot open: {error.strerror or error}") from None
    return hold_lock(
        descriptor, StorageError(f"{folder}: another aggregator is using this output folder")
    )


def _make_folder(path: Path) -> None:
    """Create `path` (and its parents) so that a crash does not lose the new entries."""
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
        except OSError as error:
            raise StorageError(f"{folder}: cannot create: {error.strerror or error}") from None
        fsync_folder(folder.parent)
