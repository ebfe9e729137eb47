"""DurableState: the aggregator's memory on disk, so that ``aggregator start`` after a crash resumes.

The durable `foedus.aggregator.store.FederationStore`; `MemoryStore` keeps the same contract within
one process, without surviving it (tests/test_store_contract.py runs it against both).

Everything lives in ``OUTPUT_DIR/state/``, beside the user-facing outputs: the database
(SQLite, WAL, synchronous=FULL), the global models (the current round's, and the best), the
current round's accepted results, and uploads being received, not yet accepted, beside the
round's model chunks (`foedus.aggregator.encoded_model`, a file without a name); the layout is
`foedus.aggregator.state_files`'s.

An accepted result is kept as it was streamed (`foedus.aggregator.upload`): the serialized
`TaskResults` written as it arrived, fsynced, renamed into place, the folder fsynced, so accepting
it writes no byte twice. Results handed over in memory (`.pbuf`) and models are `ModelProto` files
(`foedus.aggregator.storage`) written atomically the same way. A file is never changed once written,
and the database names it with its digest (`foedus.aggregator.digest`; of an upload: hashed as it
arrived), checked when the state is recovered and whenever a `ModelProto` file written earlier is
read back. Because no file changes, the federation holds the global model as its file mapped
(`commit_round` maps the one it has just written and returns it). The database holds:

* ``federation`` (one row): the federation's uuid, the round in progress, the file of its global
  model, the reporters of a close decided but not committed (``closing``), the training rounds of
  ``last_model.pbuf``, and the best score with its training rounds and model file;
* ``results``: one row per accepted result (round, collaborator, task, data_size, file, digest),
  kept for the current round and the one before (to answer a late resend OK, counted once);
* ``closed_rounds``: one row per closed round, its `RoundRecord` as JSON, from which the rows of
  ``metrics.jsonl`` are written again if a crash lost them; the record's ``sites`` (each
  reporter's own metrics) is absent from rounds closed by an aggregator before it was kept, and
  read as empty; under adaptive clipping a record keeps the clip of the round after it, read
  back as the clip of the round in progress (`Progress.clip`);
* ``privacy.secret`` (a file beside the database, mode 0600, for a plan with
  ``differential_privacy``): the 32 random bytes the noise of every round is drawn from
  (`foedus.privacy.noise`), made once before the first noise, never logged, so that a resumed
  federation adds exactly the noise of an undisturbed run;
* ``presence``: who is online or offline and since when (`foedus.aggregator.liveness`), for
  ``aggregator status`` only: written by the runtime on a transition and at a bounded rate
  (`save_presence`), never per call, and never read back by the aggregator;
* ``departures``: the collaborators that have left (the foedus ``Leave`` RPC), with their reason
  and when (`foedus.aggregator.liveness`): written before ``Leave`` is answered, removed when the
  collaborator calls again, and read back at recovery, so a restart still does not wait for them;
* ``secure_posts`` and ``secure_closes``: the round in progress's secure aggregation
  (`foedus.aggregator.secure_stages`): each post a site made to a stage, as it arrived, committed
  before it is acknowledged, and each stage's close with its members, committed before it is
  relayed; read back at recovery, so a restarted aggregator relays the very same messages, and
  deleted in the transaction that commits the round.

The tables, their versions and migrations are `foedus.aggregator.schema`'s; the files' layout, their
placement and tidying `foedus.aggregator.state_files`'s; the records' JSON
`foedus.aggregator.record_json`'s.

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

Over 500 lines, a fifth this docstring: one class, its writes sharing one transaction and order.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from foedus.aggregator import state_files
from foedus.aggregator.failpoints import failpoint
from foedus.aggregator.liveness import Departure, Seen
from foedus.aggregator.record_json import record_from_json, record_to_json
from foedus.aggregator.records import (
    Accepted,
    Array,
    Best,
    Progress,
    ResultTensor,
    RoundCommit,
    SecureClose,
    SecurePost,
    TaskResult,
)
from foedus.aggregator.schema import (
    SCHEMA_VERSION,
    NotAStateError,
    connect,
    read_only_standing,
    read_standing,
)
from foedus.aggregator.state_files import DATABASE, OUTPUTS, STATE_DIR, UPLOADS, StoredFile
from foedus.aggregator.store import Recovered, Standing
from foedus.durable.sqlite import SqliteStore
from foedus.privacy.noise import NoiseSecret
from foedus.refusals.errors import StorageError

logger = logging.getLogger(__name__)


class ForeignStateError(StorageError):
    """The output folder holds the state or outputs of another federation or run."""


class DurableState(SqliteStore):
    """The durable `FederationStore` of one federation in one output folder; open with `open`."""

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
        lock = state_files.lock_folder(folder)
        try:
            if reset:
                removed = state_files.wipe(folder)
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
        connection = connect(database)
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

    # -- FederationStore ---------------------------------------------------------------------------

    def stage(self, result: TaskResult) -> Accepted:
        """Make the result's file durable in its place; not accepted until `record`.

        A streamed upload's file is kept as it is (made durable, then renamed into place);
        a result in memory has its tensors written to a `ModelProto` file.
        """
        stored = state_files.place_result(self.root, result)
        return Accepted(
            result.collaborator, result.round_number, result.task_name, result.data_size, stored
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
        tensors = state_files.read_result(self.root, _stored(accepted), self.max_tensor_bytes)
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
            model, kept = state_files.average_into_file(self.root, finished_round + 1, commit.model)
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
            db.execute("DELETE FROM secure_posts WHERE round <= ?", (finished_round,))
            db.execute("DELETE FROM secure_closes WHERE round <= ?", (finished_round,))
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

    def record_secure_post(self, post: SecurePost) -> None:
        """Commit a site's post to a secure stage, as it arrived (kept until its round commits)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO secure_posts (round, stage, collaborator, message) VALUES (?, ?, ?, ?)",
                (post.round_number, post.stage, post.collaborator, post.message),
            )

    def record_secure_close(self, close: SecureClose) -> None:
        """Commit that a secure stage closed, with its members (kept until its round commits)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO secure_closes (round, stage, members) VALUES (?, ?, ?)",
                (close.round_number, close.stage, json.dumps(list(close.members))),
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

    def privacy_secret(self) -> NoiseSecret:
        """The secret in ``state/privacy.secret`` (mode 0600), made and kept durably at the
        first call; `StorageError` when it cannot be read or written, or is not a secret."""
        with self._lock:
            return state_files.privacy_secret(self.root)

    def disk_files(self) -> list[str]:
        """Every file under ``state/`` but the database's, relative to it, sorted (for tests)."""
        return state_files.files_of(self.root)

    @property
    def location(self) -> Path | None:
        """The state's folder, ``OUTPUT_DIR/state``."""
        return self.root

    def standing(self) -> Standing:
        """Where the federation stands, read in one transaction of this store's connection."""
        with self._lock:
            try:
                standing = read_standing(self._db, SCHEMA_VERSION, running=True)
            except sqlite3.Error as error:
                raise StorageError(f"{self._database}: {error}") from None
        if standing is None:
            raise StorageError(f"{self._database}: the federation row is missing")
        return standing

    @classmethod
    def read_standing(cls, folder: Path) -> Standing | None:
        """Where the federation whose state is in `folder` stands, read-only: ``aggregator status``.

        Works whether an aggregator runs on `folder` or not, writing nothing (see
        `foedus.aggregator.schema.connect_read_only`); while it reads, no aggregator starts on a
        folder that had none. None when there is no state there; `NotAStateError` for a database
        that is not one; `StorageError` when it cannot be read now.
        """
        database = folder / STATE_DIR / DATABASE
        if not database.is_file():
            return None
        with state_files.probe_folder(folder) as running:
            standing = read_only_standing(database, running)
        if standing is None:
            raise NotAStateError(f"{database}: not a foedus aggregator state (no federation row)")
        return standing

    # -- inside ------------------------------------------------------------------------------

    def _create(self, federation_uuid: str, model: Mapping[str, Array]) -> None:
        """A new state at round 0 with `model`: its file first, then the row."""
        first = state_files.write_model_file(self.root, 0, model)
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
        secure_posts = tuple(
            SecurePost(round_number, int(stage), str(name), bytes(message))
            for stage, name, message in self._query_all(
                "SELECT stage, collaborator, message FROM secure_posts WHERE round = ? "
                "ORDER BY stage, collaborator",
                (round_number,),
            )
        )
        secure_closes = tuple(
            SecureClose(round_number, int(stage), tuple(json.loads(members)))
            for stage, members in self._query_all(
                "SELECT stage, members FROM secure_closes WHERE round = ? ORDER BY stage",
                (round_number,),
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
                secure_posts=secure_posts,
                secure_closes=secure_closes,
                clip=records[-1].next_clip if records else None,
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
                state_files.check_digest(self.root / name, digest)
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

    def _read(self, stored: StoredFile) -> tuple[ResultTensor, ...]:
        """The tensors of a `ModelProto` state file, mapped from it, after checking its digest."""
        return state_files.read_checked(self.root, stored, self.max_tensor_bytes)

    def _tidy(self, round_number: int, keep: set[str] | None) -> None:
        """`state_files.tidy`, keeping the current model and the best one."""
        models = {self._model.name} | ({self._best_file.name} if self._best_file else set())
        state_files.tidy(self.root, round_number, keep, models)


def _stored(accepted: Accepted) -> StoredFile:
    if not isinstance(accepted.handle, StoredFile):
        raise TypeError(f"not a result staged by DurableState: {accepted!r}")
    return accepted.handle
