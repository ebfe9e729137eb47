"""A digits runner that kills its own process once, in the middle of a train task: a sure moment.

`die_if_armed` is the same death for other runners (the PyTorch one in torch_runner/net_runner).

Crash tests name it as `dying_runner:DyingDigitsRunner` (this folder on PYTHONPATH) and arm it
in one collaborator's environment with `FOEDUS_TEST_DIE=ROUND:MARKER`: the first train task of
round ROUND that finds no file MARKER creates it, trains, and sends itself SIGKILL before the
result leaves, as an OOM kill or a power cut would end it. Started again with the same
environment, it trains that round to the end. Unarmed, it is the digits runner, bit for bit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from collaborator.digits import DigitsRunner
from plans.runners import Model, TrainOutcome

NAME = "dying_runner:DyingDigitsRunner"
ENVIRONMENT_VARIABLE = "FOEDUS_TEST_DIE"


def arm(round_number: int, marker: Path) -> dict[str, str]:
    """The environment that has a collaborator die once, mid-task, in round `round_number`."""
    return {ENVIRONMENT_VARIABLE: f"{round_number}:{marker}"}


def die_if_armed(round_number: int) -> None:
    """SIGKILL this process if armed for `round_number` and not yet dead once (the marker)."""
    armed, _, marker = os.environ.get(ENVIRONMENT_VARIABLE, "").partition(":")
    if not armed or int(armed) != round_number:
        return
    try:
        Path(marker).open("x").close()  # exclusive: one death, whatever restarts follow
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


class DyingDigitsRunner(DigitsRunner):
    """The digits runner; armed, it dies once in the middle of a train task (see the module)."""

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Train as the digits runner does; armed for this round, die before returning."""
        outcome = super().train(model, round_number)
        die_if_armed(round_number)
        return outcome
