"""Sample-level DP-SGD in the PyTorch runner (Opacus): clipping and noise really applied, the same
bytes from the same secret and round, the step check, the BatchNorm refusal, Opacus's accountant."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from scipy.stats import chi2

from foedus.plans.runners import Array, RunnerError
from foedus.plans.schema import RunnerSettings
from foedus.privacy.accountant import dp_sgd_epsilon
from foedus.privacy.ledger import SpentRound
from foedus.torch_runner import PrivateTrainingError
from foedus.torch_runner.digits import DigitsCNNRunner

from net_runner import BypassingRunner, LinearDpRunner, NetRunner, SmallBatchDpRunner

SITES = ("alice", "bob", "carol")
SECRET = bytes(range(32))
DIGITS = {"norm": "group", "epochs": 1, "batch_size": 64, "learning_rate": 0.2}
FALSE_ALARM = 1e-6  # each side of the chi-square test: the test fails wrongly once in 500,000 runs


def _settings(dp_sgd: dict[str, object], **settings: object) -> RunnerSettings:
    return RunnerSettings("net_runner:LinearDpRunner", 0, {**settings, "dp_sgd": dp_sgd})


def _digest(model: dict[str, Array]) -> str:
    return hashlib.sha256(b"".join(model[name].tobytes() for name in sorted(model))).hexdigest()


def test_each_records_gradient_is_clipped_and_the_sum_gets_the_planned_noise() -> None:
    """Every record's gradient (norm 100) is clipped to max_grad_norm 0.5, so without noise the
    step would move the weights by exactly -0.5 x the unit vector; the 2,000 coordinates'
    deviations from that must be N(0, (noise x clip / records)^2): their sum of squares over
    that variance is chi-square with 2,000 degrees of freedom, inside its 1e-6 and 1 - 1e-6
    quantiles (a false alarm once in 500,000 runs). Unclipped, the deviation would be 200 times
    the clip; without noise, zero: both fail it."""
    noise, clip = 3.0, 0.5
    settings = _settings({"noise_multiplier": noise, "max_grad_norm": clip})
    runner = LinearDpRunner(settings, collaborator="alice", collaborators=SITES)
    training = runner.private_training(SECRET, 1)
    assert training is not None and (training.sample_rate, training.steps) == (1.0, 1)
    start = LinearDpRunner.initial_model(settings)
    trained = runner.train(start, 0).model["weight"].astype(np.float64).reshape(-1)
    unit = np.ones(LinearDpRunner.features) / LinearDpRunner.features**0.5
    noiseless = start["weight"].astype(np.float64).reshape(-1) - clip * unit
    deviation = trained - noiseless
    std = noise * clip / LinearDpRunner.records  # the noise on the sum, over the expected batch
    statistic = float(np.sum(deviation**2) / std**2)
    degrees = LinearDpRunner.features
    assert chi2.ppf(FALSE_ALARM, degrees) < statistic < chi2.ppf(1 - FALSE_ALARM, degrees)


def test_the_same_secret_and_round_give_the_same_bytes() -> None:
    """A site trained again (a restart) releases the very same update; another round, or another
    secret, another one; the plan's public seed alone decides nothing of the noise."""
    settings = RunnerSettings(
        "foedus.torch_runner.digits:DigitsCNNRunner",
        0,
        {**DIGITS, "dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
    )
    start = DigitsCNNRunner.initial_model(settings)

    def trained(secret: bytes, round_number: int) -> str:
        runner = DigitsCNNRunner(settings, collaborator="alice", collaborators=SITES)
        runner.private_training(secret, 10)
        return _digest(runner.train(start, round_number).model)

    first = trained(SECRET, 0)
    assert trained(SECRET, 0) == first
    assert trained(SECRET, 1) != first
    assert trained(bytes(32), 0) != first


def test_an_empty_poisson_batch_is_a_step_of_noise_alone() -> None:
    """Expected batches of one record of four: some steps draw none; each is still a step."""
    settings = _settings({"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    runner = SmallBatchDpRunner(settings, collaborator="alice", collaborators=SITES)
    training = runner.private_training(SECRET, 1)
    assert training is not None and (training.sample_rate, training.steps) == (0.25, 4)
    sizes = []
    for round_number in range(8):
        runner.train(SmallBatchDpRunner.initial_model(settings), round_number)
        sizes.extend(runner.batch_sizes)
    assert 0 in sizes and len(sizes) == 32


def test_a_loop_that_bypasses_the_dp_optimizer_is_refused() -> None:
    """fit stepped its own optimizer: no DP-SGD step was made, so nothing is handed back."""
    settings = _settings({"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    runner = BypassingRunner(settings, collaborator="alice", collaborators=SITES)
    runner.private_training(SECRET, 1)
    with pytest.raises(PrivateTrainingError, match=r"^round 0: fit made 0 DP-SGD optimizer steps"):
        runner.train(BypassingRunner.initial_model(settings), 0)


def test_dp_sgd_without_private_training_is_refused() -> None:
    """A runner built with dp_sgd but never given the site's secret does not train."""
    settings = _settings({"noise_multiplier": 1.0, "max_grad_norm": 1.0})
    runner = LinearDpRunner(settings, collaborator="alice", collaborators=SITES)
    with pytest.raises(PrivateTrainingError, match="private_training was not called"):
        runner.train(LinearDpRunner.initial_model(settings), 0)


def test_batchnorm_is_refused_with_dp_sgd() -> None:
    """The digits CNN says to set norm: group; another model gets Opacus's own reason; a site
    cannot set norm (the plan's model)."""
    dp_sgd = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    digits = RunnerSettings("x", 0, {"dp_sgd": dp_sgd})
    with pytest.raises(RunnerError) as raised:
        DigitsCNNRunner.check_settings(digits)
    assert str(raised.value) == (
        "runner.settings.dp_sgd: DP-SGD cannot train BatchNorm per record (Opacus): set norm: "
        "group in the plan's runner.settings"
    )
    with pytest.raises(
        RunnerError,
        match=r"^runner.settings.dp_sgd: Opacus cannot train this model per record: .*BatchNorm",
    ):
        NetRunner(
            RunnerSettings("x", 0, {"dp_sgd": dp_sgd}), collaborator="alice", collaborators=SITES
        )
    site = RunnerSettings(
        "x",
        0,
        {"norm": "group", "dp_sgd": dp_sgd},
        site_file=Path("site.yaml"),
        site_keys=frozenset({"norm"}),
    )
    with pytest.raises(RunnerError, match=r"^site.yaml: norm: the model's norm is the plan's"):
        DigitsCNNRunner.check_settings(site)


def test_opacus_accountant_agrees_with_ours() -> None:
    """The demo's run (10 rounds of 8 steps at 64/479, noise 1.1, delta 1e-5): Opacus's RDP
    accountant and ours (dp-accounting) within 1% (their RDP orders differ)."""
    accountant = RDPAccountant()
    for _ in range(10 * 8):
        accountant.step(noise_multiplier=1.1, sample_rate=64 / 479)
    ours = dp_sgd_epsilon([SpentRound(r, 1.1, 64 / 479, 8) for r in range(10)], 1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(ours, rel=0.01)


def test_the_digits_cnns_norm_puts_each_tensor_once_in_the_model() -> None:
    """norm: batch is the model as it was (bn1's tensors, its statistics); group has gn1's."""
    batch = DigitsCNNRunner.initial_model(RunnerSettings("x", 0, {}))
    group = DigitsCNNRunner.initial_model(RunnerSettings("x", 0, {"norm": "group"}))
    base = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"]
    statistics = ["running_mean", "running_var", "num_batches_tracked"]
    bn1 = [f"bn1.{name}" for name in ("weight", "bias", *statistics)]
    assert sorted(batch) == sorted([*base, *bn1])
    assert sorted(group) == sorted([*base, "gn1.weight", "gn1.bias"])
