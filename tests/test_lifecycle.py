"""The lifecycle's wire form: every state, order and report to director.proto and back, unchanged."""

from __future__ import annotations

import pytest

from foedus.lifecycle.orders import CollaboratorReport, LogOrder, StartOrder, Work
from foedus.lifecycle.states import CollaboratorState
from foedus.lifecycle.wire import (
    collaborator_state_from_proto,
    collaborator_state_to_proto,
    report_from_proto,
    report_to_proto,
    work_from_proto,
    work_to_proto,
)
from foedus.protos import director_pb2 as pb


def test_every_state_has_its_own_wire_value_and_every_wire_value_its_state() -> None:
    """The table covers both enums whole: no state without a wire value, no value unread."""
    wire = {collaborator_state_to_proto(state) for state in CollaboratorState}
    assert len(wire) == len(CollaboratorState)
    assert wire == set(pb.CollaboratorState.values()) - {pb.COLLABORATOR_STATE_UNSPECIFIED}
    for state in CollaboratorState:
        assert collaborator_state_from_proto(collaborator_state_to_proto(state)) is state
        assert pb.CollaboratorState.Name(collaborator_state_to_proto(state)).endswith(state.name)


def test_no_state_is_unspecified_and_unspecified_is_no_state() -> None:
    """No report yet goes as UNSPECIFIED; UNSPECIFIED or a value this version lacks reads as None."""
    assert collaborator_state_to_proto(None) == pb.COLLABORATOR_STATE_UNSPECIFIED
    assert collaborator_state_from_proto(pb.COLLABORATOR_STATE_UNSPECIFIED) is None
    assert collaborator_state_from_proto(99) is None


@pytest.mark.parametrize("state", list(CollaboratorState))
def test_a_report_goes_and_comes_back_the_same(state: CollaboratorState) -> None:
    """A report read from its message is the report that was sent."""
    report = CollaboratorReport("exp-1", state, exit_code=-9, reason="killed ✝")
    assert report_from_proto(report_to_proto(report)) == report


def test_a_report_with_an_unknown_state_reads_as_none() -> None:
    """The receiving edge decides how to refuse it; conversion only says it is none of ours."""
    assert report_from_proto(pb.CollaboratorReport(experiment_id="exp-1", state=99)) is None
    assert report_from_proto(pb.CollaboratorReport(experiment_id="exp-1")) is None


def test_work_goes_and_comes_back_the_same() -> None:
    """Starts, stops and log requests keep their order and fields; the period goes with them."""
    work = Work(
        start=(
            StartOrder("exp-1", "digits", "ada", "rounds: 2\n", "alice"),
            StartOrder("exp-2", "mnist", "bea", "rounds: 3\n", "alice"),
        ),
        stop=("exp-0", "exp-3"),
        logs=(LogOrder("r1", "exp-1", 10, 4096), LogOrder("r2", "exp-2", 0, 1)),
    )
    message = work_to_proto(work, 2.5)
    assert (message.register_again, message.health_check_seconds) == (False, 2.5)
    assert work_from_proto(message) == work
    assert work_from_proto(work_to_proto(Work(), 1.0)) == Work()


def test_no_work_is_register_again() -> None:
    """None is the director's 'register again', and reads back as None with the period kept."""
    message = work_to_proto(None, 7.0)
    assert (message.register_again, message.health_check_seconds) == (True, 7.0)
    assert work_from_proto(message) is None
