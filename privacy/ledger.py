"""A site's privacy ledger: the DP-SGD rounds it has released, kept durably at the site.

Sample-level DP-SGD at a site (`foedus.plans.runners.PrivateTraining`) spends privacy each round
it trains; what it spent is a fact about the updates that left the site, so it must outlive the
collaborator process. The ledger is one JSON file in the collaborator's state folder
(``privacy-ledger.json``, mode 0600, replaced whole and durably by
`foedus.durable.files.write_text`), holding the federation's uuid, the site's name and, per
round released, its (round, noise_multiplier, sample_rate, steps): what the accountant
(`foedus.privacy.accountant.dp_sgd_epsilon`) needs, never data of the site.

A round is recorded BEFORE its update is sent. The site draws a round's sampling and noise from
its secret and the round alone (`foedus.privacy.secret`), so a round trained again with the same
parameters (a restart) releases the very same update: it costs nothing more and is not recorded
again. Trained again with other parameters, it is another release and is recorded again (spent
twice, honestly). Never pickle: a file that does not read as a ledger of this site and
federation is a `LedgerError` naming it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foedus.durable.files import write_text
from foedus.refusals.errors import StorageError

LEDGER_FILE = "privacy-ledger.json"
LEDGER_MODE = 0o600
FORMAT = "foedus site privacy ledger v1"


class LedgerError(StorageError):
    """The ledger cannot be read or written, or is another's: one line naming the file."""


@dataclass(frozen=True)
class SpentRound:
    """One round's release by DP-SGD: the parameters its epsilon follows from."""

    round_number: int
    noise_multiplier: float  # the Gaussian noise's std over the per-sample clipping norm
    sample_rate: float  # each record's Poisson probability of being in a step's batch
    steps: int  # the optimizer steps of the round

    def same_release(self, other: SpentRound) -> bool:
        """Whether `other` is this round trained again alike (same secret: the same update)."""
        return self == other


class SiteLedger:
    """The rounds site `site` of federation `federation_uuid` has released, in `path`."""

    def __init__(self, path: Path, federation_uuid: str, site: str) -> None:
        self.path = path
        self.federation_uuid = federation_uuid
        self.site = site
        self._rounds: tuple[SpentRound, ...] = self._read()

    @property
    def rounds(self) -> tuple[SpentRound, ...]:
        """Every release recorded, in the order recorded (a round trained again with other
        parameters appears twice)."""
        return self._rounds

    def holds(self, spent: SpentRound) -> bool:
        """Whether this very release is recorded already (training it again costs nothing)."""
        return any(entry.same_release(spent) for entry in self._rounds)

    def record(self, spent: SpentRound) -> bool:
        """Record `spent` durably before its update leaves the site; False when it was already
        recorded (the same release again), True when it was added."""
        _check(spent, self.path)
        if self.holds(spent):
            return False
        rounds = (*self._rounds, spent)
        document = {
            "format": FORMAT,
            "federation_uuid": self.federation_uuid,
            "site": self.site,
            "rounds": [
                {
                    "round": entry.round_number,
                    "noise_multiplier": entry.noise_multiplier,
                    "sample_rate": entry.sample_rate,
                    "steps": entry.steps,
                }
                for entry in rounds
            ],
        }
        try:
            write_text(self.path, json.dumps(document, indent=1) + "\n", mode=LEDGER_MODE)
        except OSError as error:
            raise LedgerError(
                f"{self.path}: cannot write this site's privacy ledger: {error.strerror or error}"
            ) from None
        self._rounds = rounds
        return True

    def _read(self) -> tuple[SpentRound, ...]:
        """What the file holds (nothing when there is no file yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise LedgerError(
                f"{self.path}: cannot read this site's privacy ledger: {reason}"
            ) from None
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                raise ValueError(f"not a privacy ledger ({FORMAT!r})")
            rounds = tuple(_entry(entry) for entry in document["rounds"])
            uuid, site = document["federation_uuid"], document["site"]
        except (ValueError, KeyError, TypeError) as error:
            raise LedgerError(
                f"{self.path}: cannot read this site's privacy ledger ({error}): it is not one "
                "this collaborator wrote; never delete it to train again (its rounds were spent)"
            ) from None
        if (uuid, site) != (self.federation_uuid, self.site):
            raise LedgerError(
                f"{self.path}: this privacy ledger is site {site!r}'s of federation {uuid}, not "
                f"{self.site!r}'s of {self.federation_uuid}: give each collaborator and "
                "federation its own --state-dir"
            )
        for entry in rounds:
            _check(entry, self.path)
        return rounds


def _entry(entry: Any) -> SpentRound:
    """One round of the file; ValueError or TypeError when it is not one."""
    if not isinstance(entry, dict):
        raise TypeError("a round is not a mapping")
    number, noise, rate, steps = (
        entry[key] for key in ("round", "noise_multiplier", "sample_rate", "steps")
    )
    if type(number) is not int or type(steps) is not int:
        raise TypeError("round and steps are integers")
    if not all(isinstance(value, (int, float)) for value in (noise, rate)):
        raise TypeError("noise_multiplier and sample_rate are numbers")
    return SpentRound(number, float(noise), float(rate), steps)


def _check(spent: SpentRound, path: Path) -> None:
    """Refuse a release the accountant cannot count (`LedgerError` naming the file)."""
    if not (
        spent.round_number >= 0
        and math.isfinite(spent.noise_multiplier)
        and spent.noise_multiplier > 0
        and 0 < spent.sample_rate <= 1
        and spent.steps >= 1
    ):
        raise LedgerError(
            f"{path}: round {spent.round_number}: noise_multiplier {spent.noise_multiplier:g}, "
            f"sample_rate {spent.sample_rate:g}, steps {spent.steps}: not a release this site's "
            "accountant can count (noise > 0, 0 < sample_rate <= 1, steps >= 1)"
        )
