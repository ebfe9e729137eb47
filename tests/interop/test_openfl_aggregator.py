"""foedus's `collaborator start` against OpenFL 1.9's aggregator (`fx aggregator start`).

The OpenFL workspace is generated with our pki's certificates in its `cert/` layout; its initial
model `save/init.pbuf` is written by foedus (`foedus.aggregator.storage.write_model`: OpenFL's
`ModelProto` format). Our plan carries the ids OpenFL derives from its plan.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator.storage import read_model, write_model
from foedus.collaborator.digits import DigitsRunner
from foedus.pki.layout import CertsLayout
from foedus.plans import load_plan

from federation_processes import FederationProcesses, FederationRun, free_port, write_plan
from openfl_workspace import AGGREGATOR_HOST, Workspace, write_workspace

ROUNDS = 2
COLLABORATORS = ("alice", "bob")
MAX_TENSOR_BYTES = 2**20
LISTEN_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class OpenFLRun:
    """The federation under OpenFL's aggregator, and foedus's aggregator's 1-round model."""

    run: FederationRun
    workspace: Workspace
    folder: Path
    reference_model: Path


def wait_until_listening(port: int, alive: Callable[[], bool], timeout: float) -> None:
    """Poll until something accepts TCP connections on localhost:port (OpenFL binds [::])."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((AGGREGATOR_HOST, port), timeout=1):
                return
        except OSError:
            if not alive():
                raise AssertionError("the OpenFL aggregator exited before listening") from None
            time.sleep(0.2)
    raise AssertionError(f"the OpenFL aggregator did not listen on port {port} in {timeout} s")


@pytest.fixture(scope="module")
def openfl(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> OpenFLRun:
    """Two foedus collaborators, ROUNDS rounds under `fx aggregator start`, run to the end."""
    folder = tmp_path_factory.mktemp("openfl-aggregator")
    port = free_port()
    workspace = write_workspace(
        folder / "workspace", certs, port=port, rounds=ROUNDS, collaborators=COLLABORATORS
    )
    ids = workspace.ids()
    plan_path = write_plan(
        folder,
        certs,
        ROUNDS,
        federation={"uuid": ids.federation_uuid, "aggregator_id": ids.aggregator_uuid},
        aggregator={"port": port},
        collaborators=list(COLLABORATORS),
    )
    plan = load_plan(plan_path)
    write_model(workspace.root / "save" / "init.pbuf", DigitsRunner.initial_model(plan.runner))
    federation = FederationProcesses(plan_path, folder)
    try:
        aggregator = workspace.start_fx(folder / "aggregator.fx.log", "aggregator", "start")
        federation.processes["aggregator"] = aggregator
        wait_until_listening(port, lambda: aggregator.poll() is None, LISTEN_TIMEOUT_SECONDS)
        for name in COLLABORATORS:
            federation.start(name)
        codes = federation.wait_all(timeout=150)
    finally:
        federation.stop_all()
    log = (folder / "aggregator.fx.log").read_text(encoding="utf-8", errors="replace")
    reference = foedus_one_round(certs, tmp_path_factory.mktemp("foedus-one-round"))
    return OpenFLRun(
        FederationRun(codes, log, workspace.root / "save"), workspace, folder, reference
    )


def foedus_one_round(certs: CertsLayout, folder: Path) -> Path:
    """foedus's aggregator, the same collaborators, one round: its model file."""
    plan = write_plan(folder, certs, 1, collaborators=list(COLLABORATORS))
    federation = FederationProcesses(plan, folder)
    try:
        federation.start("aggregator")
        for name in COLLABORATORS:
            federation.start(name)
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    assert set(codes.values()) == {0}, codes
    return folder / "output" / "last_model.pbuf"


def test_federation_under_openfl_aggregator_completes(openfl: OpenFLRun) -> None:
    """`fx aggregator start` and both foedus collaborators exit 0."""
    assert openfl.run.exit_codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), (
        openfl.run.aggregator_stdout[-3000:]
    )


def test_openfl_aggregator_closes_every_round_with_foedus_results(openfl: OpenFLRun) -> None:
    """OpenFL's aggregator logs every round complete with both collaborators, then the end."""
    log = re.sub(r"\s+", " ", openfl.run.aggregator_stdout)
    for round_number in range(ROUNDS):
        done = re.findall(
            rf"Round {round_number}: Collaborators that have completed all tasks: \[([^\]]*)\]", log
        )
        assert done and set(re.findall(r"'(\w+)'", done[-1])) == set(COLLABORATORS), done
    assert "Experiment Completed" in log


def test_foedus_collaborators_worked_every_round_then_quit(openfl: OpenFLRun) -> None:
    """Each foedus collaborator ran the three tasks of every round and stopped on quit."""
    for name in COLLABORATORS:
        log = (openfl.folder / f"{name}.log").read_text(encoding="utf-8")
        assert f"ran {3 * ROUNDS} tasks in {ROUNDS} rounds" in log, log[-3000:]


def test_openfl_averages_foedus_updates_as_foedus_does(openfl: OpenFLRun) -> None:
    """OpenFL's model after round 0 (its last.pbuf lags a round) is foedus's 1-round model."""
    initial = read_model(openfl.workspace.root / "save" / "init.pbuf", MAX_TENSOR_BYTES)
    openfl_model = read_model(openfl.workspace.root / "save" / "last.pbuf", MAX_TENSOR_BYTES)
    reference = read_model(openfl.reference_model, MAX_TENSOR_BYTES)
    assert set(openfl_model) == set(reference) == set(initial)
    for name, array in openfl_model.items():
        assert array.dtype == np.float32
        assert not np.array_equal(array, initial[name]), f"{name} never changed"
        np.testing.assert_allclose(array, reference[name], rtol=0, atol=1e-6, err_msg=name)
