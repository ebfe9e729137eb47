"""A task runner that does no work, so a benchmark measures the transport alone.

`runner.settings` (every key optional):

* ``model_mb``: the model's size in MiB (float32, default 1); ``tensors``: how many tensors it is
  cut into (default 4, as equal as possible, named ``layer00/weight``, ``layer01/weight``, ...);
* ``train_delta``: `train` returns the model it got plus this (default 0: the very same arrays,
  no copy); ``data_size``: the samples each result claims (default 1).

The initial model is drawn from `runner.seed` (uniform in [0, 1), one random stream per
tensor), so the aggregator and every collaborator compute the same one; it is built once per
process and settings, and its arrays are read-only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from foedus.plans.runners import Array, Model, RunnerError, TrainOutcome, Validation
from foedus.plans.schema import RunnerSettings

MIB = 1024 * 1024
FLOAT32_BYTES = 4
MAX_TENSORS = 10_000


@dataclass(frozen=True)
class NoopSettings:
    """`runner.settings` of the no-op runner."""

    model_mb: float = 1.0  # runner.settings.model_mb: model size in MiB (float32)
    tensors: int = 4  # runner.settings.tensors: number of tensors
    train_delta: float = 0.0  # runner.settings.train_delta: added by train (0: no copy)
    data_size: int = 1  # runner.settings.data_size: samples each result claims

    @classmethod
    def parse(cls, raw: Mapping[str, object]) -> NoopSettings:
        """Check `runner.settings`; `RunnerError` names every bad or unknown key at once."""
        problems: list[str] = []
        known = [field.name for field in fields(cls)]
        problems.extend(
            f"runner.settings.{key}: unknown key (known: {', '.join(known)})"
            for key in raw
            if key not in known
        )
        defaults = cls()
        model_mb = _number(raw, "model_mb", defaults.model_mb, problems, positive=True)
        train_delta = _number(raw, "train_delta", defaults.train_delta, problems)
        tensors = _integer(raw, "tensors", defaults.tensors, problems, high=MAX_TENSORS)
        data_size = _integer(raw, "data_size", defaults.data_size, problems, high=2**31 - 1)
        if not problems and model_mb * MIB < tensors * FLOAT32_BYTES:
            problems.append(
                f"runner.settings.model_mb: {model_mb} MiB is less than one float32 for each of "
                f"the {tensors} tensors"
            )
        if problems:
            raise RunnerError("; ".join(problems))
        return cls(model_mb=model_mb, tensors=tensors, train_delta=train_delta, data_size=data_size)


def _number(
    raw: Mapping[str, object],
    key: str,
    default: float,
    problems: list[str],
    *,
    positive: bool = False,
) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problems.append(f"runner.settings.{key}: expected a number, got {value!r}")
        return default
    if positive and value <= 0:
        problems.append(f"runner.settings.{key}: expected a number > 0, got {value!r}")
        return default
    return float(value)


def _integer(
    raw: Mapping[str, object], key: str, default: int, problems: list[str], *, high: int
) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        problems.append(f"runner.settings.{key}: expected an integer 1-{high}, got {value!r}")
        return default
    return value


@lru_cache(maxsize=4)
def _model(seed: int, model_mb: float, tensors: int) -> tuple[tuple[str, Array], ...]:
    """The model for these settings, built once per process; read-only arrays."""
    elements = int(model_mb * MIB) // FLOAT32_BYTES
    base, extra = divmod(elements, tensors)
    model: list[tuple[str, Array]] = []
    for index in range(tensors):
        rng = np.random.default_rng((seed, index))
        array = rng.random(base + (1 if index < extra else 0), dtype=np.float32)
        array.flags.writeable = False
        model.append((f"layer{index:02d}/weight", array))
    return tuple(model)


def model_bytes(model: Model) -> int:
    """The bytes of a model's tensors."""
    return sum(np.asarray(array).nbytes for array in model.values())


class NoopRunner:
    """Returns what it got: `train` the model (plus `train_delta`), `validate` a fixed metric."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        self.settings = NoopSettings.parse(settings.settings)
        self.collaborator = collaborator

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """The seeded model of round 0 (shared read-only arrays, built once per process)."""
        parsed = NoopSettings.parse(settings.settings)
        return dict(_model(settings.seed, parsed.model_mb, parsed.tensors))

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """The model it got (the same arrays when `train_delta` is 0) and a zero loss."""
        delta = self.settings.train_delta
        trained: dict[str, Array] = {
            name: array if delta == 0 else np.asarray(array, dtype=np.float32) + np.float32(delta)
            for name, array in model.items()
        }
        return TrainOutcome(model=trained, metrics={"loss": 0.0}, data_size=self.settings.data_size)

    def validate(self, model: Model) -> Validation:
        """A fixed accuracy of 1."""
        return Validation(metrics={"accuracy": 1.0}, data_size=self.settings.data_size)
