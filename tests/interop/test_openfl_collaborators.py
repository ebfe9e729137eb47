"""Unmodified OpenFL collaborators (`fx collaborator start`) and a foedus one, one federation.

alice and bob are OpenFL 1.9 collaborator processes in a generated OpenFL workspace whose plan
points at our aggregator; carol is `collaborator start`. All three train the same digits model
on the same shards as an all-foedus federation does, so the final global model must be that
federation's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.storage import read_model
from foedus.pki.layout import CertsLayout

from federation_processes import (
    COLLABORATORS,
    FederationProcesses,
    FederationRun,
    final_accuracy,
    free_port,
    run_federation,
    write_plan,
)
from openfl_workspace import Workspace, write_workspace

ROUNDS = 3
OPENFL_COLLABORATORS = ("alice", "bob")  # carol is foedus's
MAX_TENSOR_BYTES = 2**20


@dataclass(frozen=True)
class MixedRun:
    """The mixed federation, and an all-foedus one of the same plan for reference."""

    mixed: FederationRun
    reference: FederationRun
    workspace: Workspace
    folder: Path


@pytest.fixture(scope="module")
def runs(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> MixedRun:
    """Run the mixed federation to the end, then the same plan with foedus collaborators only."""
    folder = tmp_path_factory.mktemp("openfl-collaborators")
    port = free_port()
    # Shards are "INDEX/COUNT" in plan order, as foedus's digits runner deals them out.
    workspace = write_workspace(
        folder / "workspace",
        certs,
        port=port,
        rounds=ROUNDS,
        collaborators=COLLABORATORS,
        shards={name: f"{COLLABORATORS.index(name)}/3" for name in OPENFL_COLLABORATORS},
    )
    ids = workspace.ids()
    plan = write_plan(
        folder,
        certs,
        ROUNDS,
        federation={"uuid": ids.federation_uuid, "aggregator_id": ids.aggregator_uuid},
        aggregator={"port": port},
    )
    federation = FederationProcesses(plan, folder)
    try:
        federation.start("aggregator")
        for name in OPENFL_COLLABORATORS:
            federation.processes[name] = workspace.start_fx(
                folder / f"{name}.fx.log", "collaborator", "start", "-n", name
            )
        federation.start("carol")
        codes = federation.wait_all(timeout=180)
    finally:
        federation.stop_all()
    mixed = FederationRun(codes, federation.output(), folder / "output")
    reference = run_federation(tmp_path_factory.mktemp("foedus-only"), certs, rounds=ROUNDS)
    return MixedRun(mixed, reference, workspace, folder)


def test_mixed_federation_completes(runs: MixedRun) -> None:
    """The aggregator, both OpenFL collaborators and the foedus one exit 0."""
    assert runs.mixed.exit_codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), (
        runs.mixed.aggregator_stdout
    )


def test_every_round_counts_openfl_and_foedus_collaborators(runs: MixedRun) -> None:
    """Each round, the final validation included, closes with all three reporting."""
    lines = [
        line
        for line in runs.mixed.aggregator_stdout.splitlines()
        if line.startswith(("round ", "final validation"))
    ]
    assert len(lines) == ROUNDS + 1, runs.mixed.aggregator_stdout
    assert all("reported alice,bob,carol " in line for line in lines), lines


def test_openfl_collaborators_ran_every_round_then_quit(runs: MixedRun) -> None:
    """Each OpenFL collaborator worked rounds 0 to ROUNDS and then obeyed quit."""
    for name in OPENFL_COLLABORATORS:
        log = (runs.folder / f"{name}.fx.log").read_text(encoding="utf-8", errors="replace")
        for round_number in range(ROUNDS + 1):
            assert f"Round: {round_number} Received Tasks" in log, log[-3000:]
        assert "Received shutdown signal" in log, log[-3000:]


def test_mixed_federation_learns_like_foedus_alone(runs: MixedRun) -> None:
    """The final model is the all-foedus run's (float32 rounding aside), accuracy at least 0.90."""
    assert final_accuracy(runs.mixed.aggregator_stdout) >= 0.90
    mixed = read_model(runs.mixed.output_dir / "last_model.pbuf", MAX_TENSOR_BYTES)
    reference = read_model(runs.reference.output_dir / "last_model.pbuf", MAX_TENSOR_BYTES)
    assert set(mixed) == set(reference)
    for name, array in mixed.items():
        # Two virtualenvs, two numpy builds: the same arithmetic may round differently.
        np.testing.assert_allclose(array, reference[name], rtol=0, atol=1e-5, err_msg=name)
