"""The envoy's durable state: its experiments and their collaborators, in one SQLite file (WAL).

SQLite rather than one file per experiment written atomically: the site operator's `envoy
approve ID` writes the same state while the envoy runs, and SQLite's transactions make the two
writers safe without a protocol of our own. Every write is one transaction on disk
(`synchronous=FULL`) when the method returns, so kill -9 of the envoy loses nothing.

Each experiment's collaborator moves through the states of
`foedus.lifecycle.states.CollaboratorState` (the same as director.proto's); the allowed moves are
its one table `TRANSITIONS`. Every change also goes, in the same transaction, to an outbox of
reports, sent in order and deleted once the director has them: a change made while the director was
away, or by `envoy approve`, is reported when it can be, and none is skipped.

Schema version 2 added `restart_round` (the round the collaborator had finished when it was last
started again, so restarts are counted in a row); a version 1 state is migrated when opened.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foedus.durable.sqlite import SqliteStore, connect, lock_state_folder, make_state_folder
from foedus.envoy.errors import IllegalTransitionError, StateError, UnknownExperimentError
from foedus.lifecycle.states import TRANSITIONS, CollaboratorState

DATABASE = "envoy.sqlite"
LOCK = "envoy.lock"
SCHEMA_VERSION = 2
DIRECTOR = "director"  # an experiment the director sent: its changes are reported to it
SITE = "site"  # a collaborator started at the site (its API): the director never hears of it
NO_ROUND = -1  # `restart_round` before any round is finished
# Who said stop (the `stopping` column): the director's stop ends it, the site's gives it up.
STOPPED_BY_DIRECTOR = 1
STOPPED_BY_SITE = 2


@dataclass(frozen=True)
class SiteExperiment:
    """One experiment this envoy was asked to run a collaborator for."""

    experiment_id: str
    name: str
    owner: str
    site: str  # the collaborator's name in the plan (this site's)
    plan_yaml: str  # the director's plan, as received
    state: CollaboratorState
    exit_code: int
    reason: str
    pid: int | None  # the collaborator's `processes.child` parent, while it runs
    restarts: int  # times started again after dying, in a row (reset when it makes progress)
    stopping: bool  # the director (or the site's operator) said stop
    done: bool  # stopped and no longer listed in heartbeats
    received_at: float
    origin: str = DIRECTOR  # DIRECTOR's experiment, or SITE's: started by the site's API
    stopped_by_site: bool = False  # the stop was the site operator's: the site gives it up
    restart_round: int = NO_ROUND  # the round it had finished when last started again

    @property
    def finished(self) -> bool:
        """Whether its collaborator has ended and nothing will start it again."""
        return self.done or self.state.final or self.state is CollaboratorState.EXITED


@dataclass(frozen=True)
class OutgoingReport:
    """A state change not yet acknowledged by the director; `sequence` orders them."""

    sequence: int
    experiment_id: str
    state: CollaboratorState
    exit_code: int
    reason: str


_COLUMNS = (
    "id, name, owner, site, plan_yaml, state, exit_code, reason, pid, restarts, stopping, done, "
    "received_at, origin, restart_round"
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    site TEXT NOT NULL,
    plan_yaml TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    restarts INTEGER NOT NULL DEFAULT 0,
    stopping INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    origin TEXT NOT NULL DEFAULT 'director',
    restart_round INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS outbox (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""
# What each version's state gets to become the next one's (`durable.sqlite.connect`).
_MIGRATIONS = {1: "ALTER TABLE experiments ADD COLUMN restart_round INTEGER NOT NULL DEFAULT -1"}


class EnvoyState(SqliteStore):
    """The envoy's experiments; open with `open`. The running envoy holds the folder's lock."""

    def __init__(
        self,
        folder: Path,
        connection: sqlite3.Connection,
        lock: int | None,
        clock: Callable[[], float],
    ) -> None:
        """Use `open`; this only keeps what it prepared."""
        self.folder = folder
        super().__init__(connection, folder / DATABASE, StateError)
        self._folder_lock = lock
        self._clock = clock

    @classmethod
    def open(
        cls, folder: Path, *, exclusive: bool, clock: Callable[[], float] = time.time
    ) -> EnvoyState:
        """Open (or create) the state in `folder`; `exclusive`: as the one running envoy."""
        folder = Path(folder)
        lock: int | None = None
        if exclusive:
            lock = lock_state_folder(folder, LOCK, "envoy", StateError)
        else:
            make_state_folder(folder, "envoy", StateError)
        try:
            connection = connect(
                folder / DATABASE,
                _SCHEMA,
                SCHEMA_VERSION,
                "envoy",
                StateError,
                timeout=30,
                migrations=_MIGRATIONS,
            )
        except StateError:
            if lock is not None:
                os.close(lock)
            raise
        return cls(folder, connection, lock, clock)

    def close(self) -> None:
        """Close the database and let another envoy open the folder."""
        with self._lock:
            self._db.close()
            if self._folder_lock is not None:
                os.close(self._folder_lock)

    # -- reading ------------------------------------------------------------------------------

    def experiment(self, experiment_id: str) -> SiteExperiment:
        """The experiment with this id; `UnknownExperimentError` if there is none."""
        rows = self._query_all(f"SELECT {_COLUMNS} FROM experiments WHERE id = ?", (experiment_id,))
        if not rows:
            raise UnknownExperimentError(f"no experiment {experiment_id!r} at this envoy")
        return _experiment(rows[0])

    def find(self, experiment_id: str) -> SiteExperiment | None:
        """The experiment with this id, or None."""
        rows = self._query_all(f"SELECT {_COLUMNS} FROM experiments WHERE id = ?", (experiment_id,))
        return _experiment(rows[0]) if rows else None

    def experiments(self, *, listed_only: bool = False) -> list[SiteExperiment]:
        """Every experiment in the order received; `listed_only`: those not done."""
        where = " WHERE done = 0" if listed_only else ""
        rows = self._query_all(f"SELECT {_COLUMNS} FROM experiments{where} ORDER BY sequence")
        return [_experiment(row) for row in rows]

    # -- writing ------------------------------------------------------------------------------

    def add(
        self,
        *,
        experiment_id: str,
        name: str,
        owner: str,
        site: str,
        plan_yaml: str,
        state: CollaboratorState,
        reason: str = "",
        origin: str = DIRECTOR,
    ) -> SiteExperiment:
        """Keep a new experiment in its first state; one already known is left as it is."""
        with self._transaction() as db:
            added = db.execute(
                "INSERT OR IGNORE INTO experiments (id, name, owner, site, plan_yaml, state, "
                "reason, received_at, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    experiment_id,
                    name,
                    owner,
                    site,
                    plan_yaml,
                    state.value,
                    reason,
                    self._clock(),
                    origin,
                ),
            )
            if added.rowcount:
                _outgoing(db, experiment_id, state, 0, reason)
        return self.experiment(experiment_id)

    def transition(
        self,
        experiment_id: str,
        to: CollaboratorState,
        *,
        reason: str = "",
        exit_code: int = 0,
        pid: int | None = None,
        restarted: bool = False,
        restart_round: int | None = None,
    ) -> SiteExperiment:
        """Move to `to` if `TRANSITIONS` allows it (`IllegalTransitionError` if not); reported next.

        `restarted`: it was started again, one more restart in a row; with `restart_round`, the
        round it had finished then: more than at its last restart, and the count starts again.
        """
        with self._transaction() as db:
            row = db.execute("SELECT state FROM experiments WHERE id = ?", (experiment_id,))
            found = row.fetchone()
            if found is None:
                raise UnknownExperimentError(f"no experiment {experiment_id!r} at this envoy")
            current = CollaboratorState(found[0])
            if to not in TRANSITIONS[current]:
                raise IllegalTransitionError(
                    f"experiment {experiment_id}: its collaborator is {current.value}, it cannot "
                    f"become {to.value}"
                )
            db.execute(
                "UPDATE experiments SET state = ?, reason = ?, exit_code = ?, pid = ? WHERE id = ?",
                (to.value, reason, exit_code, pid, experiment_id),
            )
            if restarted:
                done = NO_ROUND if restart_round is None else restart_round
                db.execute(
                    "UPDATE experiments SET restarts = CASE WHEN ? > restart_round THEN 1 "
                    "ELSE restarts + 1 END, restart_round = MAX(restart_round, ?) WHERE id = ?",
                    (done, done, experiment_id),
                )
            _outgoing(db, experiment_id, to, exit_code, reason)
        return self.experiment(experiment_id)

    def set_stopping(self, experiment_id: str, *, by_site: bool = False) -> None:
        """The director (or, `by_site`, the site's operator) said stop: the collaborator is stopped
        (if it runs) and then done; the first to say it decides how it ends."""
        self._execute(
            "UPDATE experiments SET stopping = ? WHERE id = ? AND stopping = 0",
            (STOPPED_BY_SITE if by_site else STOPPED_BY_DIRECTOR, experiment_id),
        )

    def set_done(self, experiment_id: str) -> None:
        """Stopped: no longer listed in heartbeats (its log is kept)."""
        self._execute("UPDATE experiments SET done = 1, pid = NULL WHERE id = ?", (experiment_id,))

    def outgoing(self) -> list[OutgoingReport]:
        """The changes the director has not acknowledged, in order."""
        rows = self._query_all(
            "SELECT sequence, experiment_id, state, exit_code, reason FROM outbox ORDER BY sequence"
        )
        return [
            OutgoingReport(seq, eid, CollaboratorState(state), code, reason)
            for seq, eid, state, code, reason in rows
        ]

    def acknowledge(self, sequence: int) -> None:
        """The director has the report `sequence`."""
        self._execute("DELETE FROM outbox WHERE sequence = ?", (sequence,))

    def report_all_again(self) -> None:
        """Queue every listed experiment's current state (after a restart, a new registration)."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, state, exit_code, reason FROM experiments WHERE done = 0 "
                "ORDER BY sequence"
            ).fetchall()
            for eid, state, code, reason in rows:
                _outgoing(db, eid, CollaboratorState(state), code, reason)

    # -- helpers ------------------------------------------------------------------------------

    def _execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> None:
        with self._transaction() as db:
            db.execute(sql, parameters)


def _experiment(row: tuple[Any, ...]) -> SiteExperiment:
    (eid, name, owner, site, plan, state, code, reason, pid, restarts, stopping, done) = row[:12]
    received, origin, restart_round = row[12], row[13], row[14]
    return SiteExperiment(
        experiment_id=eid,
        name=name,
        owner=owner,
        site=site,
        plan_yaml=plan,
        state=CollaboratorState(state),
        exit_code=code,
        reason=reason,
        pid=pid,
        restarts=restarts,
        stopping=bool(stopping),
        done=bool(done),
        received_at=received,
        origin=origin,
        stopped_by_site=stopping == STOPPED_BY_SITE,
        restart_round=restart_round,
    )


def _outgoing(
    db: sqlite3.Connection, experiment_id: str, state: CollaboratorState, code: int, reason: str
) -> None:
    # Only the director's experiments are reported to it; the site's own are the site's.
    db.execute(
        "INSERT INTO outbox (experiment_id, state, exit_code, reason) SELECT ?, ?, ?, ? "
        "WHERE EXISTS (SELECT 1 FROM experiments WHERE id = ? AND origin = ?)",
        (experiment_id, state.value, code, reason, experiment_id, DIRECTOR),
    )
