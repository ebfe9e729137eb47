"""A secure federation of real processes whose aggregator is killed -9 in each stage of a round,
or loses a site for good: the same command goes on from its state to the same model, and the
round closes with the survivors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.storage import read_model
from foedus.pki.layout import CertsLayout

from dying_runner import NAME as DYING_RUNNER
from dying_runner import TRAIN, arm
from federation_processes import (
    COLLABORATORS,
    RUN_TIMEOUT_SECONDS,
    FederationProcesses,
    child_python_path,
    run_federation,
    write_plan,
)

ROUNDS = 2
SECURE = {"enabled": True, "threshold": 2, "clip": 1.0, "bits": 32, "max_weight": 2048}
MODEL_BYTES = 2**20
KILLED = -9


def final_model(output: Path) -> dict[str, bytes]:
    """The bytes of each tensor of the model a run left in `output`."""
    model = read_model(output / "last_model.pbuf", MODEL_BYTES)
    return {name: np.asarray(array).tobytes() for name, array in model.items()}


@pytest.fixture(scope="module")
def undisturbed(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The final model of a secure run nobody disturbed."""
    run = run_federation(
        tmp_path_factory.mktemp("undisturbed"), certs, ROUNDS, secure_aggregation=SECURE
    )
    assert set(run.exit_codes.values()) == {0}, run
    return final_model(run.output_dir)


@pytest.mark.parametrize("stage", ["KEYS", "SHARES", "SURVIVORS", "UNMASK"])
def test_the_aggregator_killed_in_a_stage_goes_on_byte_for_byte(
    certs: CertsLayout, tmp_path: Path, undisturbed: dict[str, bytes], stage: str
) -> None:
    """kill -9 of the aggregator as soon as round 1's `stage` has closed (the kill lands there or
    a little later), the same command again: the sites post and fetch again what they must, and
    the final model is byte-identical to an undisturbed run's."""
    plan = write_plan(tmp_path, certs, ROUNDS, secure_aggregation=SECURE)
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator")
        for name in COLLABORATORS:
            federation.start(name)
        pattern = f"round 1's {stage} stage closed"
        federation.wait_for_log("aggregator", pattern, RUN_TIMEOUT_SECONDS)
        federation.kill("aggregator")
        federation.start("aggregator")
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    assert codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), federation.log("aggregator")
    assert "saved state in" in federation.output()  # the second start resumed (round 2 or later)
    assert final_model(tmp_path / "output") == undisturbed


def test_a_site_lost_after_shares_is_unmasked_away(certs: CertsLayout, tmp_path: Path) -> None:
    """carol's process dies for good while training round 1 (after SHARES, before her masked
    upload): round 1 closes with alice and bob, carol's masks removed with her key's shares."""
    plan = write_plan(
        tmp_path,
        certs,
        ROUNDS,
        secure_aggregation=SECURE,
        straggler={"offline_after_seconds": 3},
        connection={"heartbeat_seconds": 1},
        runner={"name": DYING_RUNNER},
    )
    federation = FederationProcesses(plan, tmp_path)
    environment = {"PYTHONPATH": child_python_path()}
    died = tmp_path / "carol-died-training-round-1"
    try:
        federation.start("aggregator", env=environment)
        for name in ("alice", "bob"):
            federation.start(name, env=environment)
        federation.start("carol", env={**environment, **arm((1, TRAIN, died))})
        survivors = ("aggregator", "alice", "bob")
        codes = {name: federation.wait(name, RUN_TIMEOUT_SECONDS) for name in survivors}
    finally:
        federation.stop_all()
    log = federation.log("aggregator")
    assert codes == dict.fromkeys(survivors, 0), log
    assert died.exists() and federation.wait("carol", 1) == KILLED
    assert "round 1's SHARES stage closed with alice, bob, carol" in log
    assert "round 1's UNMASK stage closed with alice, bob" in log
    output = federation.output()
    assert "round 2/2  reported alice,bob (missing carol)" in output
    assert "untrained" not in output
