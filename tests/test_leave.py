"""Collaborators that have left, without sockets: the close rule under each straggler policy,
rejoining, a stranded round, durability across a restart, status and the Prometheus gauges."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from foedus.aggregator.federation import Federation
from foedus.aggregator.inspection import read_status
from foedus.aggregator.liveness import Presence
from foedus.aggregator.metrics import Metrics
from foedus.aggregator.runtime import Outcome, Runtime
from foedus.aggregator.schema import SCHEMA_VERSION
from foedus.aggregator.storage import OutputFolder
from foedus.plans.schema import StragglerPolicy, StragglerSettings
from foedus.refusals.errors import InvalidRequestError

from clocks import Clock
from federations import (
    AMV,
    UUID,
    federation,
    federation_of,
    open_state,
    report,
    result,
    scores,
)
from old_states import before_departures, schema_of
from servers import make_plan

REASON = "the task runner failed (ValueError)"
POLICIES = {
    "wait_for_all": StragglerSettings(),
    "cutoff": StragglerSettings(StragglerPolicy.CUTOFF, cutoff_seconds=600),
    "percentage": StragglerSettings(StragglerPolicy.PERCENTAGE, percentage=1.0),
    "wait_for_all-offline_after": StragglerSettings(offline_after_seconds=600),
    "cutoff-offline_after": StragglerSettings(
        StragglerPolicy.CUTOFF, cutoff_seconds=600, offline_after_seconds=600
    ),
    "percentage-offline_after": StragglerSettings(
        StragglerPolicy.PERCENTAGE, percentage=1.0, offline_after_seconds=600
    ),
}


@pytest.mark.parametrize("policy", POLICIES.values(), ids=list(POLICIES))
def test_a_round_closes_once_everyone_who_has_not_left_has_reported(
    policy: StragglerSettings,
) -> None:
    """Under every policy, with or without offline_after: carol leaves, the round closes without
    her at once (no cut-off, no silence waited for); before she left, it waited for her."""
    fed = federation(straggler=policy)
    for name in ("alice", "bob", "carol"):
        fed.liveness.seen(name)  # all online: only leaving can let the round go without carol
    report(fed, "alice")
    report(fed, "bob")
    assert fed.close_round_if_due() is None
    assert fed.leave("carol", REASON)
    closed = fed.close_round_if_due()
    assert closed is not None
    assert (closed.reporters, closed.missing) == (("alice", "bob"), ("carol",))
    report(fed, "alice")  # the next round does not wait for her either
    assert fed.close_round_if_due() is None
    report(fed, "bob")
    assert fed.close_round_if_due() is not None


def test_a_collaborator_that_reported_and_then_left_still_counts() -> None:
    """Results it sent in the open round count when it had finished every task."""
    fed = federation()
    report(fed, "carol", value=4.0)
    assert fed.leave("carol", REASON)
    report(fed, "alice", value=1.0)
    report(fed, "bob", value=1.0)
    closed = fed.close_round_if_due()
    assert closed is not None and closed.reporters == ("alice", "bob", "carol")
    assert float(closed.model["w"][0, 0]) == pytest.approx(2.0)


def test_a_half_finished_collaborator_that_left_does_not_count() -> None:
    """Carol sent train but not her validation, then left: her train is not averaged."""
    fed = federation(tasks=(AMV, "train"))
    assert fed.submit(result("carol", 0, "train", value=9.0))
    assert fed.leave("carol", REASON)
    report(fed, "alice", value=1.0, metrics={"accuracy": 0.5})
    report(fed, "bob", value=3.0, metrics={"accuracy": 0.5})
    closed = fed.close_round_if_due()
    assert closed is not None and closed.missing == ("carol",)
    assert float(closed.model["w"][0, 0]) == pytest.approx(2.0)


def test_a_collaborator_that_calls_again_is_awaited_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Leaving and rejoining are each one WARNING line; after rejoining the round waits for it."""
    fed = federation()
    with caplog.at_level(logging.WARNING, logger="foedus.aggregator.federation"):
        assert fed.leave("carol", REASON)
        assert fed.liveness.presence("carol") is Presence.LEFT
        fed.rejoin("carol")
        fed.rejoin("carol")  # not left any more: nothing happens
    assert [record.getMessage() for record in caplog.records] == [
        f"carol has left: {REASON}; no round waits for it until it calls again",
        f"carol has rejoined (it had left: {REASON}); rounds wait for it again",
    ]
    assert fed.liveness.presence("carol") is not Presence.LEFT
    report(fed, "alice")
    report(fed, "bob")
    assert fed.close_round_if_due() is None
    report(fed, "carol")
    assert fed.close_round_if_due() is not None


def test_a_resend_changes_nothing_and_a_long_reason_is_refused() -> None:
    """The first reason stays; control characters are stripped; past 1,000 characters, refused."""
    fed = federation()
    with pytest.raises(InvalidRequestError, match="reason is 1001 characters long; at most 1000"):
        fed.leave("carol", "x" * 1001)
    assert fed.liveness.departures() == ()
    assert fed.leave("carol", "\x1b[1mgone\x00\n")
    assert not fed.leave("carol", "another reason")
    [departure] = fed.liveness.departures()
    assert (departure.name, departure.reason) == ("carol", "[1mgone")
    assert fed.leave("bob", "")
    assert fed.liveness.departures()[0].said == "no reason given"


def test_stranded_when_everyone_has_left_without_reporting() -> None:
    """Nobody left to report: the round can never close; one that rejoins makes it possible."""
    fed = federation()
    report(fed, "alice")
    assert fed.leave("alice", "a")  # she had reported: the round can still close with her
    assert fed.leave("bob", "b")
    assert fed.stranded() is None
    fed = federation()
    for name in ("alice", "bob", "carol"):
        assert fed.stranded() is None
        assert fed.leave(name, f"reason of {name}")
    stranded = fed.stranded()
    assert stranded is not None
    assert (stranded.round_number, stranded.needed, stranded.reporters) == (0, 1, ())
    assert [(d.name, d.reason) for d in stranded.departures] == [
        ("alice", "reason of alice"),
        ("bob", "reason of bob"),
        ("carol", "reason of carol"),
    ]
    assert fed.close_round_if_due() is None
    fed.rejoin("bob")
    assert fed.stranded() is None


def test_stranded_when_fewer_than_min_reports_can_come() -> None:
    """min_reports 2: with two of three left, only alice can report; one who reported counts."""
    policy = StragglerSettings(StragglerPolicy.CUTOFF, cutoff_seconds=1, min_reports=2)
    fed = federation(straggler=policy)
    assert fed.leave("bob", "b")
    assert fed.stranded() is None
    assert fed.leave("carol", "c")
    stranded = fed.stranded()
    assert stranded is not None and stranded.needed == 2
    fed = federation(straggler=policy)
    report(fed, "bob")
    assert fed.leave("bob", "b") and fed.leave("carol", "c")
    assert fed.stranded() is None
    report(fed, "alice")
    assert fed.close_round_if_due() is not None


def test_a_finished_federation_does_not_wait_for_a_left_collaborators_quit() -> None:
    """Everyone still there told to quit is everyone: the one that left will not come."""
    fed = federation(rounds=1)
    assert fed.leave("carol", REASON)
    report(fed, "alice")
    report(fed, "bob")
    assert fed.close_round_if_due() is not None and fed.finished
    assert fed.stranded() is None
    assert fed.assignment("alice").quit and not fed.everyone_told_to_quit()
    assert fed.assignment("bob").quit and fed.everyone_told_to_quit()


def test_leaving_and_rejoining_survive_a_restart(tmp_path: Path) -> None:
    """A departure is in the state before leave returns, and read back; so is the rejoin."""
    state = open_state(tmp_path)
    fed = federation_of(state)
    assert fed.leave("carol", REASON)
    state.close()  # what a kill -9 leaves: only what was committed
    state = open_state(tmp_path)
    [departure] = state.recovered.progress.departures
    assert (departure.name, departure.reason) == ("carol", REASON)
    fed = federation_of(state)
    assert fed.liveness.presence("carol") is Presence.LEFT
    report(fed, "alice", metrics=scores(1.0))
    report(fed, "bob", metrics=scores(1.0))
    assert fed.close_round_if_due() is not None
    fed.rejoin("carol")
    state.close()
    state = open_state(tmp_path)
    try:
        assert state.recovered.progress.departures == ()
        fed = federation_of(state)
        assert fed.liveness.presence("carol") is not Presence.LEFT
    finally:
        state.close()


def test_a_state_before_departures_is_migrated_and_resumes(tmp_path: Path) -> None:
    """A version-3 state (no departures table) opens as the newest version, and keeps departures."""
    state = open_state(tmp_path)
    report(federation_of(state), "alice", metrics=scores(1.0))
    state.close()
    before_departures(tmp_path / "state")
    assert schema_of(tmp_path)[0] == 3
    state = open_state(tmp_path)
    try:
        assert schema_of(tmp_path)[0] == SCHEMA_VERSION
        fed = federation_of(state)
        assert [a.collaborator for a in fed.accepted()] == ["alice", "alice"]
        assert fed.leave("bob", REASON)
    finally:
        state.close()
    state = open_state(tmp_path)
    try:
        assert [d.name for d in state.recovered.progress.departures] == ["bob"]
    finally:
        state.close()


def test_status_shows_who_left_and_why(tmp_path: Path) -> None:
    """`aggregator status` reads departures: presence left, since when, and the reason."""
    plan = make_plan(None, federation={"uuid": UUID}, aggregator={"output_dir": str(tmp_path)})
    state = open_state(tmp_path)
    try:
        fed = federation_of(state)
        assert fed.leave("carol", REASON)
        assert fed.leave("bob", "")
        state.save_presence(fed.liveness.snapshot())
        status = read_status(plan)
    finally:
        state.close()
    by_name = {c.name: c for c in status.collaborators}
    assert (by_name["carol"].presence, by_name["carol"].reason) == ("left", REASON)
    assert (by_name["bob"].presence, by_name["bob"].reason) == ("left", "")
    assert by_name["alice"].presence != "left" and by_name["alice"].reason is None
    lines = "\n".join(status.lines())
    assert "carol  left since " in lines and lines.count(f": {REASON}") == 1
    assert ": no reason given" in lines
    data = json.loads(json.dumps(status.to_json()))
    assert [(c["name"], c["presence"], c["reason"]) for c in data["collaborators"]] == [
        ("alice", by_name["alice"].presence, None),
        ("bob", "left", ""),
        ("carol", "left", REASON),
    ]


def test_prometheus_counts_who_left_with_the_reason() -> None:
    """foedus_collaborators_left counts them; foedus_collaborator_left names each, with why."""
    fed = federation()
    metrics = Metrics(
        round_number=lambda: 0,
        storage_free_bytes=lambda: 0.0,
        serving=lambda: True,
        collaborators_online=fed.online_count,
        collaborators_left=lambda: {d.name: d.said for d in fed.liveness.departures()},
    )
    fed.liveness.seen("carol")
    assert fed.online_count() == 1
    assert fed.leave("carol", REASON)
    text = generate_latest(metrics.registry).decode()
    assert "foedus_collaborators_left 1.0" in text
    assert f'foedus_collaborator_left{{collaborator="carol",reason="{REASON}"}} 1.0' in text
    assert "foedus_collaborators_online 0.0" in text
    fed.rejoin("carol")
    text = generate_latest(metrics.registry).decode()
    assert "foedus_collaborators_left 0.0" in text and 'collaborator="carol"' not in text


def test_the_runtime_gives_up_on_a_stranded_round_after_its_grace(tmp_path: Path) -> None:
    """Everyone left: the run ends by itself with one line naming the round and each reason."""
    plan = make_plan(None, federation={"rounds": 3})
    clock = Clock()
    fed = Federation.from_plan(plan, {"w": np.zeros(2)}, clock=clock)
    runtime = Runtime(plan, fed, OutputFolder(tmp_path), clock=clock, stranded_grace=30)
    for name in plan.collaborators:
        assert fed.leave(name, f"reason of {name}")
    stop = threading.Event()
    ended: list[Outcome] = []
    thread = threading.Thread(target=lambda: ended.append(runtime.run(stop)), daemon=True)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # within its grace (the test clock has not moved)
    clock.now += 30
    thread.join(10)
    stop.set()
    thread.join(10)
    [outcome] = ended
    assert outcome.stranded == (
        "round 1/3 can never close: every collaborator has left: alice left: reason of alice; "
        "bob left: reason of bob; carol left: reason of carol"
    )
    assert not outcome.finished
