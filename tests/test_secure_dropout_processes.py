"""The dropout table of a secure federation, with real processes: a site that dies before its
masked upload, after it, or in the middle of the unmasking; the round closes with the survivors'
exact sum (the final model is their FedAvg, computed here from the same seeded runner, within
the fixed point's rounding) while `threshold` survive, and untrained below.

One training round a run, where it can: the model each site trains from is the seeded initial
one, so the survivors' updates are known here without the federation's help."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foedus.aggregator.storage import read_model
from foedus.collaborator.digits import DigitsRunner
from foedus.pki.layout import CertsLayout
from foedus.plans import load_plan

from dying_runner import NAME as DYING_RUNNER
from dying_runner import TRAIN, UNMASK, VALIDATION, arm
from federation_processes import (
    COLLABORATORS,
    RUN_TIMEOUT_SECONDS,
    FederationProcesses,
    child_python_path,
    write_plan,
)

SECURE = {"enabled": True, "threshold": 2, "clip": 1.0, "bits": 32, "max_weight": 2048}
MODEL_BYTES = 2**20
KILLED = -9
# A dead site costs this long before a stage or the round goes on without it, and each live one
# has as long to make its first call once the aggregator started: so the collaborators start
# first (slow to start on a busy machine) and retry until the aggregator answers. The aggregator
# does not wait for a dead one to be told to quit.
STRAGGLER = {"offline_after_seconds": 5}
CONNECTION = {"heartbeat_seconds": 1, "max_retries": 200}
AGGREGATOR = {"quit_grace_seconds": 1}


def fedavg_from_the_start(plan: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The FedAvg (float64) of what `names` train in round 0 from the seeded initial model,
    each weighted by its sample count (at most `max_weight`, as a secure site masks it)."""
    loaded = load_plan(plan)
    initial = DigitsRunner.initial_model(loaded.runner)
    total = 0
    summed: dict[str, np.ndarray] = {}
    for name in names:
        runner = DigitsRunner(loaded.runner, collaborator=name, collaborators=loaded.collaborators)
        outcome = runner.train(initial, 0)
        weight = min(outcome.data_size, SECURE["max_weight"])
        total += weight
        for key, array in outcome.model.items():
            summed[key] = summed.get(key, 0) + np.asarray(array, np.float64) * weight
    return {key: value / total for key, value in summed.items()}


def run_with_deaths(
    folder: Path, certs: CertsLayout, rounds: int, deaths: Mapping[str, Any], **sections: Any
) -> tuple[FederationProcesses, Path, dict[str, int]]:
    """Run the federation to the end, each collaborator in `deaths` armed to die there (the
    dying runner: the digits runner otherwise); its processes, plan and exit codes."""
    plan = write_plan(
        folder,
        certs,
        rounds,
        secure_aggregation=SECURE,
        straggler=STRAGGLER,
        connection=CONNECTION,
        aggregator=AGGREGATOR,
        runner={"name": DYING_RUNNER},
        **sections,
    )
    federation = FederationProcesses(plan, folder)
    environment = {"PYTHONPATH": child_python_path()}
    try:
        for name in COLLABORATORS:
            federation.start(name, env={**environment, **deaths.get(name, {})})
        for name in COLLABORATORS:  # started, calling the aggregator (again, until it answers)
            federation.wait_for_log(name, "working for the aggregator", RUN_TIMEOUT_SECONDS)
        federation.start("aggregator", env=environment)
        codes = {
            name: federation.wait(name, RUN_TIMEOUT_SECONDS)
            for name in ("aggregator", *COLLABORATORS)
        }
    finally:
        federation.stop_all()
    return federation, plan, codes


def assert_model_is(folder: Path, expected: Mapping[str, np.ndarray]) -> None:
    """The run's final model is `expected` within the fixed point's rounding and float32's."""
    model = read_model(folder / "output" / "last_model.pbuf", MODEL_BYTES)
    assert sorted(model) == sorted(expected)
    for key, array in expected.items():
        np.testing.assert_allclose(model[key], array, rtol=0, atol=1e-6)


@pytest.mark.parametrize("when", [VALIDATION, UNMASK])
def test_a_site_that_dies_leaves_the_survivors_exact_sum(
    certs: CertsLayout, tmp_path: Path, when: str
) -> None:
    """carol is killed -9 in round 0 (of 1) after her upload (as she validates), or in the
    middle of the unmasking (her survivor list confirmed, her shares not yet revealed): the
    round closes with alice's and bob's FedAvg (her mask key rebuilt, her upload left out), or,
    when she died in the unmasking, all three's (her upload summed, her seed rebuilt from the
    others' shares). Before her upload: the next test's round 0."""
    marker = tmp_path / f"carol-died-{when}"
    federation, plan, codes = run_with_deaths(tmp_path, certs, 1, {"carol": arm((0, when, marker))})
    log = federation.log("aggregator")
    assert marker.exists() and codes["carol"] == KILLED, federation.log("carol")
    assert {name: codes[name] for name in ("aggregator", "alice", "bob")} == dict.fromkeys(
        ("aggregator", "alice", "bob"), 0
    ), log
    assert "round 0's SHARES stage closed with alice, bob, carol" in log
    if when == UNMASK:
        assert "round 0's SURVIVORS stage closed with alice, bob, carol" in log
        assert "round 0's UNMASK stage closed with alice, bob\n" in log
        survivors: tuple[str, ...] = COLLABORATORS
    else:
        assert "round 0's SURVIVORS stage closed with alice, bob\n" in log
        survivors = ("alice", "bob")
    assert "untrained" not in federation.output()
    assert_model_is(tmp_path, fedavg_from_the_start(plan, survivors))


def test_below_the_threshold_the_round_closes_untrained(certs: CertsLayout, tmp_path: Path) -> None:
    """carol dies before her upload in round 0 (her masks removed with her mask key's shares,
    alice and bob close it at their FedAvg), bob before his in round 1: one survivor, below the
    threshold of 2, so round 1 closes untrained with one line saying why, and the final model is
    round 0's."""
    deaths = {
        "carol": arm((0, TRAIN, tmp_path / "carol-died")),
        "bob": arm((1, TRAIN, tmp_path / "bob-died")),
    }
    federation, plan, codes = run_with_deaths(tmp_path, certs, 2, deaths)
    log = federation.log("aggregator")
    assert codes == {"aggregator": 0, "alice": 0, "bob": KILLED, "carol": KILLED}, log
    assert (
        "round 1 closes untrained: round 1 has 1 survivor(s) (alice), fewer than the threshold "
        "of 2 (secure_aggregation.threshold); the global model stays as it was"
    ) in log
    assert "round 0's SURVIVORS stage closed with alice, bob\n" in log
    lines = federation.output().splitlines()
    assert [line for line in lines if "untrained" in line] == [
        line for line in lines if line.startswith("round 2/2 ")
    ]
    assert_model_is(tmp_path, fedavg_from_the_start(plan, ("alice", "bob")))
