"""The federation's state, in plain Python: rounds, tasks, the global model and accepted results.

The servicer hands decoded requests to a `Federation` and encodes what it answers; nothing here
knows about gRPC or protobuf, so tests drive it directly. Every check runs before anything is
stored, and a resend of an accepted result is recognised and counted once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from aggregator.errors import InvalidRequestError, PreconditionError

Array = npt.NDArray[np.generic]
METRIC_TAG = "metric"
MAX_DATA_SIZE = 2**31 - 1


@dataclass(frozen=True)
class Assignment:
    """What `GetTasks` tells one collaborator: its tasks of a round, or to wait, or to quit."""

    round_number: int
    tasks: tuple[str, ...]
    sleep_seconds: int
    quit: bool


@dataclass(frozen=True)
class ResultTensor:
    """One tensor of a task's results: a model tensor it trained, or a metric it measured."""

    name: str
    tags: frozenset[str]
    array: Array


@dataclass(frozen=True)
class TaskResult:
    """A collaborator's results for one task of one round."""

    collaborator: str
    round_number: int
    task_name: str
    data_size: int
    tensors: tuple[ResultTensor, ...]


class Federation:
    """Round bookkeeping behind the aggregator's RPCs; thread-safe with short critical sections."""

    def __init__(
        self,
        *,
        collaborators: Sequence[str],
        tasks: Sequence[str],
        rounds: int,
        model: Mapping[str, Array],
        poll_seconds: int = 1,
    ) -> None:
        self.collaborators = tuple(collaborators)
        self.tasks = tuple(tasks)
        self.rounds = rounds
        self.poll_seconds = poll_seconds
        self._model = {name: np.asarray(array) for name, array in model.items()}
        self._round = 0
        self._results: dict[tuple[str, str], TaskResult] = {}  # (collaborator, task) this round
        self._lock = threading.Lock()

    @property
    def round_number(self) -> int:
        """The round in progress (counted from 0, as OpenFL does); equals `rounds` when done."""
        return self._round

    @property
    def finished(self) -> bool:
        """Whether every round has been run."""
        return self._round >= self.rounds

    def assignment(self, collaborator: str) -> Assignment:
        """The tasks `collaborator` still owes this round; wait if none; quit when all rounds ran."""
        with self._lock:
            if self.finished:
                return Assignment(self._round, (), 0, quit=True)
            owed = tuple(t for t in self.tasks if (collaborator, t) not in self._results)
            sleep = 0 if owed else self.poll_seconds
            return Assignment(self._round, owed, sleep, quit=False)

    def global_tensor(self, name: str, round_number: int) -> Array:
        """The global model's tensor `name` for the round in progress."""
        array = self._model.get(name)
        if array is None:
            raise InvalidRequestError(f"tensor {name!r} is not in the global model")
        self._check_round(round_number)
        return array

    def model(self) -> Mapping[str, Array]:
        """The global model of the round in progress."""
        return dict(self._model)

    def submit(self, result: TaskResult) -> bool:
        """Accept a task's results; False when it is a resend of one already accepted."""
        self._check_round(result.round_number)  # the cheap refusal first; checked again below
        if result.task_name not in self.tasks:
            raise InvalidRequestError(
                f"task {result.task_name!r} is not a task of this federation "
                f"({', '.join(self.tasks)})"
            )
        if not 0 < result.data_size <= MAX_DATA_SIZE:
            raise InvalidRequestError(
                f"data_size must be a positive number of samples, got {result.data_size}"
            )
        self._check_tensors(result.tensors)
        key = (result.collaborator, result.task_name)
        with self._lock:
            self._check_round(result.round_number)
            if key in self._results:
                return False
            self._results[key] = result
        return True

    def results(self) -> tuple[TaskResult, ...]:
        """The results accepted this round, in a fixed order (collaborator, then task)."""
        with self._lock:
            return tuple(self._results[key] for key in sorted(self._results))

    def _check_round(self, round_number: int) -> None:
        if self.finished:
            raise PreconditionError(f"the federation has finished all {self.rounds} rounds")
        if round_number != self._round:
            raise PreconditionError(
                f"round {round_number} is not the round in progress ({self._round})"
            )

    def _check_tensors(self, tensors: Sequence[ResultTensor]) -> None:
        names = [tensor.name for tensor in tensors]
        if len(set(names)) != len(names):
            raise InvalidRequestError("results name the same tensor more than once")
        for tensor in tensors:
            if METRIC_TAG in tensor.tags:
                if tensor.array.size != 1:
                    raise InvalidRequestError(
                        f"metric {tensor.name!r} must be a scalar, got shape {tensor.array.shape}"
                    )
                continue
            reference = self._model.get(tensor.name)
            if reference is None:
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} is neither a metric nor in the global model"
                )
            if tensor.array.shape != reference.shape or tensor.array.dtype != reference.dtype:
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} is {tensor.array.dtype}{list(tensor.array.shape)}, "
                    f"the global model's is {reference.dtype}{list(reference.shape)}"
                )
