"""A real federation: an aggregator and three collaborator processes over mutual TLS on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from foedus.pki.layout import CertsLayout

from federation_processes import COLLABORATORS, FederationRun, final_accuracy, run_federation


@pytest.fixture(scope="module")
def first_run(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> FederationRun:
    """One 3-round federation, shared by the tests that read its results."""
    return run_federation(tmp_path_factory.mktemp("run-1"), certs, rounds=3)


def test_federation_completes_with_exit_codes_zero(first_run: FederationRun) -> None:
    """The aggregator and every collaborator exit 0 after the last round."""
    assert first_run.exit_codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), first_run


def test_federation_learns(first_run: FederationRun) -> None:
    """Three rounds of FedAvg over mTLS give a global model of at least 0.90 held-out accuracy."""
    assert final_accuracy(first_run.aggregator_stdout) >= 0.90, first_run.aggregator_stdout


def test_federation_writes_models_and_one_metrics_row_per_round(first_run: FederationRun) -> None:
    """The last and best models and one metrics row per round are in the output folder."""
    output = first_run.output_dir
    assert (output / "last_model.pbuf").stat().st_size > 0
    assert (output / "best_model.pbuf").stat().st_size > 0
    rows = (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) >= 3
    round_lines = [
        line for line in first_run.aggregator_stdout.splitlines() if line.startswith("round")
    ]
    assert len(round_lines) >= 3, first_run.aggregator_stdout


def test_same_plan_gives_byte_identical_final_model(
    first_run: FederationRun, certs: CertsLayout, tmp_path: Path
) -> None:
    """A second run of the same plan ends with a final model byte for byte the same."""
    second = run_federation(tmp_path / "run-2", certs, rounds=3)
    assert set(second.exit_codes.values()) == {0}, second
    first_model = (first_run.output_dir / "last_model.pbuf").read_bytes()
    assert (second.output_dir / "last_model.pbuf").read_bytes() == first_model
