"""A task runner that leaks what a hospital must keep: it prints a patient record, then fails
with it (and a site path) in its exception's message.

The share_with_director tests run it at sites of a real director (its folder on PYTHONPATH) to
see that nothing of the record leaves a site that shares the defaults.
"""

from __future__ import annotations

import numpy as np

from foedus.plans.runners import Array, Model, TrainOutcome, Validation
from foedus.plans.schema import RunnerSettings

NAME = "leaky_runner:LeakyRunner"
RECORD = "patient record: Jane Doe, 1961-02-03, MRN 12345"
SITE_FILE = "/srv/hospital records/patients.csv"  # a site path, with a space


class LeakyRunner:
    """Validates fine; its training prints the record and raises ValueError with it."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        self.collaborator = collaborator

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """Three zeros: what the model is does not matter here."""
        return {"w": np.zeros(3, dtype=np.float32)}

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Print the record (as a careless runner would), then fail quoting it."""
        print(f"reading {SITE_FILE}: {RECORD}", flush=True)
        raise ValueError(f"{RECORD} (row 17 of {SITE_FILE})")

    def validate(self, model: Model) -> Validation:
        """A constant metric."""
        return Validation(metrics={"accuracy": 0.5}, data_size=10)
