"""The director's durable state: its lifecycle table, queue, envoy registry, and kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from foedus.director.records import TRANSITIONS, ExperimentState, IllegalTransitionError, ShardInfo
from foedus.director.state import DirectorState
from foedus.lifecycle.states import CollaboratorState
from foedus.refusals.errors import NotFoundError, StorageError

from clocks import Clock

REPO = Path(__file__).resolve().parent.parent
S = ExperimentState


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock."""
    return Clock(1_000_000.0)


@pytest.fixture
def state(tmp_path: Path, clock: Clock) -> Iterator[DirectorState]:
    """A fresh state in its own folder, heartbeats every 10 s."""
    opened = DirectorState.open(tmp_path / "state", health_check_seconds=10, clock=clock)
    yield opened
    opened.close()


def add(state: DirectorState, owner: str = "ada", sites: tuple[str, ...] = ("alice", "bob")) -> str:
    """A new submitted experiment's id."""
    return state.add_experiment(
        owner=owner,
        name="digits",
        plan_yaml="federation: {}\n",
        sites=sites,
        rounds=3,
        has_initial_model=False,
    ).experiment_id


def move_to(state: DirectorState, experiment_id: str, target: ExperimentState) -> None:
    """Walk an experiment from submitted to `target` along the lifecycle."""
    path = {
        S.SUBMITTED: [],
        S.APPROVED: [S.APPROVED],
        S.REJECTED: [S.REJECTED],
        S.WAITING: [S.APPROVED, S.WAITING],
        S.RUNNING: [S.APPROVED, S.WAITING, S.RUNNING],
        S.COMPLETED: [S.APPROVED, S.WAITING, S.RUNNING, S.COMPLETED],
        S.FAILED: [S.APPROVED, S.WAITING, S.FAILED],
        S.CANCELLED: [S.CANCELLED],
    }[target]
    for step in path:
        if step is S.WAITING:
            state.begin(experiment_id, range(9000, 9010))
        else:
            state.transition(experiment_id, step)


def test_the_lifecycle_walks_from_submitted_to_completed(
    state: DirectorState, clock: Clock
) -> None:
    """Each step is stored; waiting stamps the start and takes a port, the end frees it."""
    experiment_id = add(state)
    assert state.experiment(experiment_id).state is S.SUBMITTED
    state.transition(experiment_id, S.APPROVED)
    clock.now += 5
    waiting = state.begin(experiment_id, range(9000, 9010))
    assert (waiting.state, waiting.port, waiting.started_at) == (S.WAITING, 9000, clock.now)
    state.transition(experiment_id, S.RUNNING)
    clock.now += 5
    done = state.transition(experiment_id, S.COMPLETED)
    assert (done.state, done.port, done.ended_at) == (S.COMPLETED, None, clock.now)


def test_failed_keeps_its_reason(state: DirectorState) -> None:
    """A failure says why, and the reason is stored with it."""
    experiment_id = add(state)
    move_to(state, experiment_id, S.RUNNING)
    state.transition(experiment_id, S.FAILED, "site bob offline for more than 60 s")
    failed = state.experiment(experiment_id)
    assert (failed.state, failed.reason) == (S.FAILED, "site bob offline for more than 60 s")


ILLEGAL = [
    (current, target)
    for current in S
    for target in S
    if target not in TRANSITIONS[current] and target is not S.SUBMITTED
]


@pytest.mark.parametrize(("current", "target"), ILLEGAL, ids=lambda s: s.value)
def test_every_move_the_table_does_not_allow_is_refused(
    state: DirectorState, current: ExperimentState, target: ExperimentState
) -> None:
    """Each pair outside TRANSITIONS raises IllegalTransitionError and changes nothing."""
    experiment_id = add(state)
    move_to(state, experiment_id, current)
    with pytest.raises(IllegalTransitionError, match=f"is {current.value} and cannot become"):
        if target is S.WAITING:
            state.begin(experiment_id, range(9000, 9010))
        else:
            state.transition(experiment_id, target)
    assert state.experiment(experiment_id).state is current


def test_the_table_has_every_state_and_final_states_lead_nowhere() -> None:
    """Every state is in the table; exactly the four ends are final."""
    assert set(TRANSITIONS) == set(S)
    assert {s for s in S if s.final} == {S.REJECTED, S.COMPLETED, S.FAILED, S.CANCELLED}


def test_unknown_experiment_is_not_found(state: DirectorState) -> None:
    """Reading, moving or reporting on an unknown id raises NotFoundError."""
    with pytest.raises(NotFoundError, match="no experiment 'nope'"):
        state.experiment("nope")
    with pytest.raises(NotFoundError):
        state.transition("nope", S.APPROVED)
    with pytest.raises(NotFoundError):
        state.report("nope", "alice", CollaboratorState.STARTED)
    with pytest.raises(NotFoundError):
        state.set_aggregator("nope", 12)


def test_ports_are_the_lowest_free_ones_and_a_full_range_is_refused(state: DirectorState) -> None:
    """Active experiments hold distinct ports; a freed port is used again; none left: refused."""
    first, second, third = add(state), add(state), add(state)
    for experiment_id in (first, second, third):
        state.transition(experiment_id, S.APPROVED)
    assert state.begin(first, range(9000, 9002)).port == 9000
    assert state.begin(second, range(9000, 9002)).port == 9001
    with pytest.raises(IllegalTransitionError, match="every aggregator port 9000-9001 is in use"):
        state.begin(third, range(9000, 9002))
    assert state.experiment(third).state is S.APPROVED
    state.transition(first, S.CANCELLED)
    assert state.begin(third, range(9000, 9002)).port == 9000


def test_the_queue_keeps_submission_order_within_max_running(state: DirectorState) -> None:
    """One owner's approved experiments start first-submitted first, up to the places left."""
    ids = [add(state) for _ in range(4)]
    for experiment_id in reversed(ids):  # approval order must not matter
        state.transition(experiment_id, S.APPROVED)
    assert [e.experiment_id for e in state.startable(2, 2)] == ids[:2]
    assert state.queue_position(ids[2]) == 3
    state.begin(ids[0], range(9000, 9010))
    assert [e.experiment_id for e in state.startable(2, 2)] == ids[1:2]
    state.begin(ids[1], range(9000, 9010))
    assert state.startable(2, 2) == []
    assert state.queue_position(ids[0]) == 0
    assert state.queue_position(ids[2]) == 1
    state.transition(ids[0], S.FAILED, "aggregator exited with 1")
    assert [e.experiment_id for e in state.startable(2, 2)] == ids[2:3]


def approved(state: DirectorState, *owners: str) -> list[str]:
    """One approved experiment per owner named, submitted in that order; their ids."""
    ids = [add(state, owner) for owner in owners]
    for experiment_id in ids:
        state.transition(experiment_id, S.APPROVED)
    return ids


def test_owners_take_turns_by_the_places_they_would_hold(state: DirectorState) -> None:
    """ada 3, bea 3, cy 1 in that order: one each first, then again; ada running 2 goes last."""
    a1, a2, a3, b1, b2, b3, c1 = approved(state, *["ada"] * 3, *["bea"] * 3, "cy")
    assert [e.experiment_id for e in state.queue()] == [a1, b1, c1, a2, b2, a3, b3]
    assert [state.queue_position(i) for i in (a1, b1, c1, a2, b2, a3, b3)] == [1, 2, 3, 4, 5, 6, 7]
    running = approved(state, "ada", "ada")
    for experiment_id in running:
        state.begin(experiment_id, range(9000, 9010))
    # ada holds 2: bea's and cy's first go ahead; at 2 places each, ties by submission.
    assert [e.experiment_id for e in state.queue()] == [b1, c1, b2, a1, b3, a2, a3]
    assert state.queue_position(a1) == 4


def test_a_backlog_does_not_starve_a_later_owner(state: DirectorState) -> None:
    """ada's 5 then bea's 1, two places, one each: bea's starts beside ada's first, not after
    ada's fifth; ada never holds two; a place freed by bea stays free while ada is at her limit."""
    ada = approved(state, *["ada"] * 5)
    (bea,) = approved(state, "bea")
    assert state.queue_position(bea) == 2
    assert [e.experiment_id for e in state.startable(2, 1)] == [ada[0], bea]
    state.begin(ada[0], range(9000, 9010))
    assert state.queue_position(bea) == 1
    assert [e.experiment_id for e in state.startable(2, 1)] == [bea]
    state.begin(bea, range(9000, 9010))
    assert state.startable(2, 1) == []
    assert [state.queue_position(i) for i in ada] == [0, 1, 2, 3, 4]
    state.transition(bea, S.CANCELLED)
    assert state.startable(2, 1) == []  # ada is at her limit: the place stays free
    state.transition(ada[0], S.FAILED, "aggregator exited with 1")
    assert [e.experiment_id for e in state.startable(2, 1)] == [ada[1]]


def test_an_owner_at_the_limit_is_passed_over_for_the_next(state: DirectorState) -> None:
    """Four places, two per owner: ada's first two and bea's one start; ada's third waits and the
    fourth place stays free."""
    ada = approved(state, *["ada"] * 3)
    (bea,) = approved(state, "bea")
    assert [e.experiment_id for e in state.startable(4, 2)] == [ada[0], bea, ada[1]]
    for experiment_id in (ada[0], ada[1]):
        state.begin(experiment_id, range(9000, 9010))
    assert [e.experiment_id for e in state.queue()] == [bea, ada[2]]
    assert [e.experiment_id for e in state.startable(4, 2)] == [bea]


def test_experiments_are_listed_by_owner_in_submission_order(state: DirectorState) -> None:
    """A user's list holds only theirs; the whole list holds all, oldest first."""
    mine = [add(state, "ada"), add(state, "ada")]
    theirs = add(state, "bob")
    assert [e.experiment_id for e in state.experiments("ada")] == mine
    assert [e.experiment_id for e in state.experiments()] == [*mine, theirs]


def test_only_an_ended_experiment_is_removed(state: DirectorState) -> None:
    """Remove refuses a live experiment and forgets an ended one with its reports."""
    experiment_id = add(state)
    move_to(state, experiment_id, S.RUNNING)
    state.report(experiment_id, "alice", CollaboratorState.RUNNING)
    with pytest.raises(IllegalTransitionError, match="only an experiment that has ended"):
        state.remove(experiment_id)
    state.transition(experiment_id, S.CANCELLED)
    state.remove(experiment_id)
    with pytest.raises(NotFoundError):
        state.experiment(experiment_id)
    assert state.reports(experiment_id) == {}


def test_online_is_recomputed_from_the_clock(state: DirectorState, clock: Clock) -> None:
    """Online within two health periods of the last heartbeat, offline after, online again on one."""
    shard = ShardInfo("digits, first third", 500, 100, {"country": "de"})
    envoy = state.register("alice", shard, "0.1.0")
    assert envoy.online and envoy.shard == shard
    clock.now += 20
    assert state.envoys()[0].online
    clock.now += 0.5
    assert not state.envoys()[0].online
    assert state.heartbeat("alice")
    found = state.envoy("alice")
    assert found is not None and found.online and found.last_seen == clock.now


def test_an_unknown_envoy_is_told_to_register(state: DirectorState) -> None:
    """A heartbeat from a name never registered answers False and stores nothing."""
    assert not state.heartbeat("mallory")
    assert state.envoy("mallory") is None and state.envoys() == []


def test_registering_again_replaces_the_shard(state: DirectorState) -> None:
    """A second registration keeps one envoy with the new shard info."""
    state.register("alice", ShardInfo("old"), "0.1.0")
    state.register("alice", ShardInfo("new", 10), "0.2.0")
    [envoy] = state.envoys()
    assert (envoy.shard.description, envoy.shard.train_samples, envoy.version) == (
        "new",
        10,
        "0.2.0",
    )


def test_site_reports_keep_the_last_and_repeat_harmlessly(state: DirectorState) -> None:
    """The same report twice is one; a later report replaces the earlier."""
    experiment_id = add(state)
    state.report(experiment_id, "alice", CollaboratorState.STARTED)
    state.report(experiment_id, "alice", CollaboratorState.STARTED)
    state.report(experiment_id, "bob", CollaboratorState.REFUSED, reason="runner not allowed")
    state.report(experiment_id, "alice", CollaboratorState.EXITED, exit_code=1)
    reports = state.reports(experiment_id)
    assert sorted(reports) == ["alice", "bob"]
    assert (reports["alice"].state, reports["alice"].exit_code) == (CollaboratorState.EXITED, 1)
    assert reports["bob"].reason == "runner not allowed"


def test_everything_survives_a_reopen(tmp_path: Path, clock: Clock) -> None:
    """Closed and opened again, the state holds the same experiments, envoys and reports."""
    folder = tmp_path / "state"
    state = DirectorState.open(folder, health_check_seconds=10, clock=clock)
    experiment_id = add(state)
    move_to(state, experiment_id, S.WAITING)
    state.set_aggregator(experiment_id, 4242)
    state.register("alice", ShardInfo("a"), "0.1.0")
    state.report(experiment_id, "alice", CollaboratorState.STARTED)
    before = state.experiment(experiment_id)
    state.close()
    again = DirectorState.open(folder, health_check_seconds=10, clock=clock)
    try:
        assert again.experiment(experiment_id) == before
        assert before.aggregator_pid == 4242 and before.port == 9000
        assert [e.name for e in again.envoys()] == ["alice"]
        assert again.reports(experiment_id)["alice"].state is CollaboratorState.STARTED
    finally:
        again.close()


def as_version_1(database: Path) -> None:
    """Turn a state back into what a director of schema 1 wrote (no restart counts)."""
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("DROP TABLE aggregator_restarts")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")


def test_a_version_1_state_is_migrated_and_counts_restarts_in_a_row(
    tmp_path: Path, clock: Clock
) -> None:
    """A state of schema 1 opens (migrated to 2) with its experiments; restarts are counted in
    a row, kept across a reopen, started again when rounds were completed in between."""
    folder = tmp_path / "state"
    state = DirectorState.open(folder, health_check_seconds=10, clock=clock)
    experiment_id = add(state)
    move_to(state, experiment_id, S.RUNNING)
    state.close()
    as_version_1(folder / "director.sqlite")
    state = DirectorState.open(folder, health_check_seconds=10, clock=clock)
    try:
        assert state.experiment(experiment_id).state is S.RUNNING
        assert [state.count_restart(experiment_id, 0) for _ in range(2)] == [1, 2]
    finally:
        state.close()
    with contextlib.closing(sqlite3.connect(folder / "director.sqlite")) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)
    state = DirectorState.open(folder, health_check_seconds=10, clock=clock)
    try:
        assert state.count_restart(experiment_id, 0) == 3
        assert state.count_restart(experiment_id, 2) == 1  # two rounds completed since
        assert state.count_restart(experiment_id, 1) == 2  # fewer read: no progress
        with pytest.raises(NotFoundError):
            state.count_restart("nope", 0)
        state.transition(experiment_id, S.FAILED, "x")
        state.remove(experiment_id)
    finally:
        state.close()


def test_a_state_of_a_newer_director_is_refused(tmp_path: Path, clock: Clock) -> None:
    """A schema version this director does not know: StorageError naming both versions."""
    folder = tmp_path / "state"
    DirectorState.open(folder, health_check_seconds=10, clock=clock).close()
    with contextlib.closing(sqlite3.connect(folder / "director.sqlite")) as db, db:
        db.execute("UPDATE meta SET value = '9' WHERE key = 'schema'")
    with pytest.raises(StorageError, match="state version 9, this director reads 2"):
        DirectorState.open(folder, health_check_seconds=10, clock=clock)


def test_a_second_director_on_the_same_folder_is_refused(state: DirectorState) -> None:
    """The folder is locked while a state has it open."""
    with pytest.raises(StorageError, match="another director is using this state folder"):
        DirectorState.open(state.folder, health_check_seconds=10)


def test_an_unusable_folder_is_a_storage_error(tmp_path: Path) -> None:
    """A state folder under a file cannot be made: StorageError naming it."""
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(StorageError, match="cannot use as the director's state folder"):
        DirectorState.open(blocker / "state", health_check_seconds=10)


WRITER = """
import sys
from pathlib import Path
from foedus.director.records import ExperimentState, ShardInfo
from foedus.director.state import DirectorState
state = DirectorState.open(Path(sys.argv[1]), health_check_seconds=10)
n = 0
while True:
    experiment = state.add_experiment(owner="ada", name=f"e{n}", plan_yaml="x: 1\\n" * 200,
                                      sites=["alice"], rounds=1, has_initial_model=False)
    state.transition(experiment.experiment_id, ExperimentState.APPROVED)
    state.register(f"site{n % 7}", ShardInfo("s", n), "v")
    print(experiment.experiment_id, flush=True)
    n += 1
"""


def test_kill_9_mid_write_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream: the state reopens intact with every acknowledged write."""
    folder = tmp_path / "state"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    assert process.stdout is not None
    acknowledged: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            acknowledged.append(line.strip())
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
    assert len(acknowledged) >= 40, "the writer did not get going"
    with sqlite3.connect(folder / "director.sqlite") as check:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    state = DirectorState.open(folder, health_check_seconds=10)
    try:
        stored = {e.experiment_id: e for e in state.experiments()}
        for experiment_id in acknowledged:
            assert stored[experiment_id].state is S.APPROVED
        # Writes after the last line read are there too, whole: each a submitted or approved one.
        assert {e.state for e in stored.values()} <= {S.SUBMITTED, S.APPROVED}
        assert len(state.envoys()) == 7
    finally:
        state.close()
