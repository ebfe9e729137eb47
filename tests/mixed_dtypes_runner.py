"""A task runner whose model holds every kind of tensor a PyTorch state dict does, in numpy.

bfloat16 and float16 weights, a float32 one and an int64 counter (BatchNorm's
`num_batches_tracked`): the federation tests run it in real processes (its folder on
PYTHONPATH) to see each dtype travel, get stored and get averaged bit for bit. Its training is
arithmetic, the same on every run: each collaborator moves every weight by its own step.
"""

from __future__ import annotations

import numpy as np

from foedus.plans.runners import Array, Model, RunnerError, TrainOutcome, Validation
from foedus.plans.schema import RunnerSettings
from foedus.protos.dtypes import bfloat16_dtype

NAME = "mixed_dtypes_runner:MixedDtypesRunner"


class MixedDtypesRunner:
    """Each collaborator adds `(index + 1) * 0.01` to every weight and 1 to the counter."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        if settings.settings:
            key = next(iter(settings.settings))
            raise RunnerError(f"{settings.key_path(key)}: unknown key (this runner takes none)")
        self.index = collaborators.index(collaborator)

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """Seeded weights of three float dtypes and a zero int64 counter."""
        rng = np.random.default_rng(settings.seed)
        return {
            "conv/weight": rng.normal(0, 1, (4, 3)).astype(bfloat16_dtype()),
            "fc/weight": rng.normal(0, 1, (3, 5)).astype(np.float16),
            "fc/bias": rng.normal(0, 1, 5).astype(np.float32),
            "bn/num_batches_tracked": np.array(0, dtype=np.int64),
        }

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Every weight moved by this collaborator's step, in its own dtype; the counter + 1."""
        step = (self.index + 1) * 0.01
        trained = {
            name: (array + 1 if array.dtype.kind == "i" else array.astype(np.float64) + step)
            for name, array in ((name, np.asarray(model[name])) for name in sorted(model))
        }
        return TrainOutcome(
            model={name: trained[name].astype(model[name].dtype) for name in trained},
            metrics={"loss": step},
            data_size=10 * (self.index + 1),
        )

    def validate(self, model: Model) -> Validation:
        """A constant metric: what travels is the point here, not what is learnt."""
        return Validation(metrics={"accuracy": 0.5}, data_size=10 * (self.index + 1))
