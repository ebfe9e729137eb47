"""Collaborators that give up, with real processes and certificates: the federation goes on
without them under wait_for_all, also across a kill -9 of the aggregator; when all have left the
aggregator ends by itself (exit 1, one line); one started again by hand rejoins. Every wait is
bounded."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from foedus.pki.layout import CertsLayout

from failing_runner import FAIL_AT_ENV, HOLD_ENV, HOLD_FROM_ENV, NAME, PATIENT_RECORD
from federation_processes import FederationProcesses, write_plan
from test_offline import status

TESTS = Path(__file__).resolve().parent
ROUNDS = 3
LEFT = "the task runner failed (ValueError)"


def environment(**values: str) -> dict[str, str]:
    """The environment of a process of the test federation: the runner's folder on PYTHONPATH."""
    return {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **values}


def metrics_rows(folder: Path) -> list[dict[str, object]]:
    """The rows of the federation's metrics.jsonl."""
    lines = (folder / "output" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_a_collaborator_that_gave_up_is_not_waited_for_also_after_a_kill_9(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """wait_for_all: carol's runner raises in round 2 (index 1); she leaves and exits 1. The
    aggregator is killed (-9) after her Leave and started again: it still does not wait for her,
    and the federation ends with alice and bob. Her exception text stays at her site."""
    plan = write_plan(tmp_path, certs, ROUNDS, runner={"name": NAME})
    hold = tmp_path / "hold"  # alice and bob wait in their second training while it exists
    hold.touch()
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator", env=environment())
        for name in ("alice", "bob"):
            federation.start(name, env=environment(**{HOLD_ENV: str(hold)}))
        federation.start("carol", env=environment(**{FAIL_AT_ENV: "1"}))
        assert federation.wait("carol", 120) == 1
        federation.wait_for_log("aggregator", re.escape(f"carol has left: {LEFT}"), 30)
        federation.kill("aggregator")
        federation.start("aggregator", env=environment())
        federation.wait_for_output(
            "aggregator", re.escape(f"not waiting for carol (left: {LEFT})"), 60
        )
        hold.unlink()
        codes = federation.wait_all(180)
    finally:
        federation.stop_all()
    assert codes == {"aggregator": 0, "alice": 0, "bob": 0, "carol": 1}, federation.output()
    rows = metrics_rows(tmp_path)
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    assert rows[0]["reporters"] == ["alice", "bob", "carol"]
    assert all(row["missing"] == ["carol"] for row in rows[1:]), rows
    carol = (tmp_path / "carol.log").read_text(encoding="utf-8")
    assert f"told the aggregator this collaborator leaves: {LEFT}" in carol
    assert PATIENT_RECORD in carol  # the site's own log keeps everything
    aggregator = (tmp_path / "aggregator.log").read_text(encoding="utf-8")
    assert aggregator.count(f"carol has left: {LEFT}") == 1
    assert "radius_mean" not in aggregator + federation.output()


def test_when_every_collaborator_has_left_the_aggregator_ends_with_one_line(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """All three runners raise in round 2: the aggregator exits 1 by itself, its error line
    names the round and each collaborator with its reason; status shows them left."""
    plan = write_plan(tmp_path, certs, ROUNDS, runner={"name": NAME})
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator", env=environment())
        for name in ("alice", "bob", "carol"):
            federation.start(name, env=environment(**{FAIL_AT_ENV: "1"}))
        codes = federation.wait_all(180)
    finally:
        federation.stop_all()
    assert codes == {"aggregator": 1, "alice": 1, "bob": 1, "carol": 1}, federation.output()
    last = (tmp_path / "aggregator.log").read_text(encoding="utf-8").splitlines()[-1]
    left = "; ".join(f"{name} left: {LEFT}" for name in ("alice", "bob", "carol"))
    assert last == (
        f"aggregator: error: round 2/{ROUNDS} can never close: every collaborator has left: "
        f"{left}; the last model is in {tmp_path / 'output' / 'last_model.pbuf'}"
    )
    report = status(plan)
    collaborators = report["collaborators"]
    assert isinstance(collaborators, list)
    assert [(c["presence"], c["reason"]) for c in collaborators] == [("left", LEFT)] * 3


def test_a_collaborator_started_again_by_hand_rejoins_and_is_waited_for(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Carol gives up in round 2 and is started again: she rejoins, and round 2 waits for her
    although alice and bob have reported (she is held in her training until they have)."""
    plan = write_plan(tmp_path, certs, ROUNDS, runner={"name": NAME})
    held_pair, held_carol = tmp_path / "hold-alice-bob", tmp_path / "hold-carol"
    held_pair.touch()
    held_carol.touch()
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator", env=environment())
        for name in ("alice", "bob"):
            federation.start(name, env=environment(**{HOLD_ENV: str(held_pair)}))
        federation.start("carol", env=environment(**{FAIL_AT_ENV: "1"}))
        assert federation.wait("carol", 120) == 1
        federation.wait_for_log("aggregator", re.escape(f"carol has left: {LEFT}"), 30)
        hold_from_start = {HOLD_ENV: str(held_carol), HOLD_FROM_ENV: "0"}
        federation.start("carol", env=environment(**hold_from_start))
        federation.wait_for_log("aggregator", re.escape("carol has rejoined"), 120)
        held_pair.unlink()
        deadline = time.monotonic() + 120
        while (report := status(plan))["reported"] != ["alice", "bob"]:
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
        assert report["round"] == 1, report  # not closed without her
        held_carol.unlink()
        codes = federation.wait_all(180)
    finally:
        federation.stop_all()
    assert codes == {"aggregator": 0, "alice": 0, "bob": 0, "carol": 0}, federation.output()
    rows = metrics_rows(tmp_path)
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    assert all(row["reporters"] == ["alice", "bob", "carol"] for row in rows), rows
