"""An OpenFL task runner written for the interop tests: softmax regression on the digits, in numpy.

It runs inside OpenFL's own virtualenv, copied into a generated OpenFL workspace as
`src/digits_runner.py`, and is named by that workspace's plan (`task_runner` and `data_loader`).
It follows OpenFL 1.9's TaskRunner subclassing API (what `openfl.component.Collaborator` calls)
and mirrors foedus's built-in `digits` runner with `split: iid`: the same tensor names, shapes and
float32 dtype, the same seeded shards and the same minibatch SGD, so OpenFL and foedus
collaborators can share one federation and one global model. It never imports foedus.
"""

from __future__ import annotations

import math

import numpy as np
from openfl.federated.task.runner import TaskRunner
from openfl.utilities import TensorKey
from sklearn.datasets import load_digits

WEIGHT = "softmax/weight"
BIAS = "softmax/bias"
SHAPES = {WEIGHT: (64, 10), BIAS: (10,)}
PIXEL_MAX = 16.0
# The random streams of foedus's digits runner: default_rng((seed, stream, ...)).
MODEL_STREAM, SPLIT_STREAM, TRAIN_STREAM = 0, 1, 2


class DigitsShard:
    """OpenFL data loader: the shard `data_path` = "INDEX/COUNT" (plan/data.yaml) of the digits."""

    def __init__(self, data_path: str, seed: int = 0, test_fraction: float = 0.2, **_: object):
        index, count = (int(part) for part in str(data_path).split("/"))
        digits = load_digits()
        features = np.asarray(digits.data, dtype=np.float64) / PIXEL_MAX
        labels = np.asarray(digits.target, dtype=np.int64)
        order = np.random.default_rng((seed, SPLIT_STREAM)).permutation(len(labels))
        held_out = round(test_fraction * len(labels))
        test, train = order[:held_out][index::count], order[held_out:][index::count]
        self.index = index
        self.train_x, self.train_y = features[train], labels[train]
        self.test_x, self.test_y = features[test], labels[test]

    def get_feature_shape(self) -> tuple[int, ...]:
        """What OpenFL's TaskRunner asks of a data loader."""
        return (64,)

    def get_train_data_size(self) -> int:
        """Samples in the train shard (the weight of this collaborator's update)."""
        return len(self.train_y)

    def get_valid_data_size(self) -> int:
        """Samples in the test shard."""
        return len(self.test_y)


class DigitsTaskRunner(TaskRunner):
    """`train_task` and `validate_task`, as the plan's `tasks` section names them."""

    def __init__(
        self,
        data_loader: DigitsShard,
        seed: int = 0,
        learning_rate: float = 0.5,
        batch_size: int = 32,
        **kwargs: object,
    ):
        super().__init__(data_loader, **kwargs)
        self.seed = seed
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        rng = np.random.default_rng((seed, MODEL_STREAM))
        self.model = {
            WEIGHT: rng.normal(0.0, 0.01, SHAPES[WEIGHT]).astype(np.float32),
            BIAS: np.zeros(SHAPES[BIAS], dtype=np.float32),
        }

    # What OpenFL's Collaborator and `fx plan initialize` call besides the tasks.
    def get_tensor_dict(self, with_opt_vars: bool = False) -> dict[str, np.ndarray]:
        return dict(self.model)

    def set_tensor_dict(self, tensor_dict: dict[str, np.ndarray], with_opt_vars: bool = False):
        self.model = {name: np.asarray(tensor_dict[name], dtype=np.float32) for name in SHAPES}

    def initialize_tensorkeys_for_functions(self, with_opt_vars: bool = False) -> None:
        pass

    def get_required_tensorkeys_for_function(self, func_name: str, **kwargs: object):
        """The global model for training and validation; the locally trained one for `apply: local`."""
        if func_name == "validate_task" and kwargs.get("apply") == "local":
            return [TensorKey(name, "LOCAL", 0, False, ("trained",)) for name in SHAPES]
        return [TensorKey(name, "GLOBAL", 0, False, ("model",)) for name in SHAPES]

    def train_task(self, col_name, round_num, input_tensor_dict, epochs: int = 1, **kwargs):
        """Minibatch SGD from the global model; sends whole trained weights (tag `trained`)."""
        weight, bias = (np.asarray(input_tensor_dict[n], dtype=np.float64) for n in SHAPES)
        shard = self.data_loader
        # Shuffles from the round, as foedus's digits runner: a restarted collaborator trains alike.
        rng = np.random.default_rng((self.seed, TRAIN_STREAM, shard.index, round_num))
        x, y = shard.train_x, shard.train_y
        loss = math.nan
        for _ in range(epochs):
            order = rng.permutation(len(y))
            total = 0.0
            for start in range(0, len(y), self.batch_size):
                rows = order[start : start + self.batch_size]
                log_p = _log_softmax(x[rows] @ weight + bias)
                picked = np.arange(len(rows))
                total -= float(log_p[picked, y[rows]].sum())
                gradient = np.exp(log_p)
                gradient[picked, y[rows]] -= 1.0
                gradient /= len(rows)
                weight -= self.learning_rate * (x[rows].T @ gradient)
                bias -= self.learning_rate * gradient.sum(axis=0)
            loss = total / len(y)
        self.model = {WEIGHT: weight.astype(np.float32), BIAS: bias.astype(np.float32)}
        trained = {
            TensorKey(name, col_name, round_num, False, ("trained",)): array
            for name, array in self.model.items()
        }
        metrics = {TensorKey("loss", col_name, round_num, True, ("metric",)): np.array(loss)}
        return {**trained, **metrics}, dict(trained)

    def validate_task(
        self, col_name, round_num, input_tensor_dict, apply: str = "global", **kwargs
    ):
        """Accuracy and loss on the test shard, tagged as OpenFL tags validation metrics."""
        weight, bias = (np.asarray(input_tensor_dict[n], dtype=np.float64) for n in SHAPES)
        shard = self.data_loader
        log_p = _log_softmax(shard.test_x @ weight + bias)
        accuracy = float(np.mean(np.argmax(log_p, axis=1) == shard.test_y))
        loss = -float(np.mean(log_p[np.arange(len(shard.test_y)), shard.test_y]))
        tags = ("metric", "validate_agg" if apply == "global" else "validate_local")
        return {
            TensorKey("accuracy", col_name, round_num, True, tags): np.array(accuracy),
            TensorKey("loss", col_name, round_num, True, tags): np.array(loss),
        }, {}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
