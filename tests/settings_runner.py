"""A task runner without PyTorch that checks its own settings, and leaves a mark when imported.

Importing a module runs its code: this one prints `IMPORTED` and, when `MARKER` names a file in
the environment, appends its process id to it. Tests put its folder on PYTHONPATH and tell from
the mark whether a director or an aggregator imported it (they must not, unless director.yaml
allows it or the plan brings no initial model). Its one setting, `step`, is what each
collaborator adds to every weight.
"""

from __future__ import annotations

import math
import os

import numpy as np

from foedus.plans.reader import shown
from foedus.plans.runners import Array, Model, RunnerError, TrainOutcome, Validation
from foedus.plans.schema import RunnerSettings

NAME = "settings_runner:SettingsRunner"
MARKER = "FOEDUS_TEST_IMPORT_MARKER"
IMPORTED = "settings_runner: imported, so this process ran its code"

print(IMPORTED, flush=True)
if os.environ.get(MARKER):
    with open(os.environ[MARKER], "a", encoding="utf-8") as _marker:
        _marker.write(f"{os.getpid()}\n")


class SettingsRunner:
    """Each collaborator adds `runner.settings.step` (default 0.5) to every weight."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        self.step = self.check_settings(settings)

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> float:
        """`step`, a finite number > 0; any other key is refused, each named as the site names it."""
        problems = [
            f"{settings.key_path(key)}: unknown key (known: step)"
            for key in settings.settings
            if key != "step"
        ]
        step = settings.settings.get("step", 0.5)
        number = isinstance(step, int | float) and not isinstance(step, bool)
        if not (number and math.isfinite(step) and step > 0):  # type: ignore[arg-type, operator]
            problems.insert(
                0, f"{settings.key_path('step')}: expected a number > 0, got {shown(step)}"
            )
        if problems:
            raise RunnerError("; ".join(problems))
        return float(step)  # type: ignore[arg-type]

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """Three zeros."""
        return {"w": np.zeros(3, dtype=np.float32)}

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Every weight plus `step`."""
        return TrainOutcome(
            {"w": np.asarray(model["w"]) + np.float32(self.step)}, {"loss": 1.0}, 10
        )

    def validate(self, model: Model) -> Validation:
        """An 'accuracy' of zero."""
        return Validation({"accuracy": 0.0}, 10)
