"""An OpenFL collaborator whose plan sets a lossy compression pipeline, under a foedus aggregator.

alice is an unmodified OpenFL 1.9 collaborator (`fx collaborator start`) whose plan sets
`compression_pipeline: KCPipeline` and `use_delta_updates: true` (with `db_store_rounds: 0`, so
it asks for the whole model each round): every trained tensor reaches the aggregator as a k-means
coded delta. bob is `collaborator start`. The federation must finish every round with both, the
aggregator decoding alice's deltas and adding them back to the global model.
"""

from __future__ import annotations

import re

import pytest

from foedus.pki.layout import CertsLayout

from federation_processes import FederationProcesses, final_accuracy, free_port, write_plan
from openfl_workspace import write_workspace

ROUNDS = 3
NAMES = ("alice", "bob")  # alice is OpenFL's


def test_an_openfl_kc_pipeline_collaborator_finishes_a_federation(
    certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each round closes with alice's KCPipeline deltas decoded and bob's raw update, then both
    quit; the model still learns."""
    folder = tmp_path_factory.mktemp("openfl-kc")
    port = free_port()
    workspace = write_workspace(
        folder / "workspace",
        certs,
        port=port,
        rounds=ROUNDS,
        collaborators=NAMES,
        shards={"alice": "0/2"},
        collaborator_settings={"use_delta_updates": True, "db_store_rounds": 0},
        compression_pipeline="KCPipeline",
    )
    ids = workspace.ids()
    plan = write_plan(
        folder,
        certs,
        ROUNDS,
        federation={"uuid": ids.federation_uuid, "aggregator_id": ids.aggregator_uuid},
        aggregator={"port": port},
        collaborators=list(NAMES),
    )
    federation = FederationProcesses(plan, folder)
    try:
        federation.start("aggregator")
        federation.processes["alice"] = workspace.start_fx(
            folder / "alice.fx.log", "collaborator", "start", "-n", "alice"
        )
        federation.start("bob")
        codes = federation.wait_all(timeout=180)
    finally:
        federation.stop_all()
    stdout, log = federation.output(), federation.log("aggregator")
    alice = (folder / "alice.fx.log").read_text(encoding="utf-8", errors="replace")
    assert codes == dict.fromkeys(("aggregator", *NAMES), 0), (stdout, log[-3000:], alice[-3000:])
    closed = [line for line in stdout.splitlines() if line.startswith(("round ", "final valid"))]
    assert len(closed) == ROUNDS + 1, stdout
    assert all("reported alice,bob " in line for line in closed), closed
    decoded = re.findall(
        r"alice's train results of round (\d+): 2 tensor\(s\) in OpenFL's KCPipeline decoded, "
        r"2 of them deltas added back",
        log,
    )
    assert decoded == [str(round_number) for round_number in range(ROUNDS)], log[-3000:]
    assert "Received shutdown signal" in alice, alice[-3000:]
    assert final_accuracy(stdout) >= 0.85, stdout
