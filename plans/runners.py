"""Task runners: the plug-in interface a plan names, and how a name becomes a class.

The plan's `runner.name` is either a built-in name (`digits`) or `package.module:Class` of the
user's own code. Every party resolves it the same way: the aggregator for the seeded initial model
(only when the plan names no `aggregator.initial_model` file), each collaborator to train and
validate, a director to check a plan's settings at submit (only runners its director.yaml
`runners` allows). The import is explicit (`importlib`), and the class must implement
`TaskRunner`; nothing is evaluated from the plan. Importing a module runs its code, so each host
imports only the runners its operator agreed to (envoy.yaml and director.yaml `runners`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from foedus.plans.reader import cut
from foedus.plans.schema import RunnerSettings

Array = npt.NDArray[np.generic]
Model = Mapping[str, Array]

BUILTIN_RUNNERS: Mapping[str, str] = {
    "digits": "foedus.collaborator.digits:DigitsRunner",
}
MAX_DETAIL = 300  # characters of a runner's unexpected error quoted in a one-line refusal


class RunnerError(Exception):
    """A runner cannot be found, imported or set up; the message names `runner.*` and the fix."""


@dataclass(frozen=True)
class TrainOutcome:
    """What `train` gives back: the locally trained model, its metrics and its sample count."""

    model: dict[str, Array]
    metrics: dict[str, float]
    data_size: int


@dataclass(frozen=True)
class PrivateTraining:
    """How a site's runner trains under sample-level DP-SGD: what its accountant counts per round.

    What the optional runner method `private_training(secret, rounds)` gives back (see
    `TaskRunner`). Each round is `steps` optimizer steps, each on a batch in which every record
    of the site is drawn independently with probability `sample_rate` (Poisson sampling), whose
    per-record gradients are clipped and get Gaussian noise of std `noise_multiplier` x the
    clipping norm. The collaborator counts epsilon at `delta` over the rounds it released
    (`foedus.privacy.ledger`), and trains no round that would take it past `max_epsilon`, the
    site's own cap (None: no cap).
    """

    noise_multiplier: float
    sample_rate: float  # Poisson probability of each record per step
    steps: int  # optimizer steps per round
    delta: float
    max_epsilon: float | None = None

    def problem(self) -> str | None:
        """Why the accountant cannot count these rounds (one line), or None."""
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            return f"noise_multiplier is a finite number > 0, not {self.noise_multiplier:g}"
        if not 0 < self.sample_rate <= 1:
            return f"sample_rate is above 0 and at most 1, not {self.sample_rate:g}"
        if self.steps < 1:
            return f"steps is 1 or more, not {self.steps}"
        if not 0 < self.delta < 1:
            return f"delta is between 0 and 1, not {self.delta:g}"
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            return f"max_epsilon is a number > 0, not {self.max_epsilon:g}"
        return None


@dataclass(frozen=True)
class Validation:
    """What `validate` gives back: metrics (such as `accuracy`) and the samples they cover."""

    metrics: dict[str, float]
    data_size: int


@runtime_checkable
class TaskRunner(Protocol):
    """The work a collaborator does on its own data; built once per collaborator process.

    Optional, beside these: a classmethod `check_settings(settings: RunnerSettings)` that raises
    `RunnerError` with the very line the constructor raises for the same bad `runner.settings`
    key (its constructor calls it, so it is said once; what it returns is not used here, the
    built-in runners return the settings they read). The director runs it at submit and
    `aggregator start` before anything starts, on the plan's settings alone (a site's own keys
    are merged later): it refuses what is wrong, never a key a site may still add, and reads no
    data. A runner without it is checked at the sites only.

    Optional too: `private_training(self, secret: bytes, rounds: int) -> PrivateTraining | None`,
    for sample-level DP-SGD at the site. The collaborator calls it once at start, after the
    constructor, with the site's 32-byte privacy secret (`foedus.privacy.secret`, kept in its
    state folder) and the rounds the federation plans to train (over which a target epsilon is
    spread). None, or no such method: the site does not train privately. Otherwise the runner
    keeps the secret and draws each round's Poisson sampling and noise from (secret, round)
    alone (`foedus.privacy.dp_sgd.round_seeds`): a restarted collaborator that trains a round
    again releases exactly the same update, so a round is never spent twice. From the secret,
    never from `runner.seed`: the plan is public, noise drawn from it could be subtracted by
    whoever holds the plan, and batches anyone can compute void the privacy that sampling
    gives. The collaborator records each round in its ledger before the update is sent and
    stops at the site's cap (`PrivateTraining.max_epsilon`).
    """

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """The model of round 0, the same on every party for the same settings (seeded)."""
        ...

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Train `model` (the global model of `round_number`) on this collaborator's data.

        Every random choice comes from the plan's seed, this site and `round_number`, never from
        state of this process: a collaborator restarted mid-federation must train as it would have.
        """
        ...

    def validate(self, model: Model) -> Validation:
        """Measure `model` on this collaborator's held-out data."""
        ...


class RunnerFactory(Protocol):
    """A runner class: `initial_model` plus a constructor for one collaborator's shard."""

    def __call__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> TaskRunner:
        """Build the runner of `collaborator`, one of `collaborators` (data is sharded by index)."""
        ...

    def initial_model(self, settings: RunnerSettings) -> dict[str, Array]:
        """The seeded model of round 0."""
        ...


def load_runner(settings: RunnerSettings) -> RunnerFactory:
    """Import the runner class the plan names, checking it has the `TaskRunner` methods."""
    try:
        return import_runner(settings.name)
    except RunnerError as error:
        raise RunnerError(f"runner.name: {error}") from None


def import_runner(name: str) -> RunnerFactory:
    """Import runner `name` (built-in or `package.module:Class`); `RunnerError` saying why not."""
    target = BUILTIN_RUNNERS.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise RunnerError(
            f"{name!r} is neither a built-in runner ({', '.join(BUILTIN_RUNNERS)}) "
            "nor 'package.module:Class'"
        )
    if module_name.partition(".")[0] in _folders_of_foedus():
        raise RunnerError(
            f"{name!r}: foedus's own modules are imported as foedus.{module_name}: "
            f"write 'foedus.{target}'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RunnerError(f"cannot import {module_name!r}: {error}") from None
    runner = getattr(module, class_name, None)
    methods = {name: getattr(runner, name, None) for name in ("initial_model", "train", "validate")}
    missing = [name for name, method in methods.items() if not callable(method)]
    if not isinstance(runner, type) or missing:
        raise RunnerError(
            f"{target!r} is not a task runner class"
            + (f" (it lacks {', '.join(missing)})" if missing else "")
        )
    if not _takes(methods["train"], None, {}, 0):  # (self, model, round_number)
        raise RunnerError(
            f"{target!r}: train must take (model, round_number), the round whose model it "
            "trains; draw the round's random choices from the seed, the site and round_number, "
            "never from a count kept in the process"
        )
    factory: RunnerFactory = runner  # type: ignore[assignment]
    return factory


def _folders_of_foedus() -> frozenset[str]:
    """The names foedus's packages had before foedus installed one package (plans, collaborator,
    ...): a runner named by one of them would load a second copy of foedus's modules, or none."""
    root = Path(__file__).resolve().parent.parent
    return frozenset(path.name for path in root.iterdir() if (path / "__init__.py").is_file()) - {
        "foedus"
    }


def _takes(function: object, *arguments: object) -> bool:
    """Whether `function` accepts these positional arguments (True when it cannot be told)."""
    if not callable(function):
        return False
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*arguments)
    except TypeError:
        return False
    return True


def check_runner_settings(runner: RunnerFactory, settings: RunnerSettings) -> None:
    """The runner's own `check_settings` on `settings`, if it has one (else only sites check).

    A `RunnerError` is the runner's line, passed on as it is; anything else it raises is a fault
    of the runner's, said in one line naming it.
    """
    check = getattr(runner, "check_settings", None)
    if check is None:
        return
    try:
        check(settings)
    except RunnerError:
        raise
    except Exception as error:
        raise RunnerError(
            f"runner.name: {settings.name!r}: its check_settings failed: "
            f"{type(error).__name__}: {cut(str(error), MAX_DETAIL)}"
        ) from None
