"""The digits runner, except that its `train` raises at the sites its `raise_at` setting names.

For tests of a site whose collaborator dies on every start (the envoy restarts it, then gives
it up): every site runs the same plan, and only the named ones fail. With `hold_until` (a file),
the other sites' `train` waits for that file, so a test decides when rounds may close (after
the site it watches has ended, say). The end-to-end tests put this folder on PYTHONPATH for the
director, the envoys and their collaborators.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from foedus.collaborator.digits import DigitsRunner, DigitsSettings
from foedus.plans.runners import Model, RunnerError, TrainOutcome
from foedus.plans.schema import RunnerSettings

NAME = "raising_runner:RaisingRunner"
KEY = "raise_at"  # runner.settings.raise_at: a list of the sites whose `train` raises
HOLD = "hold_until"  # runner.settings.hold_until: a file the other sites' `train` waits for
HOLD_SECONDS = 300  # the longest a `train` waits for it


def _own(settings: RunnerSettings) -> tuple[list[str], Path | None, RunnerSettings]:
    """This runner's two settings, checked, and the digits runner's settings without them."""
    sites = settings.settings.get(KEY, [])
    if not isinstance(sites, list) or not all(isinstance(site, str) for site in sites):
        raise RunnerError(f"{settings.key_path(KEY)}: expected a list of site names")
    hold = settings.settings.get(HOLD)
    if hold is not None and not isinstance(hold, str):
        raise RunnerError(f"{settings.key_path(HOLD)}: expected a file's path")
    digits = {k: v for k, v in settings.settings.items() if k not in (KEY, HOLD)}
    return (
        sites,
        None if hold is None else Path(hold),
        replace(settings, settings=MappingProxyType(digits)),
    )


class RaisingRunner(DigitsRunner):
    """Digits; `train` raises at the sites of `runner.settings.raise_at`."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        sites, self.hold, digits = _own(settings)
        super().__init__(digits, collaborator=collaborator, collaborators=collaborators)
        self.raises = collaborator in sites

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> DigitsSettings:
        """This runner's settings checked, then the digits runner's."""
        return super().check_settings(_own(settings)[2])

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Digits' training (once the `hold_until` file is there), or an error at a site named
        to raise."""
        if self.raises:
            raise RuntimeError(f"{self.collaborator} was told to raise in train")
        deadline = time.monotonic() + HOLD_SECONDS
        while self.hold is not None and not self.hold.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return super().train(model, round_number)
