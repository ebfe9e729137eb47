"""What a secure round's record keeps and its `metrics.jsonl` row says: that it was aggregated
securely, each step's time, who dropped out in which step, and why a round closed untrained;
kept by the durable store across a restart. Plain Python over real sites (`secure_sites`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from test_secure_stages import DELTAS, delta_of, secure_federation

from foedus.aggregator.record_json import record_from_json, record_to_json
from foedus.aggregator.records import RoundRecord
from foedus.aggregator.runtime import Runtime
from foedus.aggregator.secure_record import Step, stage_records
from foedus.aggregator.storage import OutputFolder
from foedus.history.rows import MetricsRow, StageRecord
from foedus.pki.layout import CertsLayout
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION

from clocks import Clock
from federations import COLLABORATORS, UUID, federation, open_state, report, result
from secure_sites import SETTINGS, Sites
from servers import make_plan


def metrics_row(record: RoundRecord, folder: Path) -> MetricsRow:
    """The row the aggregator writes for `record`, as a reader reads it back."""
    plan = dataclasses.replace(make_plan(None), secure_aggregation=SETTINGS)
    runtime = Runtime(plan, federation(), OutputFolder(folder))
    return MetricsRow.parse(runtime.metrics_row(record).to_json())


def test_a_secure_rounds_record_has_each_steps_time_and_who_dropped_out(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """carol shares her keys, then dies before her upload: UPLOAD drops her; each step's time
    is from the end of the step before (KEYS: from the round's first hand-out); the record
    reads back from the state and its row."""
    clock = Clock()
    state = open_state(tmp_path / "state")
    try:
        fed = secure_federation(
            state, clock=clock, tasks=(AGGREGATED_MODEL_VALIDATION, "train"), rounds=1
        )
        sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
        clock.now += 30  # the collaborators start: KEYS counts from the first hand-out
        assert fed.assignment("alice").tasks
        clock.now += 2
        sites.keys()
        clock.now += 3
        sites.shares()
        fed.leave("carol", "its disk died")
        for name in ("alice", "bob"):
            sites.upload(name, delta_of(name), DELTAS[name][1])
            assert fed.submit(result(name, 0, AGGREGATED_MODEL_VALIDATION, metrics={"accuracy": 1}))
        clock.now += 10
        assert fed.close_round_if_due() is None  # decided: the survivors confirm
        clock.now += 1
        sites.confirm(("alice", "bob"))
        clock.now += 0.5
        sites.reveal(("alice", "bob"))
        summary = fed.close_round_if_due()
        assert summary is not None and summary.trained
        assert summary.secure and summary.untrained == ""
        assert summary.stages == (
            StageRecord("KEYS", 2.0),
            StageRecord("SHARES", 3.0),
            StageRecord("UPLOAD", 10.0, ("carol",)),
            StageRecord("SURVIVORS", 1.0),
            StageRecord("UNMASK", 0.5),
        )
        for name in ("alice", "bob"):
            report(fed, name, metrics={"accuracy": 1.0})  # validates only: nothing aggregated
        final = fed.close_round_if_due()
        assert final is not None and final.final_validation
        assert (final.secure, final.stages, final.untrained) == (False, (), "")
    finally:
        state.close()
    state = open_state(tmp_path / "state")
    try:
        assert state.recovered.records == (summary.record, final.record)
    finally:
        state.close()
    row = metrics_row(summary.record, tmp_path)
    assert row.secure and row.stages == summary.stages and row.untrained == ""
    assert row.missing == ("carol",)


def test_a_round_below_the_threshold_says_why_it_is_untrained(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Only alice posts keys, bob and carol leave: KEYS drops them and the record (and its row)
    says why the round closed untrained, the line the log has."""
    fed = secure_federation()
    Sites.of(fed, certs, COLLABORATORS, uuid=UUID).keys(["alice"])
    fed.leave("bob", "gone")
    fed.leave("carol", "gone")
    summary = fed.close_round_if_due()
    assert summary is not None and not summary.trained and summary.secure
    assert summary.stages == (StageRecord("KEYS", 0.0, ("bob", "carol")),)
    why = (
        "round 0's KEYS stage closed with 1 site(s) (alice), fewer than the threshold of 2 "
        "(secure_aggregation.threshold)"
    )
    assert summary.untrained == why
    assert metrics_row(summary.record, tmp_path).untrained == why


def test_too_few_survivors_are_recorded_as_dropped_in_the_upload(certs: CertsLayout) -> None:
    """alice alone uploads: UPLOAD drops bob and carol, and no stage after it is recorded."""
    fed = secure_federation()
    sites = Sites.of(fed, certs, COLLABORATORS, uuid=UUID)
    sites.keys()
    sites.shares()
    sites.upload("alice", delta_of("alice"), DELTAS["alice"][1])
    fed.leave("bob", "gone")
    fed.leave("carol", "gone")
    summary = fed.close_round_if_due()
    assert summary is not None and not summary.trained
    assert [(s.stage, s.dropped) for s in summary.stages] == [
        ("KEYS", ()),
        ("SHARES", ()),
        ("UPLOAD", ("bob", "carol")),
    ]
    assert summary.untrained.startswith("round 0 has 1 survivor(s) (alice), fewer than")


def test_a_plain_round_is_not_secure(tmp_path: Path) -> None:
    """A plain federation's round: not secure, no steps, and so is its row."""
    fed = federation(rounds=2)
    for name in COLLABORATORS:
        report(fed, name)
    summary = fed.close_round_if_due()
    assert summary is not None and summary.trained
    assert (summary.secure, summary.stages, summary.untrained) == (False, (), "")
    row = metrics_row(summary.record, tmp_path)
    assert (row.secure, row.stages, row.untrained) == (False, (), "")


def test_a_step_that_ended_before_a_restart_has_no_time() -> None:
    """`stage_records`: a time only where both ends were seen; dropped against the step before."""
    steps = [
        Step("KEYS", ("alice", "bob", "carol"), 10.0, None),  # closed before the restart
        Step("SHARES", ("alice", "bob"), 50.0, 52.25),  # in progress at the restart
        Step("UPLOAD", ("bob",), 52.25, 60.0),
    ]
    assert stage_records(("alice", "bob", "carol", "dave"), steps) == (
        StageRecord("KEYS", None, ("dave",)),
        StageRecord("SHARES", 2.25, ("carol",)),
        StageRecord("UPLOAD", 7.75, ("alice",)),
    )


def test_records_of_older_aggregators_read_back_as_plain_rounds() -> None:
    """A state's record written before secure steps were kept: not secure, no steps."""
    record = RoundRecord(0, False, ("alice",), (), {}, 1.5, True)
    written = record_to_json(record)
    old = written.replace(', "secure": false', "").replace(', "stages": []', "")
    old = old.replace(', "untrained": ""', "")
    assert "secure" not in old and "stages" not in old and "untrained" not in old
    assert record_from_json(old) == record
    secure = dataclasses.replace(
        record, secure=True, stages=(StageRecord("KEYS", None, ("bob",)),), untrained="why"
    )
    assert record_from_json(record_to_json(secure)) == secure
