"""Crashes of real processes: the aggregator killed (-9) at each point of a round, collaborators killed mid-task.

A collaborator killed (-9) and started again by hand also leaves the final model byte for byte
that of a run without faults: runners draw their randomness from the seed, the site and the
round, never from the process.

The aggregator dies at a failpoint (``FOEDUS_FAILPOINTS``, see `foedus.aggregator.failpoints`) or by
an outside SIGKILL, is started again with the same plan and no failpoint, and the federation must
finish with a final model byte for byte that of a run without faults. Collaborators retry while the
aggregator is away (a patient `connection` section). Every wait is bounded.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from foedus.pki.layout import CertsLayout

from dying_runner import NAME as DYING_RUNNER
from dying_runner import TRAIN, VALIDATION, arm
from federation_processes import (
    COLLABORATORS,
    PATIENT,
    FederationProcesses,
    child_python_path,
    run_federation,
    write_plan,
)

ROUNDS = 3
KILLED = -signal.SIGKILL
DEADLINE_SECONDS = 180  # a bound for a loaded machine; a quiet one needs seconds


@pytest.fixture(scope="module")
def reference(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The outputs of a run of the plan without faults (computed once for the module)."""
    run = run_federation(tmp_path_factory.mktemp("reference"), certs, ROUNDS, connection=PATIENT)
    assert set(run.exit_codes.values()) == {0}, run
    return {
        name: (run.output_dir / name).read_bytes()
        for name in ("last_model.pbuf", "best_model.pbuf", "metrics.jsonl")
    }


def start(
    folder: Path, certs: CertsLayout, failpoints: str | None = None, **sections: Any
) -> FederationProcesses:
    """The aggregator (armed with `failpoints`) and the three collaborators, started."""
    plan = write_plan(folder, certs, ROUNDS, connection=PATIENT, **sections)
    federation = FederationProcesses(plan, folder)
    environment = {"FOEDUS_FAILPOINTS": failpoints} if failpoints else {}
    federation.start("aggregator", env=environment)
    for name in COLLABORATORS:
        federation.start(name)
    return federation


def log(federation: FederationProcesses, name: str) -> str:
    """What a process wrote to stderr."""
    return (federation.folder / f"{name}.log").read_text(encoding="utf-8", errors="replace")


def metrics_rounds(folder: Path) -> list[int]:
    """The round of each row of metrics.jsonl, in order."""
    lines = (folder / "output" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["round"] for line in lines]


def learnt(metrics_jsonl: bytes) -> list[tuple[Any, ...]]:
    """What each round of metrics.jsonl says was learnt: its round, metrics and sites' metrics."""
    rows = [json.loads(line) for line in metrics_jsonl.decode("utf-8").splitlines()]
    return [(row["round"], row["metrics"], row["sites"]) for row in rows]


def restart_and_finish(federation: FederationProcesses) -> dict[str, int]:
    """Start the (dead) aggregator again without failpoints and wait for every process."""
    federation.start("aggregator")
    return federation.wait_all(DEADLINE_SECONDS)


@pytest.mark.parametrize(
    ("failpoints", "resumed"),
    [
        # Round 2 of 3, between results (9 per round): acknowledged or not, each counts once.
        ("after_accept:13", "round 2/3"),
        # Round 2's results read, the aggregate not computed.
        ("while_aggregating:2", "round 2/3"),
        # Round 2's new model file written, the round not committed.
        ("before_round_commit:2", "round 2/3"),
        # Round 2 committed, last_model.pbuf half written (saves: last, best, last).
        ("while_saving:3", "round 3/3"),
    ],
)
def test_aggregator_killed_at_a_failpoint_resumes_to_the_same_model(
    failpoints: str,
    resumed: str,
    reference: dict[str, bytes],
    certs: CertsLayout,
    tmp_path: Path,
) -> None:
    """Killed -9 at the failpoint and restarted, the aggregator finishes with the fault-free final and best model bytes."""
    federation = start(tmp_path, certs, failpoints)
    try:
        assert federation.wait("aggregator", DEADLINE_SECONDS) == KILLED
        point = failpoints.split(":", maxsplit=1)[0]
        assert f"failpoint {point} reached: SIGKILL" in log(federation, "aggregator")
        codes = restart_and_finish(federation)
    finally:
        federation.stop_all()
    assert codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), federation.output()
    output = tmp_path / "output"
    assert (output / "last_model.pbuf").read_bytes() == reference["last_model.pbuf"]
    assert (output / "best_model.pbuf").read_bytes() == reference["best_model.pbuf"]
    assert metrics_rounds(tmp_path) == [0, 1, 2, 3]  # one row per round, none twice
    stdout = federation.output()
    assert re.search(rf"saved state in .*: resuming {resumed} with \d+ results? kept", stdout), (
        stdout
    )
    if point == "after_accept":
        # The 13th result was durable but its OK never left: its collaborator sent it again.
        assert "answered OK, counted once" in log(federation, "aggregator")
    # Nothing a crash left behind stays: no temporary files, no results, the final model only.
    left = [path for path in (output / "state").rglob("*") if path.is_file()]
    assert sorted(str(path.relative_to(output)) for path in left if "sqlite" not in path.name) == [
        "state/models/round-3.pbuf"
    ]
    assert not list(output.glob(".*.tmp"))


def test_aggregator_killed_before_any_result_starts_again(
    reference: dict[str, bytes], certs: CertsLayout, tmp_path: Path
) -> None:
    """Killed -9 as soon as it serves, before any result, the restarted aggregator runs the same federation."""
    federation = start(tmp_path, certs)
    try:
        federation.wait_for_output("aggregator", "serving federation", DEADLINE_SECONDS)
        federation.kill("aggregator")
        codes = restart_and_finish(federation)
    finally:
        federation.stop_all()
    assert set(codes.values()) == {0}, federation.output()
    output = tmp_path / "output"
    assert (output / "last_model.pbuf").read_bytes() == reference["last_model.pbuf"]
    assert metrics_rounds(tmp_path) == [0, 1, 2, 3]


# Long enough local training (about 0.3 s per task) that a kill at the start of a round lands
# while alice works on it.
SLOW_TRAINING = {"name": "digits", "seed": 0, "settings": {"epochs": 600}}


def test_collaborator_killed_mid_task_and_restarted_rejoins(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """Alice killed -9 as round 2 starts and started again rejoins it; everyone reports every round."""
    federation = start(tmp_path, certs, runner=SLOW_TRAINING)
    try:
        federation.wait_for_output("aggregator", r"round 1/3 ", DEADLINE_SECONDS)
        federation.kill("alice")
        federation.start("alice")
        codes = federation.wait_all(DEADLINE_SECONDS)
    finally:
        federation.stop_all()
    assert codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), federation.output()
    stdout = federation.output()
    rounds = [line for line in stdout.splitlines() if "reported" in line]
    assert len(rounds) == ROUNDS + 1, stdout
    assert all("reported alice,bob,carol " in line for line in rounds), stdout


def test_collaborator_killed_for_good_is_left_behind_by_the_cutoff(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """Alice killed -9 as round 2 starts and never restarted: the cut-off closes the rounds and the federation finishes."""
    federation = start(
        tmp_path,
        certs,
        runner=SLOW_TRAINING,
        straggler={"policy": "cutoff", "cutoff_seconds": 2, "min_reports": 2},
        aggregator={"quit_grace_seconds": 2},
    )
    try:
        federation.wait_for_output("aggregator", r"round 1/3 ", DEADLINE_SECONDS)
        federation.kill("alice")
        codes = federation.wait_all(DEADLINE_SECONDS)
    finally:
        federation.stop_all()
    assert codes == {"aggregator": 0, "alice": KILLED, "bob": 0, "carol": 0}, federation.output()
    stdout = federation.output()
    assert "final validation  reported bob,carol (missing alice)" in stdout, stdout
    assert "federation finished: 3 rounds" in stdout, stdout


def test_collaborator_killed_thrice_and_restarted_by_hand_leaves_the_same_model(
    reference: dict[str, bytes], certs: CertsLayout, tmp_path: Path
) -> None:
    """Alice killed -9 after sending round 0's results, dying as she validates her round-1 model
    (its training sent), then dying mid-train in round 2, each time started again by hand: the
    final and best models are the fault-free run's, byte for byte, and so is every metric.

    Bob and carol start only after the first kill, so round 0 cannot close without alice and
    she is surely waiting in it; the other deaths are her runner's own SIGKILL (`dying_runner`,
    otherwise the digits runner)."""
    plan = write_plan(tmp_path, certs, ROUNDS, connection=PATIENT, runner={"name": DYING_RUNNER})
    federation = FederationProcesses(plan, tmp_path)
    environment = {"PYTHONPATH": child_python_path()}
    validating, training = tmp_path / "died-validating-round-1", tmp_path / "died-training-round-2"
    alice = {**environment, **arm((1, VALIDATION, validating), (2, TRAIN, training))}
    try:
        federation.start("aggregator", env=environment)
        federation.start("alice", env=alice)
        pattern = r"round 0: locally_tuned_model_validation on"
        federation.wait_for_log("alice", pattern, DEADLINE_SECONDS)
        federation.kill("alice")
        assert federation.wait("alice", 10) == KILLED  # killed while it waited on round 0
        federation.start("alice", env=alice)
        for name in ("bob", "carol"):
            federation.start(name, env=environment)
        for marker in (validating, training):
            assert federation.wait("alice", DEADLINE_SECONDS) == KILLED
            assert marker.exists()  # it died by its own hand, there
            federation.start("alice", env=alice)
        codes = federation.wait_all(DEADLINE_SECONDS)
    finally:
        federation.stop_all()
    assert codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), federation.output()
    alice_log = federation.log("alice")
    assert "round 2: train" in alice_log and "round 1: train" in alice_log
    assert "round 1: training again to validate the model sent before a restart" in alice_log
    stdout = federation.output()
    rounds = [line for line in stdout.splitlines() if "reported" in line]
    assert len(rounds) == ROUNDS + 1, stdout
    assert all("reported alice,bob,carol " in line for line in rounds), stdout
    output = tmp_path / "output"
    assert (output / "last_model.pbuf").read_bytes() == reference["last_model.pbuf"]
    assert (output / "best_model.pbuf").read_bytes() == reference["best_model.pbuf"]
    # Every site's metrics of every round too: alice trained and validated as she would have.
    assert learnt((output / "metrics.jsonl").read_bytes()) == learnt(reference["metrics.jsonl"])
