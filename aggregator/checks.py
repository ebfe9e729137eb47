"""The refusals of an arriving result: its round, its task, its size and its tensors.

A result for a closed round is refused (FAILED_PRECONDITION), except a resend of one accepted in
the round just closed, which the federation answers OK and counts once (its first answer may
have been lost while the round closed: `RoundState.is_resend`). The messages name the value
refused and the plan's setting that refused it, for the person who reads them on the
collaborator's side.

In a secure round (`foedus.aggregator.secure_stages`) a `train` result is masked: the model's
tensors in the ring's unsigned dtype and the model's shapes, plus the masked weight
(`foedus.secure.WEIGHT_TENSOR`), with a wire `data_size` of 1 (the weight travels masked); a
plaintext update is refused, with a message that says so (OpenFL collaborators cannot take part).

A validation result reports at least one metric, except in a secure federation: there a site may
keep its metrics (`collaborator start --keep-metrics`), and its validation counts as done while
the round's means are over the sites that reported (`foedus.aggregator.closing`). A validation
result of a secure federation holds metrics alone: a model tensor in it would be plaintext.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from foedus.aggregator.records import (
    DELTA_TAG,
    MAX_DATA_SIZE,
    METRIC_TAG,
    Array,
    ResultTensor,
    TaskResult,
)
from foedus.aggregator.schedule import RoundState, Schedule
from foedus.plans.schema import TRAIN, Limits
from foedus.protos.dtypes import is_float, wire_dtype
from foedus.refusals.errors import InvalidRequestError, PreconditionError
from foedus.secure import WEIGHT_TENSOR

PLAINTEXT_REFUSED = (
    "this federation aggregates securely: a plaintext update is refused; OpenFL collaborators "
    "cannot take part (README: Secure aggregation)"
)


class ResultChecks:
    """What a result must be to be accepted, under a federation's schedule and the plan's limits;
    `secure`: the federation aggregates securely, where a site may keep its metrics."""

    def __init__(self, schedule: Schedule, limits: Limits, *, secure: bool = False) -> None:
        self.schedule = schedule
        self.limits = limits
        self.secure = secure

    def round(self, state: RoundState, round_number: int) -> None:
        """Refuse a result or a model read for any round but the open one (call under the lock)."""
        if round_number < 0:
            raise InvalidRequestError(f"round_number must be 0 or more, got {round_number}")
        closed = round_number < state.number or (round_number == state.number and state.refusing)
        if closed:
            after = state.number if round_number < state.number else state.number + 1
            where = (
                "the federation has finished"
                if after >= self.schedule.total_rounds
                else f"the federation is in round {after}"
            )
            raise PreconditionError(f"round {round_number} is closed; {where}")
        if self.schedule.finished(state):
            raise PreconditionError(
                f"round {round_number}: the federation has finished all its rounds"
            )
        if round_number != state.number:
            raise PreconditionError(
                f"round {round_number} is not the round in progress ({state.number})"
            )

    def task(self, round_number: int, task_name: str) -> None:
        """Refuse a task that is not the plan's, or not one of `round_number`."""
        if task_name not in self.schedule.tasks:
            raise InvalidRequestError(
                f"task {task_name!r} is not a task of this federation "
                f"({', '.join(self.schedule.tasks)})"
            )
        round_tasks = self.schedule.tasks_of_round(round_number)
        if task_name not in round_tasks:
            raise PreconditionError(
                f"task {task_name!r} is not a task of round {round_number} "
                f"(the final validation round runs {', '.join(round_tasks)} only)"
            )

    def result(
        self,
        result: TaskResult,
        model: Mapping[str, Array],
        *,
        ring: np.dtype[np.generic] | None = None,
    ) -> None:
        """Every check of a result that does not depend on the round's progress; `ring`: the
        round aggregates securely, its masked values of that dtype."""
        self.task(result.round_number, result.task_name)
        if ring is not None and result.task_name == TRAIN:
            self._masked(result.tensors, model, ring)  # the plaintext refusal before all else
            if result.data_size != 1:
                raise InvalidRequestError(
                    f"data_size of a masked train result is 1 (its weight travels masked in "
                    f"{WEIGHT_TENSOR!r}), got {result.data_size}"
                )
            return  # ring values are integers: nothing is NaN
        if not 0 < result.data_size <= MAX_DATA_SIZE:
            raise InvalidRequestError(
                f"data_size must be a positive number of samples, got {result.data_size}"
            )
        if result.data_size > self.limits.max_data_size:
            raise InvalidRequestError(
                f"data_size {result.data_size} is over the plan's limit of "
                f"{self.limits.max_data_size} samples (limits.max_data_size)"
            )
        self._tensors(result.task_name, result.tensors, model)
        if not self.limits.allow_non_finite:
            for tensor in result.tensors:
                finite = tensor.finite
                if finite is None and is_float(tensor.array.dtype):
                    finite = bool(np.isfinite(tensor.array).all())
                if finite is False:
                    raise InvalidRequestError(
                        f"tensor {tensor.name!r} holds NaN or infinite values "
                        "(the plan's limits.allow_non_finite is false)"
                    )

    def _tensors(
        self, task: str, tensors: Sequence[ResultTensor], model: Mapping[str, Array]
    ) -> None:
        """Metrics are numeric scalars; model tensors match the global model's; train sends all
        of them, a validation at least one metric (what it measured: OpenFL's send one, Flower's
        a loss at least), unless the federation is secure and the site keeps its metrics."""
        names = [tensor.name for tensor in tensors]
        if len(set(names)) != len(names):
            raise InvalidRequestError("results name the same tensor more than once")
        model_tensors: set[str] = set()
        metrics = 0
        for tensor in tensors:
            if METRIC_TAG in tensor.tags:
                metrics += 1
                if tensor.array.size != 1 or wire_dtype(tensor.array.dtype) is None:
                    raise InvalidRequestError(
                        f"metric {tensor.name!r} must be a numeric scalar, got "
                        f"{tensor.array.dtype}{list(tensor.array.shape)}"
                    )
                continue
            reference = model.get(tensor.name)
            if reference is None:
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} is neither a metric nor in the global model"
                )
            if self.secure and task != TRAIN:  # a validation sends metrics alone
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} in {task} results: {PLAINTEXT_REFUSED}"
                )
            if tensor.array.shape != reference.shape or tensor.array.dtype != reference.dtype:
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} is {tensor.array.dtype}{list(tensor.array.shape)}, "
                    f"the global model's is {reference.dtype}{list(reference.shape)}"
                )
            if DELTA_TAG in tensor.tags:
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} is a delta update; foedus averages whole weights "
                    "(turn delta updates off in the collaborator)"
                )
            model_tensors.add(tensor.name)
        if task == TRAIN:
            missing = sorted(set(model) - model_tensors)
            if missing:
                shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
                raise InvalidRequestError(
                    f"train results lack {len(missing)} tensor(s) of the global model: {shown}"
                )
        elif not metrics and not self.secure:
            raise InvalidRequestError(
                f"{task} results hold no metric: a validation reports at least one "
                "(a tensor tagged 'metric', such as accuracy); a site keeps its metrics only in "
                "a secure federation (secure_aggregation.enabled)"
            )

    def _masked(
        self,
        tensors: Sequence[ResultTensor],
        model: Mapping[str, Array],
        ring: np.dtype[np.generic],
    ) -> None:
        """A masked update: every model tensor in `ring`'s dtype and the model's shape, the
        masked weight, numeric scalar metrics; nothing else."""
        names = [tensor.name for tensor in tensors]
        if len(set(names)) != len(names):
            raise InvalidRequestError("results name the same tensor more than once")
        seen: set[str] = set()
        for tensor in tensors:
            array = tensor.array
            if METRIC_TAG in tensor.tags:
                if array.size != 1 or wire_dtype(array.dtype) is None:
                    raise InvalidRequestError(
                        f"metric {tensor.name!r} must be a numeric scalar, got "
                        f"{array.dtype}{list(array.shape)}"
                    )
                continue
            plain: np.dtype[np.generic] | None = None  # the dtype a plaintext update sends
            if tensor.name == WEIGHT_TENSOR:
                shape: tuple[int, ...] = (1,)
            else:
                reference = model.get(tensor.name)
                if reference is None:
                    raise InvalidRequestError(
                        f"tensor {tensor.name!r} is neither a metric, nor in the global model, "
                        f"nor the masked weight {WEIGHT_TENSOR!r}"
                    )
                shape, plain = reference.shape, reference.dtype
            if array.dtype != ring:
                if array.dtype.kind != "u" or array.dtype == plain:
                    raise InvalidRequestError(
                        f"tensor {tensor.name!r} is {array.dtype}: {PLAINTEXT_REFUSED}"
                    )
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} is {array.dtype}; this federation's masked values "
                    f"are {ring} (secure_aggregation.bits)"
                )
            if array.shape != shape:
                raise InvalidRequestError(
                    f"masked tensor {tensor.name!r} has shape {list(array.shape)}, not "
                    f"{list(shape)}"
                )
            seen.add(tensor.name)
        missing = sorted({*model, WEIGHT_TENSOR} - seen)
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise InvalidRequestError(
                f"a masked train result lacks {len(missing)} tensor(s): {shown}"
            )
