"""A secure federation of real processes: one aggregator and three collaborators, the digits
runner, ending as close to the plain federation's model as the fixed point allows."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foedus.aggregator.storage import read_model
from foedus.history.rows import METRICS, SECURE_STEPS, read_rows
from foedus.pki.layout import CertsLayout
from foedus.privacy.accountant import epsilon_after

from dying_runner import NAME as DYING_RUNNER
from dying_runner import TRAIN, VALIDATION, arm
from federation_processes import (
    COLLABORATORS,
    RUN_TIMEOUT_SECONDS,
    FederationProcesses,
    child_python_path,
    run_federation,
    write_plan,
)

ROUNDS = 3
SECURE = {"enabled": True, "threshold": 2, "clip": 1.0, "bits": 32, "max_weight": 2048}
MODEL_BYTES = 2**20


def test_a_secure_federation_of_processes_ends_close_to_the_plain_one(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """Every process exits 0; the secure model is the plain one within 1e-6 (the fixed point's
    rounding); each collaborator's state folder is private and empty once the federation ends;
    the metrics rows say which rounds were secure, with each step. carol keeps her metrics
    (--keep-metrics): her update counts all the same, the rows' means and sites are alice's and
    bob's, and her log has her metrics."""
    secure = run_federation(
        tmp_path / "secure",
        certs,
        ROUNDS,
        secure_aggregation=SECURE,
        collaborator_args={"carol": ["--keep-metrics"]},
    )
    assert secure.exit_codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), secure
    plain = run_federation(tmp_path / "plain", certs, ROUNDS)
    assert plain.exit_codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), plain
    secure_model = read_model(secure.output_dir / "last_model.pbuf", MODEL_BYTES)
    plain_model = read_model(plain.output_dir / "last_model.pbuf", MODEL_BYTES)
    assert sorted(secure_model) == sorted(plain_model)
    for name, array in plain_model.items():
        assert secure_model[name].dtype == array.dtype
        np.testing.assert_allclose(secure_model[name], array, rtol=0, atol=1e-6)
    for name in COLLABORATORS:
        log = (tmp_path / "secure" / f"{name}.log").read_text(encoding="utf-8")
        assert log.count("shares revealed for the unmasking") == ROUNDS, log
        folder = tmp_path / "secure" / "collaborator-state" / name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert list(folder.iterdir()) == []
    # Each training round's row says it was secure, with every step and nobody dropped.
    rows = read_rows(secure.output_dir / METRICS)
    assert [row.secure for row in rows] == [True] * ROUNDS + [False]  # the final validation
    for row in rows[:ROUNDS]:
        assert [(step.stage, step.dropped) for step in row.stages] == [
            (stage, ()) for stage in SECURE_STEPS
        ]
        assert all(step.seconds is not None and step.seconds >= 0 for step in row.stages)
        assert row.untrained == ""
    for row in rows:
        assert row.reporters == COLLABORATORS and sorted(row.sites) == ["alice", "bob"], row
        assert row.metrics["aggregated_model_validation"]["accuracy"] > 0, row
    carol = (tmp_path / "secure" / "carol.log").read_text(encoding="utf-8")
    assert carol.count("aggregated_model_validation on") == ROUNDS + 1, carol
    assert carol.count("accuracy=") == 2 * ROUNDS + 1, carol  # and the local validations
    assert not any(row.secure or row.stages for row in read_rows(plain.output_dir / METRICS))


def final_model(folder: Path) -> dict[str, bytes]:
    """The bytes of each tensor of the model a run left in folder/output."""
    model = read_model(folder / "output" / "last_model.pbuf", MODEL_BYTES)
    return {name: array.tobytes() for name, array in model.items()}


KILLED = -9
# Differential privacy on top: the ring sized by the loader (max_weight 1, its clip left out).
PRIVATE: dict[str, Any] = {
    "secure_aggregation": {"enabled": True, "threshold": 2, "bits": 32},
    "differential_privacy": {"enabled": True, "clip": 1.0, "noise_multiplier": 1.0},
}


def site_secrets(folder: Path) -> dict[str, bytes]:
    """Each site's privacy secret, placed in its state folder before it starts (both runs draw
    the same noise from them), as the sites read them back at the end."""
    found = {}
    for index, name in enumerate(COLLABORATORS):
        path = folder / "collaborator-state" / name / "privacy.secret"
        if not path.exists():
            path.parent.mkdir(parents=True)
            path.write_bytes(bytes([index + 1]) * 32)
            path.chmod(0o600)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        found[name] = path.read_bytes()
    return found


@pytest.mark.parametrize("private", [False, True], ids=["secure", "secure-with-dp"])
def test_a_collaborator_killed_at_each_stage_goes_on_byte_for_byte(
    certs: CertsLayout, tmp_path: Path, private: bool
) -> None:
    """bob killed -9 three times and started again by hand each time: in round 0's KEYS (his
    secrets written, his keys posted or about to be), in round 1 after his masked upload (before SURVIVORS), in round 2 after
    SHARES (before his upload). Each time he reads his round file and goes on; the final model
    is byte-identical to an undisturbed secure run's (the masks cancel exactly). With
    differential privacy each site adds its noise share, drawn from its privacy secret and the
    round: a restarted bob masks the very same update, the aggregator adds no noise nor keeps
    a secret, and the sites' secrets stay as they were.

    alice and carol start only after the first kill, so round 0's KEYS cannot close without bob
    and he is surely waiting in it; the other deaths are his runner's own SIGKILL (`dying_runner`,
    otherwise the digits runner)."""
    sections: dict[str, Any] = PRIVATE if private else {"secure_aggregation": SECURE}
    if private:
        secrets = site_secrets(tmp_path / "undisturbed")
        assert site_secrets(tmp_path / "killed") == secrets
    undisturbed = run_federation(tmp_path / "undisturbed", certs, ROUNDS, **sections)
    assert set(undisturbed.exit_codes.values()) == {0}, undisturbed
    folder = tmp_path / "killed"
    plan = write_plan(folder, certs, ROUNDS, runner={"name": DYING_RUNNER}, **sections)
    federation = FederationProcesses(plan, folder)
    environment = {"PYTHONPATH": child_python_path()}
    uploaded, shared = folder / "died-validating-round-1", folder / "died-training-round-2"
    bob = {**environment, **arm((1, VALIDATION, uploaded), (2, TRAIN, shared))}
    try:
        federation.start("aggregator", env=environment)
        federation.start("bob", env=bob)
        # His secrets are on disk: he posts his keys (or just did) and waits for the others'.
        federation.wait_for_log(
            "bob", "round 0: secure aggregation secrets made", RUN_TIMEOUT_SECONDS
        )
        federation.kill("bob")
        federation.start("bob", env=bob)
        for name in ("alice", "carol"):
            federation.start(name, env=environment)
        for marker in (uploaded, shared):
            assert federation.wait("bob", RUN_TIMEOUT_SECONDS) == KILLED
            assert marker.exists()  # he died by his own hand, there
            federation.start("bob", env=bob)
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    log = federation.log("bob")
    assert codes == dict.fromkeys(("aggregator", *COLLABORATORS), 0), log
    for number in range(ROUNDS):
        assert f"round {number}: secure aggregation secrets read from" in log, log
    assert "round 1: training again to validate the model sent before a restart" in log
    assert final_model(folder) == final_model(tmp_path / "undisturbed")
    if private:
        assert "added by the sites in shares (quorum 2)" in federation.output().splitlines()[0]
        assert log.count("adds its share of the noise, std 0.7071") == 4, log  # each start
        for run in ("undisturbed", "killed"):
            assert not (tmp_path / run / "output" / "state" / "privacy.secret").exists()
            assert site_secrets(tmp_path / run) == secrets
        rows = read_rows(folder / "output" / METRICS)  # the budget spent, as without secure
        assert [(row.secure, row.dp) for row in rows] == [
            *((True, {"epsilon": epsilon_after(r, 1.0, 1e-5), "delta": 1e-5}) for r in (1, 2, 3)),
            (False, None),
        ]
