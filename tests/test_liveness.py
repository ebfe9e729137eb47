"""Who is alive, without sockets: the presence rule, its snapshots and saves, and the early close."""

from __future__ import annotations

import logging

import pytest

from foedus.aggregator.liveness import (
    SAVE_SECONDS,
    TRANSITION_SAVE_SECONDS,
    Liveness,
    Presence,
    reporting_threshold,
)
from foedus.plans.schema import StragglerPolicy, StragglerSettings

from clocks import Clock
from federations import COLLABORATORS, federation, report

WALL = 1_700_000_000.0  # the wall clock when the test's Clock reads 1000


def liveness(clock: Clock, offline_after: float = 3.0) -> Liveness:
    """A Liveness of alice, bob and carol on the test clock, wall time WALL at its start."""
    return Liveness(
        COLLABORATORS, offline_after, clock=clock, wall=lambda: WALL + clock.now - 1000.0
    )


def test_a_collaborator_is_online_until_silent_longer_than_offline_after() -> None:
    """Seen, online for offline_after seconds; then offline; a call brings it back at once."""
    clock = Clock()
    live = liveness(clock)
    live.seen("alice")
    clock.now += 3
    assert live.presence("alice") is Presence.ONLINE
    clock.now += 0.01
    assert live.presence("alice") is Presence.OFFLINE
    live.seen("alice")
    assert live.presence("alice") is Presence.ONLINE


def test_never_heard_from_is_awaited_for_offline_after_from_the_start() -> None:
    """Before its first call a collaborator is 'not heard from', awaited; then offline."""
    clock = Clock()
    live = liveness(clock)
    assert {live.presence(name) for name in COLLABORATORS} == {Presence.UNSEEN}
    assert live.awaited() == set(COLLABORATORS) and live.online_count() == 0
    clock.now += 3.5
    live.seen("bob")
    assert live.awaited() == {"bob"} and live.online_count() == 1
    assert live.presence("alice") is Presence.OFFLINE


def test_a_call_in_progress_keeps_its_caller_online() -> None:
    """An upload or long poll that lasts longer than offline_after is not a silence."""
    clock = Clock()
    live = liveness(clock)
    with live.calling("carol"):
        clock.now += 100
        assert live.presence("carol") is Presence.ONLINE
        with live.calling("carol"):  # two at once, e.g. a poll beside an upload
            pass
        clock.now += 100
        assert live.presence("carol") is Presence.ONLINE
    clock.now += 2.9  # counted from the end of the call
    assert live.presence("carol") is Presence.ONLINE
    clock.now += 0.2
    assert live.presence("carol") is Presence.OFFLINE


def test_snapshot_gives_wall_times_of_each_presence() -> None:
    """Online since the first call after a silence; offline since the last call; unseen since start."""
    clock = Clock()
    live = liveness(clock)
    clock.now += 1
    live.seen("alice")
    clock.now += 2
    live.seen("alice")  # still online: since stays at the first call
    live.seen("bob")
    clock.now += 10
    live.seen("alice")  # back after a silence: online since now
    alice, bob, carol = live.snapshot()
    assert (alice.presence, alice.since, alice.last_seen) == (
        Presence.ONLINE,
        WALL + 13,
        WALL + 13,
    )
    assert (bob.presence, bob.since, bob.last_seen) == (Presence.OFFLINE, WALL + 3, WALL + 3)
    assert (carol.presence, carol.since, carol.last_seen) == (Presence.OFFLINE, WALL, None)


def test_poll_saves_on_transitions_and_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    """The first poll saves; calls alone save every SAVE_SECONDS; a transition within a second."""
    caplog.set_level(logging.INFO)
    clock = Clock()
    live = liveness(clock, offline_after=30)
    live.seen("alice")
    assert live.poll() is not None  # the first, whatever it says
    for _ in range(100):  # many calls, every poll in between: no save
        live.seen("alice")
        assert live.poll() is None
        clock.now += 0.05
    clock.now = 1000 + SAVE_SECONDS
    saved = live.poll()
    assert saved is not None and saved[0].presence is Presence.ONLINE
    assert live.poll() is None  # nothing new
    clock.now += 31  # everyone silent: a transition
    saved = live.poll()
    assert saved is not None and [seen.presence for seen in saved] == [Presence.OFFLINE] * 3
    live.seen("bob")  # back: a transition, saved once a second has passed since the last save
    clock.now += TRANSITION_SAVE_SECONDS / 2
    assert live.poll() is None
    clock.now += TRANSITION_SAVE_SECONDS
    saved = live.poll()
    assert saved is not None and saved[1].presence is Presence.ONLINE
    messages = [record.getMessage() for record in caplog.records]
    assert "alice is offline: not heard from in 30 s" in messages
    assert "bob is back online" in messages


def test_reporting_threshold_is_a_minute_or_three_heartbeats() -> None:
    """Without offline_after_seconds, status still judges by a silence of at least a minute."""
    assert reporting_threshold(10) == 60
    assert reporting_threshold(40) == 120


def test_offline_after_must_be_positive() -> None:
    """A silence of zero seconds makes no sense."""
    with pytest.raises(ValueError, match="offline_after"):
        Liveness(COLLABORATORS, 0)


# -- the close decision ---------------------------------------------------------------------------

CUTOFF = StragglerSettings(
    StragglerPolicy.CUTOFF, cutoff_seconds=600, min_reports=1, offline_after_seconds=3
)


def test_a_round_closes_seconds_after_a_death_not_at_the_cutoff() -> None:
    """Cut-off 600 s, offline after 3 s: carol dies, the round closes once she is 3 s silent."""
    clock = Clock()
    fed = federation(straggler=CUTOFF, clock=clock)
    for name in COLLABORATORS:
        fed.liveness.seen(name)
    fed.assignment("carol")  # takes her task, then dies
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
        report(fed, name)
    clock.now += 2
    for name in ("alice", "bob"):  # the living keep calling (long polls)
        fed.liveness.seen(name)
    assert fed.close_round_if_due() is None  # carol might still be training
    clock.now += 1.5
    summary = fed.close_round_if_due()
    assert summary is not None and summary.missing == ("carol",)
    assert summary.seconds == pytest.approx(3.5)
    assert fed.online_count() == 2


def test_one_that_comes_back_within_the_round_is_waited_for_again() -> None:
    """Carol is offline, then calls before the round closed: the round waits for her again."""
    clock = Clock()
    fed = federation(straggler=CUTOFF, clock=clock)
    report(fed, "alice")
    fed.liveness.seen("alice")
    clock.now += 2
    report(fed, "bob")
    fed.liveness.seen("bob")
    clock.now += 1.5  # carol, never heard from, is offline now
    fed.liveness.seen("carol")  # ... and calls just before the close
    assert fed.close_round_if_due() is None
    report(fed, "carol")
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == COLLABORATORS


def test_one_that_comes_back_after_the_close_takes_part_in_the_next_round() -> None:
    """After a close without carol she gets the next round's task, and that round waits for her."""
    clock = Clock()
    fed = federation(straggler=CUTOFF, clock=clock)
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
        report(fed, name)
    clock.now += 4
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
    closed = fed.close_round_if_due()
    assert closed is not None and closed.missing == ("carol",)
    fed.liveness.seen("carol")
    assert fed.assignment("carol").tasks == ("train",) and fed.round_number == 1
    for name in ("alice", "bob"):
        report(fed, name)
    assert fed.close_round_if_due() is None
    report(fed, "carol")
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == COLLABORATORS


def test_the_offline_rule_still_needs_min_reports() -> None:
    """Everyone but alice is offline; with min_reports 2 the round waits (for the cut-off)."""
    clock = Clock()
    straggler = StragglerSettings(
        StragglerPolicy.CUTOFF, cutoff_seconds=600, min_reports=2, offline_after_seconds=3
    )
    fed = federation(straggler=straggler, clock=clock)
    clock.now += 4
    fed.liveness.seen("alice")
    report(fed, "alice")
    assert fed.close_round_if_due() is None


def test_without_offline_after_nobody_is_given_up_on() -> None:
    """wait_for_all without offline_after_seconds: a silent collaborator is waited for."""
    clock = Clock()
    fed = federation(clock=clock)
    for name in ("alice", "bob"):
        fed.liveness.seen(name)
        report(fed, name)
    clock.now += 3600
    assert fed.close_round_if_due() is None
    assert fed.liveness.presence("carol") is Presence.OFFLINE  # as status reports it
