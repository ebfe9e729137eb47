"""The director's service without a socket: the liveness rule and recovery after a restart."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from foedus.director import changes as changes_module
from foedus.director.changes import Changes, Follow
from foedus.director.folders import ExperimentFolders, ModelUpload
from foedus.director.identity import Caller, Role
from foedus.director.launcher import LocalLauncher
from foedus.director.records import ExperimentState, ShardInfo
from foedus.director.service import DirectorService
from foedus.director.state import DirectorState
from foedus.lifecycle.orders import CollaboratorReport
from foedus.lifecycle.states import CollaboratorState
from foedus.pki.layout import CertsLayout
from foedus.plans.director_config import load_config
from foedus.processes.children import Ended
from foedus.refusals.errors import InvalidRequestError, NotFoundError

from clocks import Clock
from directors import ENVOYS, RecordingLauncher, submitted_plan, write_config

ADA = Caller("ada", Role.USER)


class Harness:
    """A service over a real state folder, a hand-moved clock and a recording launcher."""

    def __init__(self, folder: Path, launcher: Any = None, **config: Any) -> None:
        self.folder = folder
        self.clock = Clock(1_000_000.0)
        self.launcher = RecordingLauncher() if launcher is None else launcher
        self.config = load_config(write_config(folder, CertsLayout(folder / "certs"), **config))
        self.state = DirectorState.open(
            self.config.state_dir, health_check_seconds=1, clock=self.clock
        )
        self.service = DirectorService(self.config, self.state, self.launcher, clock=self.clock)

    def heartbeat_all(self, *names: str) -> None:
        for name in names:
            self.service.envoy_desk.heartbeat(Caller(name, Role.ENVOY), [])

    def running_experiment(self, **sections: Any) -> str:
        """An experiment on all three sites (its plan with `sections`), started and running."""
        for name in ENVOYS:
            self.service.envoy_desk.register(Caller(name, Role.ENVOY), ShardInfo(), "v")
        view = self.service.people.submit(ADA, yaml.safe_dump(submitted_plan(**sections)), "", None)
        experiment_id = view.experiment.experiment_id
        self.service.supervisor.supervise()
        for name in ENVOYS:
            self.service.envoy_desk.report(
                Caller(name, Role.ENVOY),
                CollaboratorReport(experiment_id, CollaboratorState.STARTED),
            )
        self.service.supervisor.supervise()
        assert self.state.experiment(experiment_id).state is ExperimentState.RUNNING
        return experiment_id


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Health period 1 s (offline after 2 s), grace 10 s."""
    made = Harness(tmp_path, liveness={"offline_grace_seconds": 10})
    yield made
    made.state.close()


def test_a_site_back_within_the_grace_period_goes_on(harness: Harness) -> None:
    """bob silent for 2 + 9.5 s, then back: the experiment keeps running."""
    experiment_id = harness.running_experiment()
    for _ in range(23):
        harness.clock.now += 0.5
        harness.heartbeat_all("alice", "carol")
        harness.service.supervisor.supervise()
    harness.heartbeat_all("bob")
    harness.service.supervisor.supervise()
    assert harness.state.experiment(experiment_id).state is ExperimentState.RUNNING


def test_a_site_gone_past_the_grace_period_fails_the_experiment(harness: Harness) -> None:
    """bob silent for more than 2 + 10 s: failed, the reason names bob; the aggregator stops."""
    experiment_id = harness.running_experiment()
    for _ in range(25):
        harness.clock.now += 0.5
        harness.heartbeat_all("alice", "carol")
        harness.service.supervisor.supervise()
    failed = harness.state.experiment(experiment_id)
    assert failed.state is ExperimentState.FAILED
    assert failed.reason == ("sites offline for more than 10 s: bob; 2 of 3 left, 3 needed")
    assert harness.launcher.stopped == [experiment_id]


def test_min_sites_lets_it_go_on_without_one_but_not_a_mandatory_one(tmp_path: Path) -> None:
    """min_sites 2: bob may go; carol is mandatory: her absence fails it, named as mandatory."""
    harness = Harness(
        tmp_path,
        liveness={"min_sites": 2, "mandatory_sites": ["carol"], "offline_grace_seconds": 1},
    )
    try:
        experiment_id = harness.running_experiment()
        for _ in range(10):
            harness.clock.now += 0.5
            harness.heartbeat_all("alice", "carol")
            harness.service.supervisor.supervise()
        assert harness.state.experiment(experiment_id).state is ExperimentState.RUNNING
        for _ in range(10):
            harness.clock.now += 0.5
            harness.heartbeat_all("alice")
            harness.service.supervisor.supervise()
        failed = harness.state.experiment(experiment_id)
        assert failed.state is ExperimentState.FAILED
        assert failed.reason.startswith(
            "sites offline for more than 1 s: bob, carol (mandatory: carol)"
        )
    finally:
        harness.state.close()


def test_a_plans_liveness_policy_is_the_experiments_own(harness: Harness) -> None:
    """Plan: min_sites 2, grace 1 s over the director's 10 s: bob may go, then carol fails it."""
    experiment_id = harness.running_experiment(
        liveness={"min_sites": 2, "offline_grace_seconds": 1}
    )
    for _ in range(10):
        harness.clock.now += 0.5
        harness.heartbeat_all("alice", "carol")
        harness.service.supervisor.supervise()
    assert harness.state.experiment(experiment_id).state is ExperimentState.RUNNING
    for _ in range(7):
        harness.clock.now += 0.5
        harness.heartbeat_all("alice")
        harness.service.supervisor.supervise()
    failed = harness.state.experiment(experiment_id)
    assert failed.state is ExperimentState.FAILED
    assert failed.reason == "sites offline for more than 1 s: bob, carol; 1 of 3 left, 2 needed"


def test_an_aggregator_stopped_before_its_last_round_is_started_again(harness: Harness) -> None:
    """Exit 0 with rounds left (it was stopped by a signal) is not completion: it starts again."""
    experiment_id = harness.running_experiment()
    harness.launcher.ends[experiment_id] = Ended(0)
    harness.service.supervisor.supervise()
    assert harness.state.experiment(experiment_id).state is ExperimentState.RUNNING
    assert [started for started, _ in harness.launcher.started] == [experiment_id] * 2


def test_restart_starts_again_an_aggregator_that_did_not_survive(tmp_path: Path) -> None:
    """A new service over the same state: the running experiment's aggregator is started again."""
    first = Harness(tmp_path)
    experiment_id = first.running_experiment()
    first.state.close()
    second = Harness(tmp_path)
    try:
        second.service.recover()
        assert [started for started, _ in second.launcher.started] == [experiment_id]
        assert second.state.experiment(experiment_id).state is ExperimentState.RUNNING
    finally:
        second.state.close()


def test_an_experiment_whose_runner_an_admin_no_longer_allows_fails_at_its_next_start(
    tmp_path: Path,
) -> None:
    """Accepted under the built-in runners, then director.yaml says `runners: []`: at its next
    start the experiment fails naming runner.name; no aggregator would import it."""
    first = Harness(tmp_path)
    experiment_id = first.running_experiment()
    first.state.close()
    second = Harness(tmp_path, runners=[])
    try:
        second.service.recover()
        assert second.launcher.started == []
        failed = second.state.experiment(experiment_id)
        assert failed.state is ExperimentState.FAILED
        assert failed.reason == (
            "runner.name: 'digits' is no longer in director.yaml runners (none), and the "
            "experiment has no initial model; submit it again with --initial-model FILE"
        )
    finally:
        second.state.close()


def test_restart_removes_folders_of_experiments_it_does_not_know(harness: Harness) -> None:
    """A folder left by a submission that was never stored is removed at recovery."""
    stray = harness.config.state_dir / "experiments" / "stray"
    stray.mkdir(parents=True)
    harness.service.recover()
    assert not stray.exists()


def test_restart_stops_an_aggregator_its_cancelled_experiment_outlived(tmp_path: Path) -> None:
    """Killed between storing 'cancelled' and stopping the aggregator: recovery stops it."""
    sleeper = LocalLauncher((sys.executable, "-c", "import time; time.sleep(600)"))
    first = Harness(tmp_path, launcher=sleeper)
    experiment_id = first.running_experiment()
    pid = first.state.experiment(experiment_id).aggregator_pid
    assert pid is not None
    first.state.transition(experiment_id, ExperimentState.CANCELLED, "cancelled by ada")
    first.state.close()  # the director "dies" here, its aggregator still running
    second = Harness(tmp_path, launcher=LocalLauncher())
    try:
        deadline = time.monotonic() + 60
        while not second.launcher.adopt(
            experiment_id, second.service.folders.folder(experiment_id), pid
        ):
            assert time.monotonic() < deadline, "the aggregator never ran its command"
            time.sleep(0.05)
        second.service.recover()
        assert second.state.experiment(experiment_id).aggregator_pid is None
        # Recovery returns once the process is not the aggregator any more (its command line
        # gone, as when it exits); its parent reaps it a moment later, under load later still.
        deadline = time.monotonic() + 10
        while sleeper.poll(experiment_id, first.service.folders.folder(experiment_id)) is None:
            assert time.monotonic() < deadline, "recovery left the aggregator running"
            time.sleep(0.05)
    finally:
        second.state.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        sleeper.stop(experiment_id, first.service.folders.folder(experiment_id), grace_seconds=1)


def test_a_gone_site_fails_only_the_experiments_it_is_in(harness: Harness) -> None:
    """bob never returns: his experiment fails naming him; carol's, beside it, goes on."""
    for name in ENVOYS:
        harness.service.envoy_desk.register(Caller(name, Role.ENVOY), ShardInfo(), "v")
    ids = []
    for sites in (["alice", "bob"], ["carol"]):
        plan = yaml.safe_dump(submitted_plan(collaborators=sites))
        ids.append(harness.service.people.submit(ADA, plan, "", None).experiment.experiment_id)
        harness.service.supervisor.supervise()
        for name in sites:
            harness.service.envoy_desk.report(
                Caller(name, Role.ENVOY), CollaboratorReport(ids[-1], CollaboratorState.STARTED)
            )
    for _ in range(30):
        harness.clock.now += 0.5
        harness.heartbeat_all("alice", "carol")
        harness.service.supervisor.supervise()
    first, second = (harness.state.experiment(i) for i in ids)
    assert (first.state, first.reason) == (
        ExperimentState.FAILED,
        "sites offline for more than 10 s: bob; 1 of 2 left, 2 needed",
    )
    assert second.state is ExperimentState.RUNNING
    assert harness.launcher.stopped == [ids[0]]


# -- sites that end for good ----------------------------------------------------------------------


def report(
    harness: Harness, site: str, experiment_id: str, state: CollaboratorState, why: str
) -> None:
    """`site`'s envoy reports its collaborator's `state`, exit code 1, with `why`."""
    harness.service.envoy_desk.report(
        Caller(site, Role.ENVOY), CollaboratorReport(experiment_id, state, 1, why)
    )


def test_a_site_given_up_goes_on_under_min_sites_and_fails_past_it(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """min_sites 2: bob given up, the experiment goes on (logged once); carol refused after
    it, it fails naming both with their reasons."""
    experiment_id = harness.running_experiment(liveness={"min_sites": 2})
    report(harness, "bob", experiment_id, CollaboratorState.GAVE_UP, "it died 4 times in a row")
    for _ in range(3):
        harness.clock.now += 0.5
        harness.heartbeat_all(*ENVOYS)
        harness.service.supervisor.supervise()
    assert harness.state.experiment(experiment_id).state is ExperimentState.RUNNING
    going_on = [r for r in caplog.records if "goes on without site bob" in r.getMessage()]
    assert [r.getMessage() for r in going_on] == [
        f"experiment {experiment_id} goes on without site bob: gave up: it died 4 times in a row"
    ]
    report(harness, "carol", experiment_id, CollaboratorState.SITE_REJECTED, "not today")
    harness.service.supervisor.supervise()
    failed = harness.state.experiment(experiment_id)
    assert (failed.state, failed.reason) == (
        ExperimentState.FAILED,
        "site bob gave up: it died 4 times in a row; site carol rejected by its operator: "
        "not today; 1 of 3 left, 2 needed",
    )
    assert harness.launcher.stopped == [experiment_id]


def test_a_site_given_up_fails_the_experiment_under_the_default_policy(
    harness: Harness,
) -> None:
    """Every site needed (the default): bob's collaborator given up fails it at once, naming
    bob and his last error line."""
    experiment_id = harness.running_experiment()
    why = "a bad plan or settings; the collaborator exited with code 2; its log ends: x"
    report(harness, "bob", experiment_id, CollaboratorState.GAVE_UP, why)
    harness.service.supervisor.supervise()
    failed = harness.state.experiment(experiment_id)
    assert (failed.state, failed.reason) == (
        ExperimentState.FAILED,
        f"site bob gave up: {why}; 2 of 3 left, 3 needed",
    )


def test_a_mandatory_site_lost_fails_and_lost_and_offline_count_together(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """min_sites 1, carol mandatory: bob refused and alice offline leave it running (each
    logged once, with why); carol's collaborator given up fails it, naming all three."""
    harness = Harness(
        tmp_path,
        liveness={"min_sites": 1, "mandatory_sites": ["carol"], "offline_grace_seconds": 1},
    )
    try:
        experiment_id = harness.running_experiment()
        report(harness, "bob", experiment_id, CollaboratorState.REFUSED, "runner not allowed")
        for _ in range(10):
            harness.clock.now += 0.5
            harness.heartbeat_all("bob", "carol")
            harness.service.supervisor.supervise()
        assert harness.state.experiment(experiment_id).state is ExperimentState.RUNNING
        going_on = [r.getMessage() for r in caplog.records if "goes on without" in r.getMessage()]
        assert sorted(going_on) == [
            f"experiment {experiment_id} goes on without site alice: offline for more than 1 s",
            f"experiment {experiment_id} goes on without site bob: refused: runner not allowed",
        ]
        report(harness, "carol", experiment_id, CollaboratorState.GAVE_UP, "stopped")
        harness.service.supervisor.supervise()
        failed = harness.state.experiment(experiment_id)
        assert (failed.state, failed.reason) == (
            ExperimentState.FAILED,
            "sites offline for more than 1 s: alice; site bob refused: runner not allowed; "
            "site carol gave up: stopped (mandatory: carol); 0 of 3 left, 1 needed",
        )
    finally:
        harness.state.close()


def test_a_site_refused_at_the_start_does_not_hold_the_others_waiting(harness: Harness) -> None:
    """min_sites 2: bob refuses; once alice and carol have started the experiment is running."""
    for name in ENVOYS:
        harness.service.envoy_desk.register(Caller(name, Role.ENVOY), ShardInfo(), "v")
    plan = yaml.safe_dump(submitted_plan(liveness={"min_sites": 2}))
    experiment_id = harness.service.people.submit(ADA, plan, "", None).experiment.experiment_id
    harness.service.supervisor.supervise()
    report(harness, "bob", experiment_id, CollaboratorState.REFUSED, "runner not allowed")
    report(harness, "alice", experiment_id, CollaboratorState.STARTED, "")
    harness.service.supervisor.supervise()
    assert harness.state.experiment(experiment_id).state is ExperimentState.WAITING
    report(harness, "carol", experiment_id, CollaboratorState.STARTED, "")
    harness.service.supervisor.supervise()
    assert harness.state.experiment(experiment_id).state is ExperimentState.RUNNING


# -- aggregator restarts in a row -----------------------------------------------------------------


def complete_rounds(harness: Harness, experiment_id: str, rounds: int) -> None:
    """The aggregator's metrics.jsonl with `rounds` training rounds."""
    output = harness.service.folders.folder(experiment_id) / "output"
    output.mkdir(parents=True, exist_ok=True)
    rows = [f'{{"round": {number}, "metrics": {{}}}}\n' for number in range(rounds)]
    (output / "metrics.jsonl").write_text("".join(rows), encoding="utf-8")


def kill_aggregator(harness: Harness, experiment_id: str) -> ExperimentState:
    """The aggregator killed by signal 9 and noticed; the experiment's state after."""
    harness.launcher.ends[experiment_id] = Ended(-9)
    harness.service.supervisor.supervise()
    return harness.state.experiment(experiment_id).state


def test_aggregator_restarts_are_counted_in_a_row_across_a_director_restart(
    tmp_path: Path,
) -> None:
    """Killed 3 times with a director restart in between: running; a 4th time with no round
    completed since the last restart: failed, '4 times in a row'."""
    first = Harness(tmp_path)
    experiment_id = first.running_experiment()
    complete_rounds(first, experiment_id, 1)
    assert [kill_aggregator(first, experiment_id) for _ in range(2)] == [
        ExperimentState.RUNNING
    ] * 2
    first.state.close()
    second = Harness(tmp_path)  # the same state folder: the director started again
    try:
        second.launcher.running.add(experiment_id)
        assert kill_aggregator(second, experiment_id) is ExperimentState.RUNNING
        assert kill_aggregator(second, experiment_id) is ExperimentState.FAILED
        assert second.state.experiment(experiment_id).reason == (
            "the aggregator was ended by signal 9, 4 times in a row"
        )
    finally:
        second.state.close()


def test_aggregator_restarts_reset_when_rounds_close_in_between(harness: Harness) -> None:
    """Killed 6 times, a round completed between each pair: it never fails."""
    experiment_id = harness.running_experiment()
    for kill in range(6):
        complete_rounds(harness, experiment_id, kill // 2 + 1)
        assert kill_aggregator(harness, experiment_id) is ExperimentState.RUNNING
    assert len(harness.launcher.started) == 7


def test_an_aggregator_that_fails_names_its_last_line_and_the_lost_sites(
    tmp_path: Path,
) -> None:
    """min_sites 1: bob and carol given up, alice still going; the aggregator ends with exit 1
    (every site has left): failed with its last log line and each lost site."""
    harness = Harness(tmp_path)
    try:
        experiment_id = harness.running_experiment(liveness={"min_sites": 1})
        for name in ("bob", "carol"):
            report(harness, name, experiment_id, CollaboratorState.GAVE_UP, "a bad plan")
        harness.service.supervisor.supervise()
        line = "aggregator: error: round 1/10 can never close: every collaborator has left"
        log = harness.service.folders.folder(experiment_id) / "aggregator.log"
        log.write_text(f"started\n{line}\n", encoding="utf-8")
        harness.launcher.ends[experiment_id] = Ended(1)
        harness.service.supervisor.supervise()
        failed = harness.state.experiment(experiment_id)
        assert (failed.state, failed.reason) == (
            ExperimentState.FAILED,
            f"the aggregator exited with code 1; its log ends: {line} (its log: experiment logs "
            f"{experiment_id}); site bob gave up: a bad plan; site carol gave up: a bad plan",
        )
    finally:
        harness.state.close()


def owners_running(harness: Harness) -> dict[str, int]:
    """How many places each owner holds now."""
    held: dict[str, int] = {}
    for experiment in harness.state.active():
        held[experiment.owner] = held.get(experiment.owner, 0) + 1
    return held


def test_a_users_backlog_does_not_hold_every_place(tmp_path: Path) -> None:
    """Two places, three people (a fair share of 1): ada's five then bea's one; bea's starts as
    soon as she submits, ahead of ada's backlog; ada never holds two; her next starts when her
    running one ends, and a place nobody else can take stays free."""
    harness = Harness(tmp_path, max_running_per_user=None)
    try:
        assert harness.config.max_running_per_user == 1
        for name in ENVOYS:
            harness.service.envoy_desk.register(Caller(name, Role.ENVOY), ShardInfo(), "v")
        plan = yaml.safe_dump(submitted_plan())
        ada = []
        for _ in range(5):
            ada.append(harness.service.people.submit(ADA, plan, "", None).experiment.experiment_id)
            harness.service.supervisor.supervise()
        assert [started for started, _ in harness.launcher.started] == [ada[0]]
        bea = harness.service.people.submit(Caller("bea", Role.USER), plan, "", None)
        assert bea.queue_position == 1  # ahead of ada's four waiting
        assert [harness.service.people.experiment(ADA, i).queue_position for i in ada] == [
            0,
            2,
            3,
            4,
            5,
        ]
        harness.service.supervisor.supervise()
        assert [s for s, _ in harness.launcher.started] == [ada[0], bea.experiment.experiment_id]
        assert [harness.service.people.experiment(ADA, i).queue_position for i in ada] == [
            0,
            1,
            2,
            3,
            4,
        ]
        harness.service.people.cancel(Caller("bea", Role.USER), bea.experiment.experiment_id)
        harness.service.supervisor.supervise()
        assert owners_running(harness) == {"ada": 1}  # the freed place stays free
        for step in range(1, 5):
            harness.service.people.cancel(ADA, ada[step - 1])
            harness.service.supervisor.supervise()
            assert owners_running(harness) == {"ada": 1}
            assert harness.launcher.started[-1][0] == ada[step]
    finally:
        harness.state.close()


def test_an_explicit_per_user_limit_is_kept(tmp_path: Path) -> None:
    """Four places, max_running_per_user 2: ada's first two and bea's one start, ada's third
    waits (first in the queue) while a place stays free."""
    harness = Harness(tmp_path, max_running_experiments=4, max_running_per_user=2)
    try:
        for name in ENVOYS:
            harness.service.envoy_desk.register(Caller(name, Role.ENVOY), ShardInfo(), "v")
        plan = yaml.safe_dump(submitted_plan())
        ada = [harness.service.people.submit(ADA, plan, "", None) for _ in range(3)]
        bea = harness.service.people.submit(Caller("bea", Role.USER), plan, "", None)
        harness.service.supervisor.supervise()
        assert [s for s, _ in harness.launcher.started] == [
            ada[0].experiment.experiment_id,
            bea.experiment.experiment_id,
            ada[1].experiment.experiment_id,
        ]
        assert owners_running(harness) == {"ada": 2, "bea": 1}
        third = harness.service.people.experiment(ADA, ada[2].experiment.experiment_id)
        assert (third.experiment.state, third.queue_position) == (ExperimentState.APPROVED, 1)
    finally:
        harness.state.close()


# -- what followed streams wait on ----------------------------------------------------------------


def waited_in_a_thread(changes: Changes, seen: int, follow: Follow, act: Any) -> list[bool]:
    """`changes.wait(seen, follow)` in a thread while `act()` runs here; what it returned."""
    returned: list[bool] = []
    waiter = threading.Thread(target=lambda: returned.append(changes.wait(seen, follow)))
    waiter.start()
    act()
    waiter.join(timeout=20)
    assert not waiter.is_alive(), "the waiter was not woken"
    return returned


def test_a_follower_wakes_at_the_next_change_and_ends_when_its_follow_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No recheck to fall back on: a change past the count seen wakes the waiter (True: look
    again); its call ending wakes it too (False: end the stream)."""
    monkeypatch.setattr(changes_module, "MAX_WAIT_SECONDS", 3600.0)
    changes, over = Changes(), threading.Event()
    follow = Follow(over=over.is_set, time_left=lambda: 3600.0)
    seen = changes.count
    changes.signal()  # a change while the follower read: it does not wait at all
    assert changes.wait(seen, follow) is True
    assert waited_in_a_thread(changes, changes.count, follow, changes.signal) == [True]

    def end_the_call() -> None:
        over.set()
        changes.wake()

    assert waited_in_a_thread(changes, changes.count, follow, end_the_call) == [False]


def test_every_write_of_the_state_but_a_heartbeat_signals_a_change(harness: Harness) -> None:
    """A registration and a submission each signal; a heartbeat (no follower shows its time)
    and a refused write do not."""
    changes = harness.state.changes
    seen = changes.count
    harness.service.envoy_desk.register(Caller("alice", Role.ENVOY), ShardInfo(), "v")
    assert changes.count == seen + 1
    harness.heartbeat_all("alice")
    assert changes.count == seen + 1
    with pytest.raises(NotFoundError):
        harness.state.transition("no-such-experiment", ExperimentState.CANCELLED)
    assert changes.count == seen + 1
    plan = yaml.safe_dump(submitted_plan(collaborators=["alice"]))
    harness.service.people.submit(ADA, plan, "", None)  # stored, then approved: two writes
    assert changes.count == seen + 3


def test_the_supervisor_signals_what_changes_outside_the_state(harness: Harness) -> None:
    """Nothing new: no signal; the aggregator's metrics grow, an envoy goes offline: one each."""
    experiment_id = harness.running_experiment()
    changes = harness.state.changes
    harness.service.supervisor.observe()
    seen = changes.count
    harness.service.supervisor.observe()
    assert changes.count == seen
    complete_rounds(harness, experiment_id, 1)
    harness.service.supervisor.observe()
    assert changes.count == seen + 1
    harness.clock.now += 10  # every envoy silent past two health periods: offline
    harness.service.supervisor.observe()
    assert changes.count == seen + 2


# -- the experiments' folders --------------------------------------------------------------------


def test_a_submitted_model_is_kept_only_when_every_declared_byte_arrived(tmp_path: Path) -> None:
    """Fewer bytes than declared: refused, nothing left in the folder (no temporary either); all
    of them: the model; a model asked for once its file is gone: NOT_FOUND's refusal."""
    folders = ExperimentFolders(tmp_path)
    folders.make("e")
    with pytest.raises(InvalidRequestError, match="says 5 bytes, but 3 arrived"):
        folders.receive_model("e", ModelUpload(5, [b"abc"]), limit=10)
    assert list(folders.folder("e").iterdir()) == []
    folders.receive_model("e", ModelUpload(3, [b"ab", b"c"]), limit=10)
    assert folders.initial_model("e").read_bytes() == b"abc"
    with pytest.raises(
        NotFoundError, match=r"the best model is gone \(the experiment was removed\)"
    ):
        folders.model("e", "best", 4)
