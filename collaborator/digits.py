"""The built-in task runner: softmax regression in numpy on scikit-learn's bundled digits data set.

`load_digits()` ships with scikit-learn (1,797 8x8 images, no download). Everything random is
drawn from `runner.seed`, each use from its own stream, so every party computes the same initial
model and the same shards, and a run can be repeated bit for bit:

* one permutation of the whole data set; its first `test_fraction` is the held-out test split,
  the rest the train split;
* the test split is dealt out round-robin to the collaborators in plan order (for either split),
  so the test shards partition it and the data-size-weighted mean of their accuracies is the
  accuracy on the whole held-out split;
* the train split is dealt out round-robin too (`split: iid`), or sorted by label, a seeded
  `1 - skew` of its places shuffled among themselves, and cut into contiguous pieces
  (`split: label_skew`), so each collaborator sees mostly a few labels;
* minibatches are shuffled from (seed, collaborator index, round), one permutation per epoch,
  never from state of the process: a collaborator killed and started again mid-federation
  trains each round as it would have, and the final model is the same to the byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from foedus.plans.reader import shown
from foedus.plans.runners import Array, Model, RunnerError, TrainOutcome, Validation
from foedus.plans.schema import RunnerSettings

WEIGHT: Final = "softmax/weight"
BIAS: Final = "softmax/bias"
FEATURES: Final = 64  # 8x8 pixels
CLASSES: Final = 10
PIXEL_MAX: Final = 16.0  # load_digits' pixels are 0-16; features are scaled to [0, 1]
SPLITS: Final = ("iid", "label_skew")
INITIAL_WEIGHT_SCALE: Final = 0.01
SHAPES: Final[Mapping[str, tuple[int, ...]]] = {WEIGHT: (FEATURES, CLASSES), BIAS: (CLASSES,)}

# Independent random streams from one seed, as numpy seeds them: default_rng((seed, stream, ...)).
_MODEL_STREAM: Final = 0
_SPLIT_STREAM: Final = 1
_TRAIN_STREAM: Final = 2

T = TypeVar("T")
Indices = npt.NDArray[np.intp]
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class DigitsSettings:
    """`runner.settings` of the digits runner; every key is optional (defaults as in local.yaml)."""

    split: str = "iid"  # runner.settings.split: iid or label_skew
    test_fraction: float = 0.2  # runner.settings.test_fraction: held out, 0-1 exclusive
    epochs: int = 1  # runner.settings.epochs: local epochs per train task
    batch_size: int = 32  # runner.settings.batch_size
    learning_rate: float = 0.5  # runner.settings.learning_rate
    skew: float = 0.8  # runner.settings.skew: label_skew only; 0 = shuffled, 1 = sorted by label

    @classmethod
    def parse(
        cls, raw: Mapping[str, object], key_path: Callable[[str], str] = "runner.settings.{}".format
    ) -> DigitsSettings:
        """Check `runner.settings`; raise `RunnerError` naming every bad or unknown key at once.

        `key_path` says where a key was set (`RunnerSettings.key_path`: the plan or a site file).
        """
        problems: list[str] = []
        defaults = cls()

        def read(key: str, default: T, check: Callable[[object], T | None], want: str) -> T:
            if key not in raw:
                return default
            value = check(raw[key])
            if value is None:
                problems.append(f"{key_path(key)}: expected {want}, got {shown(raw[key])}")
                return default
            return value

        split = read("split", defaults.split, _split, f"one of {', '.join(SPLITS)}")
        settings = cls(
            split=split,
            test_fraction=read(
                "test_fraction",
                defaults.test_fraction,
                _number(lambda v: 0 < v < 1),
                "a number between 0 and 1, both excluded",
            ),
            epochs=read("epochs", defaults.epochs, _positive_integer, "an integer >= 1"),
            batch_size=read(
                "batch_size", defaults.batch_size, _positive_integer, "an integer >= 1"
            ),
            learning_rate=read(
                "learning_rate", defaults.learning_rate, _number(lambda v: v > 0), "a number > 0"
            ),
            skew=read("skew", defaults.skew, _number(lambda v: 0 <= v <= 1), "a number 0-1"),
        )
        if "skew" in raw and raw.get("split", defaults.split) != "label_skew":
            problems.append(f"{key_path('skew')}: only used with split: label_skew")
        known = [field.name for field in fields(cls)]
        problems.extend(
            f"{key_path(key)}: unknown key (known: {', '.join(known)})"
            for key in raw
            if key not in known
        )
        if problems:
            raise RunnerError("; ".join(problems))
        return settings


def _split(value: object) -> str | None:
    return value if isinstance(value, str) and value in SPLITS else None


def _positive_integer(value: object) -> int | None:
    # YAML's true is an int to Python; it is not a number of epochs.
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return value if ok else None  # type: ignore[return-value]


def _number(within: Callable[[float], bool]) -> Callable[[object], float | None]:
    """A check for a finite number (not a boolean) for which `within` holds."""

    def check(value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        number = float(value)
        return number if math.isfinite(number) and within(number) else None

    return check


@dataclass(frozen=True)
class Shard:
    """One collaborator's rows of the data set: indices into `load_digits()`'s arrays."""

    train: Indices
    test: Indices


def make_shards(
    labels: npt.NDArray[np.integer],
    settings: DigitsSettings,
    *,
    seed: int,
    count: int,
    key_path: Callable[[str], str] = "runner.settings.{}".format,
) -> list[Shard]:
    """Every collaborator's shard, in plan order: disjoint, covering the train and test splits."""
    rng = np.random.default_rng((seed, _SPLIT_STREAM))
    order = rng.permutation(len(labels))
    held_out = round(settings.test_fraction * len(labels))
    test, train = order[:held_out], order[held_out:]
    for what, rows in (("test", test), ("train", train)):
        if len(rows) < count:
            raise RunnerError(
                f"{key_path('test_fraction')}: {settings.test_fraction:g} leaves {len(rows)} "
                f"{what} samples for {count} collaborators; each needs at least one"
            )
    if settings.split == "label_skew":
        train = train[np.argsort(labels[train], kind="stable")]
        # Shuffle a random `1 - skew` of the places among themselves: each piece keeps mostly
        # its own few labels, with some of every other label mixed in.
        mixed = np.flatnonzero(rng.random(len(train)) >= settings.skew)
        train[mixed] = train[rng.permutation(mixed)]
        trains: Sequence[Indices] = np.array_split(train, count)
    else:
        trains = [train[index::count] for index in range(count)]
    return [Shard(train=trains[index], test=test[index::count]) for index in range(count)]


def load_data() -> tuple[Floats, npt.NDArray[np.int64]]:
    """The digits images as features in [0, 1] (float64, one row of 64 per image) and labels."""
    # Imported here: importing scikit-learn takes most of a second, and the aggregator only needs
    # `initial_model`, which never touches the data.
    from sklearn.datasets import load_digits  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415

    digits = load_digits()
    features = np.asarray(digits.data, dtype=np.float64) / PIXEL_MAX
    labels = np.asarray(digits.target, dtype=np.int64)
    return features, labels


class DigitsRunner:
    """Softmax regression on this collaborator's shard of the digits, trained by minibatch SGD."""

    def __init__(
        self, settings: RunnerSettings, *, collaborator: str, collaborators: tuple[str, ...]
    ) -> None:
        if collaborator not in collaborators:
            raise RunnerError(
                f"collaborator {collaborator!r} is not one of {', '.join(collaborators)}"
            )
        self.settings = self.check_settings(settings)
        self.seed = settings.seed
        self.collaborator = collaborator
        self.index = collaborators.index(collaborator)
        features, labels = load_data()
        shards = make_shards(
            labels,
            self.settings,
            seed=self.seed,
            count=len(collaborators),
            key_path=settings.key_path,
        )
        self.shard = shards[self.index]
        self._train_x, self._train_y = features[self.shard.train], labels[self.shard.train]
        self._test_x, self._test_y = features[self.shard.test], labels[self.shard.test]

    @classmethod
    def check_settings(cls, settings: RunnerSettings) -> DigitsSettings:
        """`runner.settings` checked (`DigitsSettings.parse`): at submit, at start, at each site."""
        return DigitsSettings.parse(settings.settings, settings.key_path)

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Array]:
        """Small seeded random weights and zero biases (float32, as OpenFL peers read them)."""
        rng = np.random.default_rng((settings.seed, _MODEL_STREAM))
        weight = rng.normal(0.0, INITIAL_WEIGHT_SCALE, SHAPES[WEIGHT])
        return {
            WEIGHT: weight.astype(np.float32),
            BIAS: np.zeros(SHAPES[BIAS], dtype=np.float32),
        }

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Run `epochs` of minibatch SGD on the train shard from `model`; loss is the last epoch's."""
        weight, bias = _parameters(model)
        # From the round, not a count of calls: a restarted collaborator shuffles alike.
        rng = np.random.default_rng((self.seed, _TRAIN_STREAM, self.index, round_number))
        x, y = self._train_x, self._train_y
        rate, size = self.settings.learning_rate, self.settings.batch_size
        loss = math.nan
        for _ in range(self.settings.epochs):
            order = rng.permutation(len(y))
            total = 0.0
            for start in range(0, len(y), size):
                rows = order[start : start + size]
                batch_x, batch_y = x[rows], y[rows]
                log_p = _log_softmax(batch_x @ weight + bias)
                picked = np.arange(len(rows))
                total -= float(log_p[picked, batch_y].sum())
                # Gradient of the mean cross-entropy w.r.t. the logits: softmax minus one-hot.
                gradient = np.exp(log_p)
                gradient[picked, batch_y] -= 1.0
                gradient /= len(rows)
                weight -= rate * (batch_x.T @ gradient)
                bias -= rate * gradient.sum(axis=0)
            loss = total / len(y)
        return TrainOutcome(
            model={WEIGHT: weight.astype(np.float32), BIAS: bias.astype(np.float32)},
            metrics={"loss": loss},
            data_size=len(y),
        )

    def validate(self, model: Model) -> Validation:
        """Accuracy and mean cross-entropy of `model` on this collaborator's test shard."""
        weight, bias = _parameters(model)
        log_p = _log_softmax(self._test_x @ weight + bias)
        y = self._test_y
        accuracy = float(np.mean(np.argmax(log_p, axis=1) == y))
        loss = -float(np.mean(log_p[np.arange(len(y)), y]))
        return Validation(metrics={"accuracy": accuracy, "loss": loss}, data_size=len(y))


def _parameters(model: Model) -> tuple[Floats, Floats]:
    """Float64 working copies of the weight and bias, after checking names and shapes."""
    if set(model) != set(SHAPES):
        raise RunnerError(
            f"digits model: expected tensors {', '.join(sorted(SHAPES))}, "
            f"got {', '.join(sorted(model)) or 'none'}"
        )
    copies = []
    for name, shape in SHAPES.items():
        array = np.asarray(model[name])
        if array.shape != shape:
            raise RunnerError(f"digits model: {name} has shape {array.shape}, expected {shape}")
        copies.append(array.astype(np.float64))  # a copy: the caller's arrays stay untouched
    weight, bias = copies
    return weight, bias


def _log_softmax(logits: Floats) -> Floats:
    shifted = logits - logits.max(axis=1, keepdims=True)
    result: Floats = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result
