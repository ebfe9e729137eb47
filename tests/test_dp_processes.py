"""DP-FedAvg with real processes: the aggregator killed (-9) while aggregating and started again
finishes with the very model bytes of an undisturbed run (the noise comes from the secret in
its state), at the round its privacy budget allows, saying so on its first and last lines; with
adaptive clipping too, with the very same clips (the next round's kept with the round)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from foedus.pki.layout import CertsLayout
from foedus.privacy.accountant import epsilon_after

from federation_processes import (
    COLLABORATORS,
    PATIENT,
    FederationProcesses,
    run_module,
    write_plan,
)

PLAN_ROUNDS = 5
ROUNDS = 3  # what the cap below allows
NOISE = 1.0
# Between the epsilon of 3 rounds and of 4 at delta 1e-5: the budget allows 3 of the 5 rounds.
CAP = round((epsilon_after(3, NOISE, 1e-5) + epsilon_after(4, NOISE, 1e-5)) / 2, 3)
PRIVACY = {"enabled": True, "clip": 1.0, "noise_multiplier": NOISE, "max_epsilon": CAP}
SECRET = bytes(range(32))  # both runs draw their noise from the same secret
DEADLINE_SECONDS = 180  # a bound for a loaded machine; a quiet one needs seconds


# 2 x count_noise above the noise multiplier: the update keeps a noise multiplier of 1.15.
ADAPTIVE = {"adaptive_clipping": {"count_noise": 1.0, "learning_rate": 0.5}}


def run(
    folder: Path,
    certs: CertsLayout,
    failpoints: str | None = None,
    *,
    privacy: dict[str, Any] = PRIVACY,
) -> FederationProcesses:
    """A federation run to its end (its aggregator killed at `failpoints`, then started again),
    its state holding SECRET from the start."""
    plan = write_plan(folder, certs, PLAN_ROUNDS, connection=PATIENT, differential_privacy=privacy)
    state = folder / "output" / "state"
    state.mkdir(parents=True)
    (state / "privacy.secret").write_bytes(SECRET)
    federation = FederationProcesses(plan, folder)
    try:
        environment = {"FOEDUS_FAILPOINTS": failpoints} if failpoints else {}
        federation.start("aggregator", env=environment)
        for name in COLLABORATORS:
            federation.start(name)
        if failpoints:
            assert federation.wait("aggregator", DEADLINE_SECONDS) == -signal.SIGKILL
            federation.start("aggregator")
        codes = federation.wait_all(DEADLINE_SECONDS)
    finally:
        federation.stop_all()
    assert codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), federation.output()
    return federation


@pytest.mark.parametrize("adaptive", [{}, ADAPTIVE], ids=["fixed-clip", "adaptive-clipping"])
def test_a_killed_aggregator_resumes_to_the_undisturbed_model_at_its_budget(
    certs: CertsLayout, tmp_path: Path, adaptive: dict[str, Any]
) -> None:
    """Killed -9 while aggregating the second round (of 3 the budget allows) and started again, the
    aggregator ends with the undisturbed run's model bytes and rows; both say the cap, and so does
    `aggregator status`. With adaptive clipping the rows say each round's clip, the same in both
    runs, from the plan's 1.0 on, and status says the clip of the round after the last."""
    privacy = {**PRIVACY, **adaptive}
    undisturbed = run(tmp_path / "undisturbed", certs, privacy=privacy)
    killed = run(tmp_path / "killed", certs, "while_aggregating:2", privacy=privacy)
    output = {name: tmp_path / name / "output" for name in ("undisturbed", "killed")}
    model = {name: (folder / "last_model.pbuf").read_bytes() for name, folder in output.items()}
    assert model["killed"] == model["undisturbed"]
    rows = {
        name: [
            json.loads(line)
            for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        for name, folder in output.items()
    }
    clips = {
        name: [row["dp"].pop("clip", None) for row in kept[:-1]] for name, kept in rows.items()
    }
    assert clips["killed"] == clips["undisturbed"]
    if adaptive:
        assert clips["killed"][0] == 1.0 and len(set(clips["killed"])) == ROUNDS, clips
    else:
        assert clips["killed"] == [None] * ROUNDS
    assert [row["round"] for row in rows["killed"]] == [0, 1, 2, 3]  # 3 training, 1 validation
    assert [row.get("dp") for row in rows["killed"]] == [
        *({"epsilon": epsilon_after(r, NOISE, 1e-5), "delta": 1e-5} for r in (1, 2, 3)),
        None,
    ]
    spent = f"epsilon {epsilon_after(ROUNDS, NOISE, 1e-5):.2f} of {CAP:g} at delta 1e-05"
    for federation in (undisturbed, killed):
        stdout = federation.output()
        first = stdout.splitlines()[0]
        assert f"{ROUNDS} rounds + final validation" in first, first
        assert f"its budget allows {ROUNDS} of the plan's {PLAN_ROUNDS} rounds" in first, first
        last = [line for line in stdout.splitlines() if "federation finished" in line][-1]
        assert last.endswith(f"; privacy budget: {spent} after {ROUNDS} rounds"), last
    assert re.search(r"resuming round 2/3", killed.output()), killed.output()
    assert SECRET.hex() not in killed.output() + killed.log("aggregator")
    status = run_module("foedus.aggregator", "status", "--plan", str(killed.plan))
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "finished (3 rounds)" in lines[0], lines
    budget = [line for line in lines if line.startswith("  privacy budget: ")]
    assert budget[0].startswith(f"  privacy budget: {spent} after {ROUNDS} rounds"), lines
    assert ("; clip " in budget[0]) == bool(adaptive), budget
    status = run_module("foedus.aggregator", "status", "--plan", str(killed.plan), "--json")
    assert status.returncode == 0, status.stderr
    dp = json.loads(status.stdout)["dp"]
    assert dp["rounds"] == ROUNDS and ("clip" in dp) == bool(adaptive), dp
    assert not adaptive or f"; clip {dp['clip']:.4g} (adaptive, from 1)" in budget[0], budget
