"""A task runner without PyTorch that declares sample-level DP-SGD (`private_training`).

It stands for a site that trains privately, for the collaborator's ledger and cap: each round it
adds 0.5 plus a normal draw seeded from the site's secret and the round (`round_seeds`) to every
weight, so a round trained again gives the same bytes, as a real DP-SGD runner's does. Its one
setting is `dp_sgd` (`foedus.privacy.dp_sgd`); it "samples" at rate 0.05 in 20 steps a round.
A site whose process is killed (SIGKILL, as by kill -9) at the validation of a round it
trained is `DIE_AT_ENV` set to "SITE:ROUND".
"""

from __future__ import annotations

import os
import signal

import numpy as np

from foedus.plans.runners import (
    Array,
    Model,
    PrivateTraining,
    RunnerError,
    TrainOutcome,
    Validation,
)
from foedus.plans.schema import RunnerSettings
from foedus.privacy.dp_sgd import DP_SGD, DpSgdSettings, dp_sgd_settings, round_seeds

NAME = "private_runner:PrivateRunner"
SAMPLE_RATE = 0.05
STEPS = 20
DIE_AT_ENV = "FOEDUS_TEST_DIE_AT_VALIDATION_OF_ROUND"


class PrivateRunner:
    """Every weight plus 0.5 and a normal draw from (secret, round); DP-SGD as `dp_sgd` says."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        self.dp = self.check_settings(settings)
        self.collaborator = collaborator
        self.secret: bytes | None = None
        self.trained: set[int] = set()

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> DpSgdSettings | None:
        """Only `dp_sgd`, checked as every DP-SGD runner checks it."""
        for key in settings.settings:
            if key != DP_SGD:
                raise RunnerError(f"{settings.key_path(key)}: unknown key (known: {DP_SGD})")
        return dp_sgd_settings(settings)

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """Three zeros."""
        return {"w": np.zeros(3, dtype=np.float32)}

    def private_training(self, secret: bytes, rounds: int) -> PrivateTraining | None:
        """DP-SGD when `dp_sgd` is set: the secret kept for each round's draws."""
        if self.dp is None:
            return None
        self.secret = secret
        return self.dp.training(SAMPLE_RATE, STEPS, rounds)

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Every weight plus 0.5 and the round's secret draw."""
        assert self.secret is not None, "private_training was not called"
        _, noise_seed = round_seeds(self.secret, round_number)
        noise = np.random.default_rng(noise_seed).normal(size=3).astype(np.float32)
        self.trained.add(round_number)
        return TrainOutcome(
            {"w": np.asarray(model["w"]) + np.float32(0.5) + noise}, {"loss": 1.0}, 10
        )

    def validate(self, model: Model) -> Validation:
        """An 'accuracy' of zero; the process is killed here in the round `DIE_AT_ENV` names."""
        site, _, round_number = os.environ.get(DIE_AT_ENV, "").partition(":")
        if site == self.collaborator and int(round_number) in self.trained:
            os.kill(os.getpid(), signal.SIGKILL)
        return Validation({"accuracy": 0.0}, 10)
