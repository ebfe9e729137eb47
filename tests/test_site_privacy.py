"""Sample-level DP-SGD at a site, without PyTorch: its secret, its ledger, its accountant, its
`dp_sgd` setting, and its cap in a real collaborator against a real aggregator."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import yaml
from dp_accounting.rdp import RdpAccountant

from foedus.aggregator.runtime import Runtime
from foedus.aggregator.storage import OutputFolder
from foedus.collaborator.cli import main
from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.loop import run_collaborator
from foedus.collaborator.private import BUDGET_SPENT_REASON
from foedus.experiment.show import row_lines
from foedus.history.rows import MetricsRow, metric_text
from foedus.pki.layout import CertsLayout
from foedus.plans.runners import RunnerError
from foedus.plans.schema import RunnerSettings
from foedus.privacy.accountant import dp_sgd_epsilon, noise_for
from foedus.privacy.dp_sgd import dp_sgd_settings, round_seeds
from foedus.privacy.ledger import LEDGER_FILE, LedgerError, SiteLedger, SpentRound
from foedus.privacy.noise import NOISE_V1, NOISE_VERSION, NoiseSecret
from foedus.privacy.secret import SECRET_FILE, privacy_secret
from foedus.privacy.site_budget import DP_EPSILON, SiteBudget
from foedus.refusals.errors import StorageError

from federation_processes import child_python_path
from private_runner import DIE_AT_ENV, NAME, SAMPLE_RATE, STEPS, PrivateRunner
from servers import closing_rounds, make_federation, make_plan, plan_document, running_aggregator

UUID = "3c9d4b7e-51a2-4f0e-9d1c-7a2b6e8f0c13"


def test_the_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    """32 bytes and today's noise version, mode 0600, the same at every call; a file of the 32
    bytes alone (made before versions were kept) draws with version 1; another size or an
    unknown version is refused, naming the file."""
    path = tmp_path / SECRET_FILE
    secret = privacy_secret(path, remedy="fix it")
    assert len(secret.key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == secret.key + bytes([NOISE_VERSION])
    assert secret.version == NOISE_VERSION
    assert privacy_secret(path, remedy="fix it", made=bytes(32)) == secret  # never replaced
    path.write_bytes(secret.key)
    assert privacy_secret(path, remedy="fix it") == NoiseSecret(secret.key, NOISE_V1)
    for content in [b"short", secret.key + bytes([9])]:
        path.write_bytes(content)
        size = len(content)
        with pytest.raises(
            StorageError, match=rf"^{path}: holds {size} bytes, not the 32 .* \(fix it\)$"
        ):
            privacy_secret(path, remedy="fix it")


def test_the_ledger_is_durable_private_and_never_spends_a_release_twice(tmp_path: Path) -> None:
    """A round is in the file (0600) once recorded; read again after a restart; the same release
    recorded again costs nothing; the same round with other parameters is spent again."""
    path = tmp_path / LEDGER_FILE
    ledger = SiteLedger(path, UUID, "alice")
    first = SpentRound(0, 1.1, 0.05, 20)
    assert ledger.rounds == () and not path.exists()
    assert ledger.record(first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["rounds"] == [
        {"round": 0, "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 20}
    ]
    again = SiteLedger(path, UUID, "alice")  # a restarted collaborator
    assert again.rounds == (first,) and again.holds(first)
    assert not again.record(SpentRound(0, 1.1, 0.05, 20))
    assert SiteLedger(path, UUID, "alice").rounds == (first,)
    other = SpentRound(0, 1.3, 0.05, 20)  # round 0 trained again otherwise: another release
    assert again.record(other)
    assert SiteLedger(path, UUID, "alice").rounds == (first, other)
    assert dp_sgd_epsilon(again.rounds, 1e-5) > dp_sgd_epsilon([first], 1e-5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "cannot read this site's privacy ledger (Expecting"),
        ('{"format": "x"}', "cannot read this site's privacy ledger (not a privacy ledger"),
        (
            json.dumps(
                {
                    "format": "foedus site privacy ledger v1",
                    "federation_uuid": UUID,
                    "site": "bob",
                    "rounds": [],
                }
            ),
            f"this privacy ledger is site 'bob''s of federation {UUID}, not 'alice''s",
        ),
        (
            json.dumps(
                {
                    "format": "foedus site privacy ledger v1",
                    "federation_uuid": UUID,
                    "site": "alice",
                    "rounds": [{"round": 0, "noise_multiplier": -1, "sample_rate": 1, "steps": 1}],
                }
            ),
            "round 0: noise_multiplier -1, sample_rate 1, steps 1: not a release",
        ),
    ],
    ids=["not-json", "not-a-ledger", "another-site", "a-bad-round"],
)
def test_a_ledger_that_is_not_this_sites_is_refused(
    tmp_path: Path, text: str, expected: str
) -> None:
    """One line naming the file; never read as an empty ledger (that would reset the budget)."""
    path = tmp_path / LEDGER_FILE
    path.write_text(text)
    with pytest.raises(LedgerError, match=f"^{path}: ") as raised:
        SiteLedger(path, UUID, "alice")
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def _library_epsilon(rounds: list[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting's epsilon for these rounds, composed here one round at a time."""
    accountant = RdpAccountant()
    for noise, rate, steps in rounds:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    "rounds",
    [
        [(1.1, 256 / 60000, 234)],
        [(1.0, 0.05, 20)] * 3,
        [(0.8, 0.067, 15), (1.2, 0.067, 15), (0.8, 0.067, 15)],
    ],
    ids=["one", "three-alike", "mixed"],
)
def test_the_site_epsilon_is_the_librarys(rounds: list[tuple[float, float, int]]) -> None:
    """Equal to dp-accounting's RDP accountant composing each round's subsampled Gaussian."""
    spent = [SpentRound(number, *round_) for number, round_ in enumerate(rounds)]
    assert dp_sgd_epsilon(spent, 1e-5) == pytest.approx(_library_epsilon(rounds, 1e-5), rel=1e-9)
    assert dp_sgd_epsilon([], 1e-5) == 0.0


def test_abadi_et_al_2016s_figure_is_reproduced() -> None:
    """Abadi et al. 2016 (Deep Learning with Differential Privacy, section 3.1): q = 0.01,
    sigma = 4, delta = 1e-5, T = 10000 steps give epsilon ~= 1.26 by the moments accountant.
    The library's RDP of that run, converted as the moments accountant converts (epsilon =
    min over integer orders a of RDP(a) + log(1/delta) / (a - 1)), gives 1.26; ours, with the
    library's tighter conversion, is below it."""
    orders = list(range(2, 65))
    accountant = RdpAccountant(orders)
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(4.0))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 10000))
    rdp = np.asarray(accountant._rdp)
    moments = float(np.min(rdp + math.log(1 / 1e-5) / (np.asarray(orders) - 1)))
    assert round(moments, 2) == 1.26
    ours = dp_sgd_epsilon([SpentRound(0, 4.0, 0.01, 10000)], 1e-5)
    assert 1.0 < ours < moments


def test_noise_for_a_target_is_the_least_that_keeps_it() -> None:
    """The noise spends at most the target over the rounds; 0.2% less noise would spend more."""
    noise = noise_for(8.0, 1e-5, 0.067, 15, 5)
    run = [SpentRound(r, noise, 0.067, 15) for r in range(5)]
    assert dp_sgd_epsilon(run, 1e-5) <= 8.0
    less = [SpentRound(r, noise * 0.998, 0.067, 15) for r in range(5)]
    assert dp_sgd_epsilon(less, 1e-5) > 8.0
    with pytest.raises(ValueError, match="no noise multiplier up to 10000 keeps"):
        noise_for(1e-9, 1e-5, 1.0, 1000, 1000)


def test_round_seeds_are_the_secrets_and_the_rounds() -> None:
    """The same (secret, round): the same two seeds; another round or secret: others."""
    secret, other = bytes(range(32)), bytes(32)
    sampling, noise = round_seeds(secret, 3)
    assert round_seeds(secret, 3) == (sampling, noise) and sampling != noise
    assert round_seeds(secret, 4) != (sampling, noise)
    assert round_seeds(other, 3) != (sampling, noise)
    assert all(0 <= seed < 2**64 for seed in (sampling, noise))


def _settings(dp_sgd: object, site: bool = False) -> RunnerSettings:
    """Runner settings holding `dp_sgd`, from the plan or from a site's file."""
    if site:
        return RunnerSettings(
            NAME,
            0,
            {"dp_sgd": dp_sgd},
            site_file=Path("site.yaml"),
            site_keys=frozenset({"dp_sgd"}),
        )
    return RunnerSettings(NAME, 0, {"dp_sgd": dp_sgd})


@pytest.mark.parametrize(
    ("dp_sgd", "expected"),
    [
        ({"noise_multiplier": 0, "max_grad_norm": 1}, "runner.settings.dp_sgd.noise_multiplier: expected a number > 0, got 0"),
        ({"noise_multiplier": -1.0, "max_grad_norm": 1}, "runner.settings.dp_sgd.noise_multiplier: expected a number > 0, got -1.0"),
        ({"noise_multiplier": 1, "max_grad_norm": 1, "delta": 1}, "runner.settings.dp_sgd.delta: expected a number between 0 and 1, got 1"),
        ({"noise_multiplier": 1, "max_grad_norm": 0}, "runner.settings.dp_sgd.max_grad_norm: expected a number > 0, got 0"),
        ({"noise_multiplier": 1}, "runner.settings.dp_sgd.max_grad_norm: missing"),
        ({"noise_multiplier": 1, "target_epsilon": 8, "max_grad_norm": 1}, "runner.settings.dp_sgd: set exactly one of noise_multiplier"),
        ({"max_grad_norm": 1}, "runner.settings.dp_sgd: set exactly one of noise_multiplier"),
        ({"noise_multiplier": True, "max_grad_norm": 1}, "runner.settings.dp_sgd.noise_multiplier: expected a number > 0, got True"),
        ({"noise_multiplier": 1, "max_grad_norm": 1, "epsilon": 3}, "runner.settings.dp_sgd.epsilon: not a DP-SGD setting"),
        ([1], "runner.settings.dp_sgd: expected a mapping"),
    ],
    ids=["zero-noise", "negative-noise", "delta-1", "clip-0", "no-clip", "both", "neither", "bool", "unknown", "not-a-mapping"],
)  # fmt: skip
def test_bad_dp_sgd_settings_are_one_line_naming_the_key(dp_sgd: object, expected: str) -> None:
    """Each refusal names the plan's key, or the site's file and key."""
    with pytest.raises(RunnerError) as raised:
        dp_sgd_settings(_settings(dp_sgd))
    assert str(raised.value).startswith(expected)
    with pytest.raises(RunnerError) as raised:
        dp_sgd_settings(_settings(dp_sgd, site=True))
    assert str(raised.value).startswith(expected.replace("runner.settings.", "site.yaml: "))


def test_dp_sgd_settings_as_given() -> None:
    """No dp_sgd: None; delta 1e-5 unless set; a target epsilon gives the noise that keeps it."""
    assert dp_sgd_settings(RunnerSettings(NAME, 0, {})) is None
    settings = dp_sgd_settings(
        _settings({"target_epsilon": 8, "max_grad_norm": 1.5, "max_epsilon": 9})
    )
    assert settings is not None and settings.delta == 1e-5 and settings.max_grad_norm == 1.5
    training = settings.training(0.067, 15, 5)
    assert training.noise_multiplier == noise_for(8, 1e-5, 0.067, 15, 5)
    assert (training.sample_rate, training.steps, training.max_epsilon) == (0.067, 15, 9.0)


def _plan_file(folder: Path, certs: CertsLayout, port: int, dp_sgd: dict[str, Any]) -> Path:
    """Alice's copy of the plan, pointing at the test aggregator."""
    document = plan_document(
        certs,
        federation={"rounds": 4, "uuid": UUID},
        collaborators=["alice", "bob"],
        aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": port},
        runner={"name": NAME, "seed": 0, "settings": {"dp_sgd": dp_sgd}},
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def alice(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`collaborator start ARGS` as alice, a process of its own (the runner's folder on its
    PYTHONPATH, `env` added), to its end within two minutes; its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "foedus.collaborator", *args],
        env={**os.environ, "PYTHONPATH": child_python_path(), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_site_stops_exactly_at_its_cap_and_keeps_its_budget_across_a_kill(
    certs: CertsLayout,
    tmp_path: Path,
) -> None:
    """Alice's cap allows two rounds. Her process killed (SIGKILL) at round 1's validation,
    restarted, she trains round 1 again at no cost, then refuses round 2 in one line, leaves
    (even with --no-leave) and exits 0; rounds 2 and 3 close with bob alone."""
    dp_sgd = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    two = [SpentRound(r, 1.0, SAMPLE_RATE, STEPS) for r in range(2)]
    cap = 3.1  # two rounds spend 2.97, three 3.37
    assert (
        dp_sgd_epsilon(two, 1e-5)
        < cap
        < dp_sgd_epsilon([*two, SpentRound(2, 1.0, SAMPLE_RATE, STEPS)], 1e-5)
    )
    server_plan = make_plan(
        certs,
        federation={"rounds": 4, "uuid": UUID},
        collaborators=["alice", "bob"],
        aggregator={"long_poll_seconds": 0.2},
        runner={"name": NAME, "seed": 0, "settings": {"dp_sgd": dp_sgd}},
    )
    federation = make_federation(server_plan, PrivateRunner.initial_model(server_plan.runner))
    closed: list[Any] = []
    site = tmp_path / "alice-site.yaml"
    site.write_text(yaml.safe_dump({"dp_sgd": {**dp_sgd, "max_epsilon": cap}}))
    state = tmp_path / "alice-state"
    with (
        running_aggregator(server_plan, federation) as server,
        closing_rounds(federation, closed),
        AggregatorGRPCClient.from_plan(
            server_plan, "bob", aggregator_address="127.0.0.1", aggregator_port=server.port
        ) as client,
    ):
        plan = _plan_file(tmp_path / "alice", certs, server.port, dp_sgd)
        bob_runner = PrivateRunner(
            server_plan.runner, collaborator="bob", collaborators=("alice", "bob")
        )
        bob_runner.private_training(bytes(32), 4)
        bob = threading.Thread(
            target=run_collaborator,
            args=(client, bob_runner, server_plan.runner),
            kwargs={"max_idle_polls": 200},
            daemon=True,
        )
        bob.start()
        # Bounds the test: a stopped aggregator ends both collaborators within their retries.
        watchdog = threading.Timer(120, server.stop, args=(0,))
        watchdog.start()
        args = [
            "start",
            "-n",
            "alice",
            "--plan",
            str(plan),
            "--site-settings",
            str(site),
            "--state-dir",
            str(state),
        ]
        killed = alice(args, {DIE_AT_ENV: "alice:1"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        ledger = SiteLedger(state / LEDGER_FILE, UUID, "alice")
        assert ledger.rounds == tuple(two)  # round 1 recorded before its update was sent
        again = alice([*args, "--no-leave"], {})
        assert again.returncode == 0, again.stderr
        bob.join(timeout=60)
        watchdog.cancel()
    assert not bob.is_alive() and federation.finished
    assert SiteLedger(state / LEDGER_FILE, UUID, "alice").rounds == tuple(two)  # not spent twice
    spent = dp_sgd_epsilon(two, 1e-5)
    assert (
        f"round 2 would spend epsilon {dp_sgd_epsilon([*two, SpentRound(2, 1.0, SAMPLE_RATE, STEPS)], 1e-5):.2f} of this "
        f"site's cap 3.1 (max_epsilon) at delta 1e-05: this site trains no more"
    ) in again.stderr
    assert (
        f"this site's privacy budget: epsilon {spent:.2f} of 3.1 at delta 1e-05 after 2 rounds"
        in again.stderr
    )
    # Round 1's update was sent before the kill: trained again (the same secret, the same
    # release) only to validate it, spending nothing (the ledger, below).
    assert "round 1: training again to validate the model sent before a restart" in again.stderr
    [departure] = federation.liveness.departures()
    assert (departure.name, departure.reason) == ("alice", BUDGET_SPENT_REASON)
    training = {summary.round_number: summary for summary in closed if not summary.final_validation}
    assert [training[r].reporters for r in range(4)] == [("alice", "bob")] * 2 + [("bob",)] * 2
    # The site's budget, as metrics.jsonl's per-site metrics carry it; the round's mean has none.
    alice_round_1 = SiteBudget.from_metrics(training[1].sites["alice"]["train"])
    assert alice_round_1 is not None
    assert alice_round_1.epsilon == pytest.approx(spent, rel=1e-6)
    assert alice_round_1.delta == pytest.approx(1e-5, rel=1e-6)
    assert alice_round_1.max_epsilon == pytest.approx(cap, rel=1e-6)
    assert DP_EPSILON not in training[1].sites["bob"]["train"]  # bob ran without a ledger
    assert set(training[1].metrics["train"]) == {"loss"}
    # ... and the aggregator's round line: alice's in round 1; nobody's once she left.
    runtime = Runtime(server_plan, federation, OutputFolder(tmp_path / "output"))
    assert f"  sites' epsilon {spent:.2f}  " in runtime.round_line(training[1])
    assert "epsilon" not in runtime.round_line(training[2])


def test_experiment_metrics_shows_each_sites_epsilon_and_delta() -> None:
    """`experiment metrics --sites` shows a site's epsilon and its delta as 1e-05, not 0.0000."""
    row = MetricsRow(
        round_number=2,
        reporters=("alice",),
        missing=(),
        metrics={"train": {"loss": 0.5}},
        sites={"alice": {"train": {"loss": 0.5, **SiteBudget(2.9702, 1e-5).to_metrics()}}},
    )
    lines = row_lines(row.to_json(), 4, sites=True)
    assert lines[-1] == "  alice  train: dp_delta 1e-05 dp_epsilon 2.9702 loss 0.5000"
    assert metric_text(0.0) == "0.0000" and metric_text(-0.00012) == "-0.00012"


def test_a_ledger_without_its_secret_stops_the_site_at_start(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rounds were released with a secret that is gone: a new one would release them again,
    otherwise; one line naming both files, exit 2, nothing sent (no aggregator is running)."""
    state = tmp_path / "state"
    state.mkdir()
    SiteLedger(state / LEDGER_FILE, UUID, "alice").record(SpentRound(0, 1.0, 0.05, 20))
    plan = _plan_file(tmp_path, certs, 1, {"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    assert main(["start", "-n", "alice", "--plan", str(plan), "--state-dir", str(state)]) == 2
    assert capsys.readouterr().err == (
        f"collaborator: error: --state-dir: {state / SECRET_FILE}: missing, while "
        f"{state / LEDGER_FILE} holds rounds released with it: a new secret would release those "
        "rounds again, differently; put the secret back\n"
    )
    assert not (state / SECRET_FILE).exists()
