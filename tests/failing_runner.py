"""A task runner that fails for good at a given training, or waits there while the test holds it.

The digits runner, with two knobs read from the environment of its process, so each
collaborator of a test federation can be given its own: FAIL_AT_ENV (the index, from 0, of the
`train` call of this process that raises, with a message holding a "patient record" that must
never leave the site) and HOLD_ENV (a file: while it exists, `train` calls from index
HOLD_FROM_ENV on, 1 by default, wait, at most HOLD_SECONDS). The tests run it in real
processes, its folder on PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from foedus.collaborator.digits import DigitsRunner
from foedus.plans.runners import Model, TrainOutcome

NAME = "failing_runner:FailingRunner"
FAIL_AT_ENV = "FOEDUS_TEST_FAIL_AT"
HOLD_ENV = "FOEDUS_TEST_HOLD"
HOLD_FROM_ENV = "FOEDUS_TEST_HOLD_FROM"
HOLD_SECONDS = 120.0
# What a site's data looks like in an exception: it stays in the site's own log.
PATIENT_RECORD = "could not convert string to float: 'n/a' (row 17, column radius_mean)"


class FailingRunner(DigitsRunner):
    """The digits runner, failing or held at the trainings the environment names."""

    _trains = 0

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Raise at FAIL_AT_ENV's training; wait while HOLD_ENV's file exists; else train."""
        index, self._trains = self._trains, self._trains + 1
        fail_at = os.environ.get(FAIL_AT_ENV)
        if fail_at is not None and index == int(fail_at):
            raise ValueError(PATIENT_RECORD)
        hold = os.environ.get(HOLD_ENV)
        if hold is not None and index >= int(os.environ.get(HOLD_FROM_ENV, "1")):
            deadline = time.monotonic() + HOLD_SECONDS
            while Path(hold).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        return super().train(model, round_number)
