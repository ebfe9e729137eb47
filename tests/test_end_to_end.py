"""A real federation: an aggregator and three collaborator processes over mutual TLS on 127.0.0.1."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pki.layout import CertsLayout

REPO = Path(__file__).resolve().parent.parent
COLLABORATORS = ("alice", "bob", "carol")
RUN_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class FederationRun:
    """What one run left behind: exit codes, the aggregator's output and its output folder."""

    exit_codes: dict[str, int]
    aggregator_stdout: str
    output_dir: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_plan(folder: Path, certs: CertsLayout, rounds: int) -> Path:
    """A plan like plans/local.yaml, for `rounds` rounds, on a free port, writing into `folder`."""
    document = yaml.safe_load((REPO / "plans" / "local.yaml").read_text(encoding="utf-8"))
    document["federation"]["rounds"] = rounds
    document["aggregator"].update(
        port=free_port(), output_dir=str(folder / "output"), quit_grace_seconds=10
    )
    document["tls"] = {"certs_dir": str(certs.root)}
    document["connection"].update(backoff_initial_seconds=0.2, backoff_max_seconds=1)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def run_federation(folder: Path, certs: CertsLayout, rounds: int) -> FederationRun:
    """Start the aggregator and three collaborators as processes; wait for all, bounded in time."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = write_plan(folder, certs, rounds)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m"]
    with (folder / "aggregator.log").open("w") as log:
        processes = {
            "aggregator": subprocess.Popen(
                [*command, "aggregator", "start", "--plan", str(plan)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=environment,
            )
        }
    for name in COLLABORATORS:
        with (folder / f"{name}.log").open("w") as log:
            processes[name] = subprocess.Popen(
                [*command, "collaborator", "start", "-n", name, "--plan", str(plan)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=environment,
            )
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    try:
        stdout, _ = processes["aggregator"].communicate(timeout=RUN_TIMEOUT_SECONDS)
        codes = {"aggregator": processes["aggregator"].returncode}
        for name in COLLABORATORS:
            codes[name] = processes[name].wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    return FederationRun(codes, stdout, folder / "output")


def final_accuracy(stdout: str) -> float:
    """The accuracy on the aggregator's last line that mentions it."""
    lines = [line for line in stdout.splitlines() if "accuracy" in line]
    assert lines, stdout
    match = re.search(r"accuracy (\d+\.\d+)", lines[-1])
    assert match, lines[-1]
    return float(match.group(1))


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
