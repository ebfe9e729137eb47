"""A secure federation of real processes whose aggregator is killed -9 in each stage of a round:
the same command goes on from its state to the same model (sites lost for good:
tests/test_secure_dropout_processes.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.storage import read_model
from foedus.pki.layout import CertsLayout

from federation_processes import (
    COLLABORATORS,
    PATIENT,
    RUN_TIMEOUT_SECONDS,
    FederationProcesses,
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
    plan = write_plan(tmp_path, certs, ROUNDS, secure_aggregation=SECURE, connection=PATIENT)
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
