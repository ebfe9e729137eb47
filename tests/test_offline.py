"""A collaborator killed (-9) mid-federation: the round closes seconds after its death, not at the
straggler cut-off, and the collaborator started again takes part from a later round. Real
processes, real certificates; every wait bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from foedus.collaborator.digits import DigitsRunner
from foedus.pki.layout import CertsLayout
from foedus.plans.runners import Model, TrainOutcome

from federation_processes import COLLABORATORS, FederationProcesses, write_plan

TESTS = Path(__file__).resolve().parent
ROUNDS = 10
CUTOFF_SECONDS = 600
OFFLINE_AFTER_SECONDS = 3
TRAIN_PAUSE_SECONDS = 1.0  # each train task lasts this long, so the rounds outlast a restart
HOLD_ENV = "FOEDUS_TEST_HOLD"  # while the file it names exists, training waits (60 s at most)
HOLD_SECONDS = 60.0
KILLED = -signal.SIGKILL


def status(plan: Path) -> dict[str, object]:
    """`aggregator status --plan PLAN --json`, run as a command beside the aggregator."""
    done = subprocess.run(
        [sys.executable, "-m", "foedus.aggregator", "status", "--plan", str(plan), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def presence(report: dict[str, object], name: str) -> object:
    """A collaborator's presence in a status report."""
    collaborators = report["collaborators"]
    assert isinstance(collaborators, list)
    return next(c["presence"] for c in collaborators if c["name"] == name)


class PacedRunner(DigitsRunner):
    """The digits runner, whose training takes at least TRAIN_PAUSE_SECONDS, and waits while the
    test holds the federation (the file named by HOLD_ENV exists; heartbeats go on meanwhile)."""

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Pause (longer while held), then train as the digits runner does."""
        time.sleep(TRAIN_PAUSE_SECONDS)
        hold = Path(os.environ.get(HOLD_ENV, "/nonexistent"))
        deadline = time.monotonic() + HOLD_SECONDS
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return super().train(model, round_number)


def test_a_killed_collaborator_costs_seconds_and_takes_part_again_once_restarted(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Cut-off 600 s, offline after 3 s: bob is killed during round 2; that round closes without
    him within seconds, the federation goes on, and bob started again reports in a later round."""
    plan = write_plan(
        tmp_path,
        certs,
        ROUNDS,
        runner={"name": "test_offline:PacedRunner"},
        straggler={
            "policy": "cutoff",
            "cutoff_seconds": CUTOFF_SECONDS,
            "offline_after_seconds": OFFLINE_AFTER_SECONDS,
        },
        connection={"heartbeat_seconds": 1},
    )
    hold = tmp_path / "hold"
    environment = {
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        HOLD_ENV: str(hold),
    }
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator", env=environment)
        for name in COLLABORATORS:
            federation.start(name, env=environment)
        federation.wait_for_output("aggregator", rf"round 1/{ROUNDS}\s+reported", 120)
        federation.kill("bob")
        killed_at = time.monotonic()
        federation.wait_for_output("aggregator", r"\(missing bob\)", 60)
        noticed = time.monotonic() - killed_at
        # The aggregator saves the transition within a second or so; status reads it meanwhile.
        deadline = time.monotonic() + 20
        while presence(report := status(plan), "bob") != "offline":
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
        assert report["aggregator_running"] is True and report["finished"] is False
        assert presence(report, "alice") == "online"
        # alice and carol wait in their training until bob is back, so the federation cannot
        # finish before he rejoins however slowly he starts on a loaded machine.
        hold.touch()
        federation.start("bob", env=environment)
        deadline = time.monotonic() + 120
        while presence(report := status(plan), "bob") != "online":
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
        hold.unlink()
        codes = federation.wait_all(180)
    finally:
        federation.stop_all()
    assert codes == {"aggregator": 0, "alice": 0, "bob": 0, "carol": 0}, federation.output()
    assert noticed < 30, noticed  # seconds, not the 600 s cut-off

    rows = [
        json.loads(line)
        for line in (tmp_path / "output" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    missed = [row["round"] for row in rows if "bob" in row["missing"]]
    assert missed and all(rows[index]["seconds"] < 60 for index in missed), rows
    back = [row["round"] for row in rows if row["round"] > missed[-1]]
    assert back and all("bob" in rows[index]["reporters"] for index in back), rows
    assert all(not row["missing"] for row in rows if row["round"] < missed[0]), rows
    log = (tmp_path / "aggregator.log").read_text(encoding="utf-8")
    assert "bob is offline: not heard from in 3 s" in log
    assert "bob is back online" in log
    final = status(plan)
    assert final["finished"] is True and final["aggregator_running"] is False
