"""The director's whole durable state, in one SQLite file (WAL, synchronous=FULL) in its folder.

One class, `DirectorState`, holds the experiments and their lifecycle, the envoy registry and the
sites' reports; the service only calls it. Every write is one transaction that is on disk when
the method returns, so what the director acknowledged survives kill -9. The lifecycle's allowed
moves are the one table `TRANSITIONS` (`foedus.director.records`); any other move raises
`IllegalTransitionError`. After every write but a heartbeat the state signals `changes`, which
followed streams wait on (`foedus.director.changes`).

An envoy is online when its last heartbeat is at most twice `health_check_seconds` old, computed
from the clock every time it is read: no stored flag goes stale.

The schema, its migrations and the rows' codecs are `foedus.director.schema`'s.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import sqlite3
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from foedus.director.changes import Changes
from foedus.director.records import (
    TRANSITIONS,
    Envoy,
    Experiment,
    ExperimentState,
    IllegalTransitionError,
    ShardInfo,
    SiteReport,
)
from foedus.director.schema import (
    EXPERIMENT_COLUMNS,
    MIGRATIONS,
    RESTARTS,
    SCHEMA,
    SCHEMA_VERSION,
    experiment_from_row,
    shard_from_json,
    shard_to_json,
)
from foedus.durable.sqlite import SqliteStore, connect, lock_state_folder
from foedus.lifecycle.states import CollaboratorState
from foedus.refusals.errors import NotFoundError, StorageError

DATABASE = "director.sqlite"
LOCK = "director.lock"


class DirectorState(SqliteStore):
    """The director's experiments, envoys and site reports; open with `open`, one per folder."""

    def __init__(
        self,
        folder: Path,
        connection: sqlite3.Connection,
        lock: int,
        *,
        health_check_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        """Use `open`; this only keeps what it prepared."""
        self.folder = folder
        self.health_check_seconds = health_check_seconds
        self._clock = clock
        super().__init__(connection, folder / DATABASE, StorageError)
        self._folder_lock = lock
        self.changes = Changes()

    # -- opening and closing ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        folder: Path,
        *,
        health_check_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> DirectorState:
        """Open (or create) the state in `folder`; `StorageError` if unusable or in use."""
        folder = Path(folder)
        lock = lock_state_folder(folder, LOCK, "director", StorageError)
        try:
            connection = connect(
                folder / DATABASE,
                SCHEMA + RESTARTS,
                SCHEMA_VERSION,
                "director",
                StorageError,
                migrations=MIGRATIONS,
            )
        except StorageError:
            os.close(lock)
            raise
        return cls(
            folder,
            connection,
            lock,
            health_check_seconds=health_check_seconds,
            clock=clock,
        )

    def close(self) -> None:
        """Close the database and let another director open the folder."""
        with self._lock:
            self._db.close()
            os.close(self._folder_lock)

    @contextlib.contextmanager
    def _transaction(self, *, quiet: bool = False) -> Iterator[sqlite3.Connection]:
        """`SqliteStore`'s write transaction, `changes` signalled once it is committed (unless
        `quiet`: a write no follower shows)."""
        with super()._transaction() as db:
            yield db
        if not quiet:
            self.changes.signal()

    # -- experiments --------------------------------------------------------------------------

    def add_experiment(
        self,
        *,
        owner: str,
        name: str,
        plan_yaml: str,
        sites: Sequence[str],
        rounds: int,
        has_initial_model: bool,
        experiment_id: str | None = None,
    ) -> Experiment:
        """Store a new experiment as submitted; its id (a new UUID unless given) is its federation's."""
        experiment_id = experiment_id or str(uuid.uuid4())
        with self._transaction() as db:
            db.execute(
                "INSERT INTO experiments (id, name, owner, state, plan_yaml, sites, rounds, "
                "has_initial_model, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    experiment_id,
                    name,
                    owner,
                    ExperimentState.SUBMITTED.value,
                    plan_yaml,
                    json.dumps(list(sites)),
                    rounds,
                    int(has_initial_model),
                    self._clock(),
                ),
            )
        return self.experiment(experiment_id)

    def experiment(self, experiment_id: str) -> Experiment:
        """The experiment with this id; `NotFoundError` if there is none."""
        row = self._query_one(
            f"SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE id = ?", (experiment_id,)
        )
        if row is None:
            raise NotFoundError(f"no experiment {experiment_id!r}")
        return experiment_from_row(row)

    def experiments(self, owner: str | None = None) -> list[Experiment]:
        """Every experiment (of `owner`, if given), in submission order."""
        if owner is None:
            rows = self._query_all(
                f"SELECT {EXPERIMENT_COLUMNS} FROM experiments ORDER BY sequence"
            )
        else:
            rows = self._query_all(
                f"SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE owner = ? ORDER BY sequence",
                (owner,),
            )
        return [experiment_from_row(row) for row in rows]

    def transition(self, experiment_id: str, to: ExperimentState, reason: str = "") -> Experiment:
        """Move an experiment to `to`, if `TRANSITIONS` allows it; `IllegalTransitionError` if not.

        Entering waiting stamps `started_at`; entering a final state stamps `ended_at` and frees
        the port (the aggregator's pid stays until `set_aggregator` clears it: after a crash,
        recovery stops an aggregator its experiment outlived). Use `begin` to enter waiting: it
        also chooses the aggregator's port.
        """
        with self._transaction() as db:
            current = self._current_state(db, experiment_id)
            _check_move(experiment_id, current, to)
            now = self._clock()
            if to.final:
                db.execute(
                    "UPDATE experiments SET state = ?, reason = ?, ended_at = ?, port = NULL "
                    "WHERE id = ?",
                    (to.value, reason, now, experiment_id),
                )
            else:
                db.execute(
                    "UPDATE experiments SET state = ?, reason = ? WHERE id = ?",
                    (to.value, reason, experiment_id),
                )
        return self.experiment(experiment_id)

    def begin(self, experiment_id: str, ports: range) -> Experiment:
        """Move an approved experiment to waiting, with the lowest port of `ports` no other holds.

        `IllegalTransitionError` if it is not approved, or if every port of the range is taken.
        """
        with self._transaction() as db:
            current = self._current_state(db, experiment_id)
            _check_move(experiment_id, current, ExperimentState.WAITING)
            taken = {
                row[0] for row in db.execute("SELECT port FROM experiments WHERE port IS NOT NULL")
            }
            free = next((port for port in ports if port not in taken), None)
            if free is None:
                raise IllegalTransitionError(
                    f"experiment {experiment_id!r} cannot start: every aggregator port "
                    f"{ports.start}-{ports.stop - 1} is in use"
                )
            db.execute(
                "UPDATE experiments SET state = ?, started_at = ?, port = ? WHERE id = ?",
                (ExperimentState.WAITING.value, self._clock(), free, experiment_id),
            )
        return self.experiment(experiment_id)

    def set_aggregator(self, experiment_id: str, pid: int | None) -> None:
        """Record the process running the experiment's aggregator (None: none runs)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE experiments SET aggregator_pid = ? WHERE id = ?", (pid, experiment_id)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no experiment {experiment_id!r}")

    def queue(self) -> list[Experiment]:
        """The approved experiments waiting for a running place, in the order they get one.

        The queue's order, said here once: the next place goes to the waiting experiment whose
        owner holds the fewest places, counting the owner's running experiments and those ahead
        of it in the queue; ties go to the first submitted. So owners take turns by the number
        they run, and one owner's backlog never stands before another's first experiment.
        `startable` skips an owner at their limit; positions move as experiments start and end.
        """
        return self._queue(self._places_held())

    def _queue(self, held: Mapping[str, int]) -> list[Experiment]:
        """`queue` over places `held` already counted (`startable` counts them once for both)."""
        rows = self._query_all(
            f"SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE state = ? ORDER BY sequence",
            (ExperimentState.APPROVED.value,),
        )
        return _fair_order([experiment_from_row(row) for row in rows], held)

    def active(self) -> list[Experiment]:
        """The experiments holding a running place (waiting or running), in submission order."""
        rows = self._query_all(
            f"SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE state IN (?, ?) ORDER BY sequence",
            tuple(state.value for state in (ExperimentState.WAITING, ExperimentState.RUNNING)),
        )
        return [experiment_from_row(row) for row in rows]

    def startable(self, max_running: int, per_owner: int) -> list[Experiment]:
        """The queued experiments that may take a place now, in queue order.

        At most `max_running` hold places in all and `per_owner` of one owner: an owner at their
        limit is passed over for the next in the queue, and a place no one else can take stays
        free rather than go past that limit.
        """
        held = self._places_held()
        places = max(0, max_running - sum(held.values()))
        chosen: list[Experiment] = []
        for experiment in self._queue(held):  # ordered before `held` counts the chosen
            if len(chosen) == places:
                break
            if held[experiment.owner] < per_owner:
                chosen.append(experiment)
                held[experiment.owner] += 1
        return chosen

    def queue_position(self, experiment_id: str) -> int:
        """Where an approved experiment stands in the queue's order, from 1; 0 when not queued."""
        for position, queued in enumerate(self.queue(), start=1):
            if queued.experiment_id == experiment_id:
                return position
        return 0

    def _places_held(self) -> Counter[str]:
        """How many running places each owner holds now."""
        rows = self._query_all(
            "SELECT owner, COUNT(*) FROM experiments WHERE state IN (?, ?) GROUP BY owner",
            tuple(state.value for state in (ExperimentState.WAITING, ExperimentState.RUNNING)),
        )
        return Counter({owner: count for owner, count in rows})

    def remove(self, experiment_id: str) -> None:
        """Forget an experiment that has ended, and its sites' reports."""
        with self._transaction() as db:
            current = self._current_state(db, experiment_id)
            if not current.final:
                raise IllegalTransitionError(
                    f"experiment {experiment_id!r} is {current.value}; only an experiment that "
                    "has ended can be removed (cancel it first)"
                )
            db.execute("DELETE FROM site_reports WHERE experiment_id = ?", (experiment_id,))
            db.execute("DELETE FROM aggregator_restarts WHERE experiment_id = ?", (experiment_id,))
            db.execute("DELETE FROM experiments WHERE id = ?", (experiment_id,))

    def count_restart(self, experiment_id: str, rounds_completed: int) -> int:
        """One more restart of the experiment's aggregator; how many in a row that makes.

        The count starts again (at 1) when more rounds are completed than at the last restart:
        the federation made progress in between.
        """
        with self._transaction() as db:
            self._current_state(db, experiment_id)
            db.execute(
                "INSERT INTO aggregator_restarts (experiment_id, in_a_row, rounds) "
                "VALUES (?, 1, ?) ON CONFLICT (experiment_id) DO UPDATE SET in_a_row = CASE "
                "WHEN excluded.rounds > rounds THEN 1 ELSE in_a_row + 1 END, "
                "rounds = MAX(rounds, excluded.rounds)",
                (experiment_id, rounds_completed),
            )
            row = db.execute(
                "SELECT in_a_row FROM aggregator_restarts WHERE experiment_id = ?",
                (experiment_id,),
            ).fetchone()
        return int(row[0])

    # -- envoys -------------------------------------------------------------------------------

    def register(self, name: str, shard: ShardInfo, version: str) -> Envoy:
        """Register (or register again) an envoy with its shard info; it counts as a heartbeat."""
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO envoys (name, shard, version, registered_at, last_seen) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET shard = excluded.shard, "
                "version = excluded.version, registered_at = excluded.registered_at, "
                "last_seen = excluded.last_seen",
                (name, shard_to_json(shard), version, now, now),
            )
        return Envoy(name, shard, version, now, now, online=True)

    def heartbeat(self, name: str) -> bool:
        """Note a heartbeat; False when the envoy is not registered (it must register again).

        Quiet: it moves only `last_seen`, which no follower shows; an envoy's going offline or
        coming back is the supervisor's to signal (`foedus.director.supervisor.Supervisor.observe`).
        """
        with self._transaction(quiet=True) as db:
            cursor = db.execute(
                "UPDATE envoys SET last_seen = ? WHERE name = ?", (self._clock(), name)
            )
            return cursor.rowcount == 1

    def envoy(self, name: str) -> Envoy | None:
        """The registered envoy of this name, or None."""
        row = self._query_one(
            "SELECT name, shard, version, registered_at, last_seen FROM envoys WHERE name = ?",
            (name,),
        )
        return None if row is None else self._envoy(row)

    def envoys(self) -> list[Envoy]:
        """Every registered envoy, by name."""
        rows = self._query_all(
            "SELECT name, shard, version, registered_at, last_seen FROM envoys ORDER BY name"
        )
        return [self._envoy(row) for row in rows]

    def is_online(self, last_seen: float) -> bool:
        """Whether an envoy last seen then is online now: a heartbeat within two periods."""
        return self._clock() - last_seen <= 2 * self.health_check_seconds

    # -- sites' reports -----------------------------------------------------------------------

    def report(
        self,
        experiment_id: str,
        site: str,
        state: CollaboratorState,
        *,
        exit_code: int = 0,
        reason: str = "",
    ) -> SiteReport:
        """Keep a site's report on its collaborator (the last one wins; the same twice is one)."""
        with self._transaction() as db:
            self._current_state(db, experiment_id)
            db.execute(
                "INSERT INTO site_reports (experiment_id, site, state, exit_code, reason, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (experiment_id, site) DO "
                "UPDATE SET state = excluded.state, exit_code = excluded.exit_code, "
                "reason = excluded.reason, updated_at = excluded.updated_at",
                (experiment_id, site, state.value, exit_code, reason, self._clock()),
            )
        return SiteReport(site, state, exit_code, reason, self._clock())

    def reports(self, experiment_id: str) -> dict[str, SiteReport]:
        """The last report of each site that reported on this experiment, by site."""
        rows = self._query_all(
            "SELECT site, state, exit_code, reason, updated_at FROM site_reports "
            "WHERE experiment_id = ? ORDER BY site",
            (experiment_id,),
        )
        return {
            row[0]: SiteReport(row[0], CollaboratorState(row[1]), row[2], row[3], row[4])
            for row in rows
        }

    # -- plumbing -----------------------------------------------------------------------------

    def _envoy(self, row: tuple[Any, ...]) -> Envoy:
        name, shard, version, registered_at, last_seen = row
        return Envoy(
            name=name,
            shard=shard_from_json(shard),
            version=version,
            registered_at=registered_at,
            last_seen=last_seen,
            online=self.is_online(last_seen),
        )

    @staticmethod
    def _current_state(db: sqlite3.Connection, experiment_id: str) -> ExperimentState:
        row = db.execute("SELECT state FROM experiments WHERE id = ?", (experiment_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no experiment {experiment_id!r}")
        return ExperimentState(row[0])


def _fair_order(waiting: Sequence[Experiment], held: Mapping[str, int]) -> list[Experiment]:
    """`waiting` (in submission order) in the queue's order, owners holding `held` places."""
    backlogs: dict[str, deque[Experiment]] = {}
    for experiment in waiting:
        backlogs.setdefault(experiment.owner, deque()).append(experiment)
    # One entry per owner with a backlog: (places they would hold, their first's sequence).
    turns = [
        (held.get(owner, 0), backlog[0].sequence, owner) for owner, backlog in backlogs.items()
    ]
    heapq.heapify(turns)
    order: list[Experiment] = []
    while turns:
        count, _, owner = heapq.heappop(turns)
        backlog = backlogs[owner]
        order.append(backlog.popleft())
        if backlog:
            heapq.heappush(turns, (count + 1, backlog[0].sequence, owner))
    return order


def _check_move(experiment_id: str, current: ExperimentState, to: ExperimentState) -> None:
    if to not in TRANSITIONS[current]:
        if current.final:
            detail = "it has ended"
        else:
            allowed = ", ".join(sorted(state.value for state in TRANSITIONS[current]))
            detail = f"from {current.value} it can become {allowed}"
        raise IllegalTransitionError(
            f"experiment {experiment_id!r} is {current.value} and cannot become {to.value}: {detail}"
        )
