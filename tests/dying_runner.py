"""A digits runner that kills its own process in the middle of a task, where asked: sure moments.

Crash tests name it as `dying_runner:DyingDigitsRunner` (this folder on PYTHONPATH) and arm it
in one collaborator's environment with `arm(...)`: `FOEDUS_TEST_DIE=ROUND:WHERE:MARKER,...`,
WHERE being `train` (after training, before the result leaves), `validation` (as it starts
validating the model it trained that round, its training sent) or `unmask` (a secure round's
survivor, its survivor list confirmed, as it is about to reveal its shares: nothing revealed,
the death of a site in the middle of the unmasking). The first time a process gets
there with no file MARKER, it creates it and sends itself SIGKILL, as an OOM kill or a power cut
would end it; started again with the same environment, it goes past. Unarmed, it is the digits
runner, bit for bit. `die_if_armed` is the same death for other runners (the PyTorch one in
torch_runner/net_runner).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

from foedus.collaborator.digits import DigitsRunner
from foedus.plans.runners import Model, TrainOutcome, Validation
from foedus.secure import RevealedShare, SurvivorConfirmation
from foedus.secure.site import SiteRound

NAME = "dying_runner:DyingDigitsRunner"
ENVIRONMENT_VARIABLE = "FOEDUS_TEST_DIE"
TRAIN = "train"
VALIDATION = "validation"
UNMASK = "unmask"


def arm(*deaths: tuple[int, str, Path]) -> dict[str, str]:
    """The environment that has a collaborator die once at each (round, where, marker)."""
    specs = ",".join(f"{round_number}:{where}:{marker}" for round_number, where, marker in deaths)
    return {ENVIRONMENT_VARIABLE: specs}


def die_if_armed(round_number: int, where: str) -> None:
    """SIGKILL this process if armed here and not yet dead here once (the marker)."""
    for spec in filter(None, os.environ.get(ENVIRONMENT_VARIABLE, "").split(",")):
        armed, at, marker = spec.split(":", 2)
        if (int(armed), at) != (round_number, where):
            continue
        try:
            Path(marker).open("x").close()  # exclusive: one death, whatever restarts follow
        except FileExistsError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)


class DyingDigitsRunner(DigitsRunner):
    """The digits runner; armed, it dies where the environment says (see the module)."""

    _trained: int | None = None  # the round trained last, until its model is validated

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Train as the digits runner does; armed for this round, die before returning."""
        outcome = super().train(model, round_number)
        die_if_armed(round_number, TRAIN)
        self._trained = round_number
        return outcome

    def validate(self, model: Model) -> Validation:
        """Validate as the digits runner does; armed, die first when it is the trained model."""
        if self._trained is not None:
            trained, self._trained = self._trained, None
            die_if_armed(trained, VALIDATION)
        return super().validate(model)


def _dying_reveal(
    site: SiteRound, survivors: Sequence[str], confirmations: Sequence[SurvivorConfirmation]
) -> list[RevealedShare]:
    """`SiteRound.revealed_shares`, first dying there when armed for the round's `unmask`."""
    die_if_armed(site.context.round_number, UNMASK)
    return _revealed_shares(site, survivors, confirmations)


# The unmasking runs in the collaborator's secure rounds, not in the runner: armed for it, this
# module (imported as the runner) wraps the protocol's step where a survivor reveals its shares.
_revealed_shares = SiteRound.revealed_shares
if f":{UNMASK}:" in os.environ.get(ENVIRONMENT_VARIABLE, ""):
    SiteRound.revealed_shares = _dying_reveal  # type: ignore[method-assign]
