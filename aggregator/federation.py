"""The federation's state, in plain Python: rounds, tasks, the global model and accepted results.

The servicer hands decoded requests to a `Federation` and encodes what it answers; nothing here
knows about gRPC or protobuf, so tests drive it directly. Every check runs before anything is
stored, and a resend of an accepted result is recognised and counted once.

Rounds are counted from 0, as OpenFL counts them. Each training round runs the plan's tasks; it
closes when the plan's straggler policy says so (see `close_round_if_due`, which the runtime calls
after every submission and on a short timer):

* ``wait_for_all``: when every collaborator has reported;
* ``cutoff``: when every collaborator has reported, or once ``cutoff_seconds`` have passed since
  the round's tasks were first handed out and at least ``min_reports`` have reported (it keeps
  waiting past the cut-off until they have);
* ``percentage``: once at least ``ceil(percentage * N)`` and at least ``min_reports`` have reported.

With ``straggler.offline_after_seconds`` set, under any policy a round also closes as soon as
every collaborator still online has reported and at least ``min_reports`` have
(`aggregator.liveness` says who is online), so a dead site costs seconds, not the whole cut-off.
One that calls again before the round closes is online again, and the round waits for it again;
one that comes back after the close takes part from the next round (its results for the closed
round are refused, as any straggler's).

A collaborator that has *left* (it said it gives up: the foedus `Leave` RPC, `leave`) is awaited
by no round under any policy, whether or not ``offline_after_seconds`` is set: a round closes as
soon as every collaborator that has not left (and, with ``offline_after_seconds``, is not
offline) has reported, and at least ``min_reports`` have. Its departure is made durable
(`FederationStore.record_leave`) before `Leave` is answered; a resend changes nothing. Any later call
of its but `Leave` and `Heartbeat` rejoins it (`rejoin`, durable too), and it is awaited again
from the next decision on. Results it had sent in the open round count if it had reported
(finished every task); a half-finished one's results do not, as any non-reporter's. When no
round can close any more because too many have left (`stranded`: fewer collaborators that have
not left, plus those that reported while leaving, than ``min_reports`` or one), the runtime
ends the aggregator.

A collaborator has *reported* when it has finished every task of the round; only reporters'
results count. On close, the reporters' ``train`` results are averaged by data size
(`aggregator.fedavg`) into the next global model, and each task's metrics into weighted means;
each reporter's own metrics are kept beside them (`RoundRecord.sites`).
Results for a closed round are refused (FAILED_PRECONDITION), except a resend of one accepted in
the round just closed, which is answered OK and counted once (its first answer may have been lost
while the round closed). The plan's best-model metric is tracked here too (`Best`).

Final validation round: after the last training round (``rounds``), if the plan's tasks include
``aggregated_model_validation``, one more round numbered ``rounds`` runs that task alone, so the
accuracy of the final global model is measured. Then the federation is finished and every
`assignment` answers quit. Without that task the federation finishes after the last training round.

Where results live: a `FederationStore`. `MemoryStore` (the default) keeps them in memory;
`aggregator.state.DurableState` writes them to disk so that a restarted aggregator resumes
(`Progress` is what it recovers). The order of an accept is: every check in memory, then
`stage` (the tensors are written where they survive), then, under the lock and after checking
the round again, `record` (the commit point), then OK. The federation keeps only an index of
accepted results (`Accepted`); tensors are read back from the store, in collaborator order, when
the round is aggregated. A round's close is made durable in two steps: `decide_close` fixes who
reported (so a round killed while aggregating is recomputed from the very same results), then
`commit_round` moves to the next round with its model, the round's record and the best score.
The new model is handed to it still to be averaged (`AveragedModel`): the store averages it a
slice at a time into wherever it keeps it and hands it back as kept (`DurableState`: its file,
mapped), so no copy of the model is made in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

from aggregator.errors import InvalidRequestError, PreconditionError, StorageError
from aggregator.failpoints import failpoint
from aggregator.fedavg import (
    MappedArraySource,
    TensorSource,
    weighted_metrics,
)
from aggregator.liveness import Departure, Liveness, clean_reason, reporting_threshold
from aggregator.records import (
    DELTA_TAG,
    MAX_DATA_SIZE,
    METRIC_TAG,
    Accepted,
    Array,
    Assignment,
    AveragedModel,
    Best,
    Key,
    Progress,
    ResultTensor,
    RoundCommit,
    RoundSummary,
    SiteMetrics,
    Stranded,
    TaskResult,
)
from aggregator.store import FederationStore, MemoryStore
from plans.schema import (
    AGGREGATED_MODEL_VALIDATION,
    TRAIN,
    BestModelSettings,
    Limits,
    Plan,
    StragglerPolicy,
    StragglerSettings,
)
from protos.dtypes import is_float, wire_dtype

logger = logging.getLogger(__name__)


class Federation:
    """Round bookkeeping behind the aggregator's RPCs; thread-safe with short critical sections.

    `clock` times the straggler cut-off and the collaborators' silences (tests inject one that
    moves when told); long polls wait in real time. Aggregation runs outside the lock, while the
    closing round refuses results. With `progress`, the federation resumes from there instead of
    round 0 of `model`. `liveness` judges who is online (by default from `straggler`, or from
    a silence of `reporting_threshold` when the plan sets no `offline_after_seconds`).
    """

    def __init__(
        self,
        *,
        collaborators: Sequence[str],
        tasks: Sequence[str],
        rounds: int,
        model: Mapping[str, Array],
        poll_seconds: int = 1,
        straggler: StragglerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        best_model: BestModelSettings | None = None,
        limits: Limits | None = None,
        store: FederationStore | None = None,
        progress: Progress | None = None,
        liveness: Liveness | None = None,
        heartbeat_seconds: float = 10.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.collaborators = tuple(collaborators)
        self.tasks = tuple(tasks)
        self.rounds = rounds
        self.poll_seconds = poll_seconds
        self.straggler = straggler or StragglerSettings()
        self.best_model = best_model
        self.limits = limits or Limits()
        self.store: FederationStore = store if store is not None else MemoryStore(model)
        self.final_validation = AGGREGATED_MODEL_VALIDATION in self.tasks
        self.total_rounds = rounds + (1 if self.final_validation else 0)
        self._clock = clock
        self._wall = wall
        offline_after = self.straggler.offline_after_seconds
        self.liveness = liveness or Liveness(
            self.collaborators,
            offline_after or reporting_threshold(heartbeat_seconds),
            clock=clock,
            wall=wall,
        )
        start = progress or Progress(round_number=0, model=model)
        for departure in start.departures:
            if departure.name in self.collaborators:
                self.liveness.leave(departure)
        # asanyarray: a model mapped from its file stays mapped (`np.memmap`), holding no memory.
        self._model: Mapping[str, Array] = {
            name: np.asanyarray(array) for name, array in start.model.items()
        }
        self._round = start.round_number
        # (collaborator, task) -> accepted this round
        self._results: dict[Key, Accepted] = {item.key: item for item in start.accepted}
        self._previous: frozenset[Key] = start.previous  # accepted in the round before
        self._decided: tuple[str, ...] | None = start.closing  # reporters of a decided close
        self._best = start.best
        self._pending: dict[Key, threading.Event] = {}  # results being staged right now
        self._opened_at = clock()
        self._started_at: float | None = None  # when the round's tasks were first handed out
        self._closing = False
        self._told_quit: set[str] = set()
        self._lock = threading.Lock()
        self._round_changed = threading.Condition(self._lock)
        self._submitted = threading.Event()
        # Leaving and rejoining, one at a time: the store and `liveness` change in the same order.
        self._departures_lock = threading.Lock()

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        model: Mapping[str, Array],
        *,
        clock: Callable[[], float] = time.monotonic,
        store: FederationStore | None = None,
        progress: Progress | None = None,
    ) -> Federation:
        """The federation a plan describes, starting from `model` (or resuming at `progress`)."""
        return cls(
            collaborators=plan.collaborators,
            tasks=plan.tasks,
            rounds=plan.federation.rounds,
            model=model,
            straggler=plan.straggler,
            clock=clock,
            best_model=plan.best_model,
            limits=plan.limits,
            store=store,
            progress=progress,
            heartbeat_seconds=plan.connection.heartbeat_seconds,
        )

    @property
    def round_number(self) -> int:
        """The round in progress (counted from 0, as OpenFL does); `total_rounds` when done."""
        return self._round

    @property
    def finished(self) -> bool:
        """Whether every round, the final validation round included, has closed."""
        return self._round >= self.total_rounds

    @property
    def best(self) -> Best | None:
        """The best value of the plan's best-model metric so far (None: none yet, or no metric)."""
        return self._best

    def online_count(self) -> int:
        """How many collaborators are online now (see `aggregator.liveness`)."""
        return self.liveness.online_count()

    def tasks_of_round(self, round_number: int) -> tuple[str, ...]:
        """The tasks every collaborator runs in `round_number`."""
        if round_number >= self.rounds:
            return (AGGREGATED_MODEL_VALIDATION,)
        return self.tasks

    # -- handing out work -------------------------------------------------------------------------

    def assignment(self, collaborator: str) -> Assignment:
        """The tasks `collaborator` still owes this round; wait if none; quit when all rounds ran."""
        with self._lock:
            return self._assignment(collaborator)

    def wait_for_assignment(
        self, collaborator: str, timeout: float, *, cancel: threading.Event | None = None
    ) -> Assignment:
        """Like `assignment`, but wait up to `timeout` s for tasks or quit (a long poll).

        Setting `cancel` and then calling `wake_waiters` ends the wait at once.
        """
        deadline = time.monotonic() + timeout
        with self._round_changed:
            while True:
                answer = self._assignment(collaborator)
                remaining = deadline - time.monotonic()
                cancelled = cancel is not None and cancel.is_set()
                if answer.tasks or answer.quit or remaining <= 0 or cancelled:
                    return answer
                self._round_changed.wait(remaining)

    def wake_waiters(self) -> None:
        """Make every `wait_for_assignment` look again now (to see that it was cancelled)."""
        with self._round_changed:
            self._round_changed.notify_all()

    def _assignment(self, collaborator: str) -> Assignment:
        if self.finished:
            self._told_quit.add(collaborator)
            return Assignment(self._round, (), 0, quit=True)
        if self._refusing:
            return Assignment(self._round, (), self.poll_seconds, quit=False)
        owed = tuple(
            task
            for task in self.tasks_of_round(self._round)
            if (collaborator, task) not in self._results
        )
        if not owed:
            return Assignment(self._round, (), self.poll_seconds, quit=False)
        if self._started_at is None:
            self._started_at = self._clock()
        return Assignment(self._round, owed, 0, quit=False)

    def told_to_quit(self) -> tuple[str, ...]:
        """The collaborators that have been told to quit, sorted."""
        with self._lock:
            return tuple(sorted(self._told_quit))

    def everyone_told_to_quit(self) -> bool:
        """Whether every collaborator of the plan has been told to quit (or has left)."""
        staying = self.liveness.staying()
        with self._lock:
            return self._told_quit.issuperset(staying)

    # -- leaving and rejoining --------------------------------------------------------------------

    def leave(self, collaborator: str, reason: str) -> bool:
        """`collaborator` gives up: durable first, then awaited no more; False for a resend.

        `reason` loses its control characters; longer than `MAX_REASON_CHARACTERS` after that,
        `InvalidRequestError`. A resend keeps the first reason.
        """
        try:
            reason = clean_reason(reason)
        except ValueError as error:
            raise InvalidRequestError(str(error)) from None
        with self._departures_lock:
            if self.liveness.has_left(collaborator):
                return False
            departure = Departure(collaborator, reason, self._wall())
            self.store.record_leave(departure)
            self.liveness.leave(departure)
        logger.warning(
            "%s has left: %s; no round waits for it until it calls again",
            collaborator,
            departure.said,
        )
        self._submitted.set()  # the runtime looks at once whether a round can close now
        return True

    def rejoin(self, collaborator: str) -> None:
        """`collaborator` calls again after leaving: durable first, then awaited again."""
        if not self.liveness.has_left(collaborator):
            return  # every call passes here: the usual answer costs one look under a lock
        with self._departures_lock:
            if not self.liveness.has_left(collaborator):
                return
            self.store.record_rejoin(collaborator)
            departure = self.liveness.rejoin(collaborator)
        if departure is not None:
            logger.warning(
                "%s has rejoined (it had left: %s); rounds wait for it again",
                collaborator,
                departure.said,
            )

    def stranded(self) -> Stranded | None:
        """Why the round in progress can never close because too many have left; None if it can.

        It can while the collaborators that have not left, plus those that reported before
        leaving, are at least ``min_reports`` (and one). One that rejoins makes it possible again.
        """
        departures = self.liveness.departures()
        if not departures:
            return None
        staying = self.liveness.staying()
        with self._lock:
            if self.finished or self._closing or self._decided is not None:
                return None
            reporters = self._reporters()
            needed = max(1, self.straggler.min_reports)
            if len(staying | set(reporters)) >= needed:
                return None
            return Stranded(self._round, needed, reporters, departures)

    # -- the global model -------------------------------------------------------------------------

    def global_tensor(self, name: str, round_number: int) -> Array:
        """The global model's tensor `name` for the round in progress."""
        with self._lock:
            array = self._model.get(name)
            if array is None:
                raise InvalidRequestError(f"tensor {name!r} is not in the global model")
            self._check_round(round_number)
            return array

    def global_tensors(self, names: Sequence[str], round_number: int) -> list[tuple[str, Array]]:
        """The global model's tensors `names` (all, in name order, when empty) for the round in progress.

        All from the same model: a round that closes meanwhile cannot mix two rounds' tensors.
        """
        if len(set(names)) != len(names):
            raise InvalidRequestError("the request names a tensor more than once")
        with self._lock:
            missing = [name for name in names if name not in self._model]
            if missing:
                shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
                raise InvalidRequestError(f"not in the global model: {shown}")
            self._check_round(round_number)
            return [(name, self._model[name]) for name in (names or sorted(self._model))]

    def model(self) -> Mapping[str, Array]:
        """The global model of the round in progress."""
        with self._lock:
            return dict(self._model)

    # -- results ----------------------------------------------------------------------------------

    def submit(self, result: TaskResult) -> bool:
        """Accept a task's results; False when it is a resend of one already accepted.

        Refusals and resends are decided before anything is written; an accepted result is in
        the store for good (`FederationStore.record`) before this returns True.
        """
        with self._lock:  # the cheap refusals first; checked again below
            if self._is_resend(result.collaborator, result.round_number, result.task_name):
                return False
            self._check_round(result.round_number)
        self._check_result(result)
        key = (result.collaborator, result.task_name)
        if not self._reserve(result):
            return False
        try:
            try:
                accepted = self.store.stage(result)
            except StorageError:
                with self._lock:  # a round that closed meanwhile is the better answer
                    self._check_round(result.round_number)
                raise
            try:
                with self._lock:
                    self._check_round(result.round_number)  # it may have closed while staging
                    self.store.record(accepted)
                    self._results[key] = accepted
            except BaseException:
                self.store.discard(accepted)
                raise
        finally:
            with self._lock:
                self._pending.pop(key).set()
        self._submitted.set()
        return True

    def results(self) -> tuple[TaskResult, ...]:
        """The results accepted this round, in a fixed order (collaborator, then task)."""
        return tuple(self.store.load(item) for item in self.accepted())

    def accepted(self) -> tuple[Accepted, ...]:
        """The index of the results accepted this round, in order (collaborator, then task)."""
        with self._lock:
            return tuple(self._results[key] for key in sorted(self._results))

    def wait_for_submission(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a result accepted since the last call; for one caller only."""
        arrived = self._submitted.wait(timeout)
        self._submitted.clear()
        return arrived

    def _reserve(self, result: TaskResult) -> bool:
        """Claim the right to store `result`; False if it turns out to be a resend meanwhile.

        A second upload of the same result while the first is being stored waits for it, and
        is then a resend (answered OK) or, if the first failed, stored in its place.
        """
        key = (result.collaborator, result.task_name)
        while True:
            with self._lock:
                if self._is_resend(result.collaborator, result.round_number, result.task_name):
                    return False
                self._check_round(result.round_number)
                pending = self._pending.get(key)
                if pending is None:
                    self._pending[key] = threading.Event()
                    return True
            pending.wait()

    @property
    def _refusing(self) -> bool:
        """Whether the round in progress is closing, so refuses results (call under the lock)."""
        return self._closing or self._decided is not None

    def _is_resend(self, collaborator: str, round_number: int, task_name: str) -> bool:
        key = (collaborator, task_name)
        if round_number == self._round:
            return key in self._results
        return round_number == self._round - 1 and key in self._previous

    def _check_round(self, round_number: int) -> None:
        if round_number < 0:
            raise InvalidRequestError(f"round_number must be 0 or more, got {round_number}")
        closed = round_number < self._round or (round_number == self._round and self._refusing)
        if closed:
            after = self._round if round_number < self._round else self._round + 1
            where = (
                "the federation has finished"
                if after >= self.total_rounds
                else f"the federation is in round {after}"
            )
            raise PreconditionError(f"round {round_number} is closed; {where}")
        if self.finished:
            raise PreconditionError(
                f"round {round_number}: the federation has finished all its rounds"
            )
        if round_number != self._round:
            raise PreconditionError(
                f"round {round_number} is not the round in progress ({self._round})"
            )

    def check_arriving(self, collaborator: str, round_number: int, task_name: str) -> None:
        """Refuse a result now, before its tensors arrive, if it would be refused whatever they hold.

        A resend of an accepted result passes (it is answered OK once it has arrived).
        """
        with self._lock:
            if not self._is_resend(collaborator, round_number, task_name):
                self._check_round(round_number)
        self._check_task(round_number, task_name)

    def model_dtype(self, name: str) -> np.dtype[np.generic] | None:
        """The dtype of the global model's tensor `name` (None: no such tensor)."""
        with self._lock:
            array = self._model.get(name)
        return None if array is None else array.dtype

    def _check_task(self, round_number: int, task_name: str) -> None:
        if task_name not in self.tasks:
            raise InvalidRequestError(
                f"task {task_name!r} is not a task of this federation ({', '.join(self.tasks)})"
            )
        round_tasks = self.tasks_of_round(round_number)
        if task_name not in round_tasks:
            raise PreconditionError(
                f"task {task_name!r} is not a task of round {round_number} "
                f"(the final validation round runs {', '.join(round_tasks)} only)"
            )

    def _check_result(self, result: TaskResult) -> None:
        """Every check of a result that does not depend on the round's progress."""
        self._check_task(result.round_number, result.task_name)
        if not 0 < result.data_size <= MAX_DATA_SIZE:
            raise InvalidRequestError(
                f"data_size must be a positive number of samples, got {result.data_size}"
            )
        if result.data_size > self.limits.max_data_size:
            raise InvalidRequestError(
                f"data_size {result.data_size} is over the plan's limit of "
                f"{self.limits.max_data_size} samples (limits.max_data_size)"
            )
        self._check_tensors(result.task_name, result.tensors)
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

    def _check_tensors(self, task: str, tensors: Sequence[ResultTensor]) -> None:
        names = [tensor.name for tensor in tensors]
        if len(set(names)) != len(names):
            raise InvalidRequestError("results name the same tensor more than once")
        model_tensors: set[str] = set()
        for tensor in tensors:
            if METRIC_TAG in tensor.tags:
                if tensor.array.size != 1 or wire_dtype(tensor.array.dtype) is None:
                    raise InvalidRequestError(
                        f"metric {tensor.name!r} must be a numeric scalar, got "
                        f"{tensor.array.dtype}{list(tensor.array.shape)}"
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
            if DELTA_TAG in tensor.tags:
                raise InvalidRequestError(
                    f"tensor {tensor.name!r} is a delta update; foedus averages whole weights "
                    "(turn delta updates off in the collaborator)"
                )
            model_tensors.add(tensor.name)
        if task == TRAIN:
            missing = sorted(set(self._model) - model_tensors)
            if missing:
                shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
                raise InvalidRequestError(
                    f"train results lack {len(missing)} tensor(s) of the global model: {shown}"
                )

    # -- closing rounds ---------------------------------------------------------------------------

    def close_round_if_due(
        self, *, on_close: Callable[[], object] | None = None
    ) -> RoundSummary | None:
        """Close the round if the straggler policy says so: aggregate, move on, wake the waiters.

        A close decided before a restart (`Progress.closing`) is due at once, with the same
        reporters. The round is committed to the store before anyone sees the next round.
        `on_close` is called once the close is decided, before the results are read (the
        runtime gives the memory the uploads freed back to the system then).
        """
        with self._lock:
            if self.finished or self._closing:
                return None
            round_number = self._round
            round_tasks = self.tasks_of_round(round_number)
            decided = self._decided
            if decided is None:
                reporters = self._reporters()
                if not self._due(reporters):
                    return None
            else:
                reporters = decided
            self._closing = True  # results for this round are refused from now on
            counted = [self._results[key] for key in sorted(self._results) if key[0] in reporters]
            round_model = self._model
            started = self._opened_at if self._started_at is None else self._started_at
        try:
            if decided is None:
                self.store.decide_close(round_number, reporters)
                with self._lock:
                    self._decided = reporters
            if on_close is not None:
                on_close()
            with self._averaging(counted, round_model, round_tasks) as (averaged, metrics, sites):
                best, best_is_round_model = self._improved_best(round_number, metrics)
                now = self._clock()
                summary = RoundSummary(
                    round_number=round_number,
                    final_validation=round_number >= self.rounds,
                    reporters=reporters,
                    missing=tuple(sorted(set(self.collaborators) - set(reporters))),
                    metrics=metrics,
                    round_model=round_model,
                    model=round_model,  # until the new one is kept
                    trained=averaged is not None,
                    seconds=max(0.0, now - started),
                    finished=round_number + 1 >= self.total_rounds,
                    sites=sites,
                    best=best or self._best,
                )
                kept = self.store.commit_round(
                    RoundCommit(
                        record=summary.record,
                        model=averaged,
                        best=best,
                        best_is_round_model=best_is_round_model,
                    )
                )
        except BaseException:
            with self._lock:
                self._closing = False
            raise
        model = round_model if kept is None else kept
        summary = dataclasses.replace(
            summary,
            model=model,
            best_model=None if best is None else round_model if best_is_round_model else model,
        )
        with self._round_changed:
            self._model = model
            self._previous = frozenset(self._results)
            self._results = {}
            self._round += 1
            self._decided = None
            self._best = summary.best
            self._opened_at = now
            self._started_at = None
            self._closing = False
            self._round_changed.notify_all()
        return summary

    def _reporters(self) -> tuple[str, ...]:
        """Who has finished every task of the round in progress, sorted (call under the lock)."""
        round_tasks = self.tasks_of_round(self._round)
        return tuple(
            name
            for name in sorted(self.collaborators)
            if all((name, task) in self._results for task in round_tasks)
        )

    def _due(self, reporters: Sequence[str]) -> bool:
        """Whether the straggler policy closes the round now that `reporters` have reported."""
        reported = len(reporters)
        if reported >= len(self.collaborators):
            return True
        policy = self.straggler
        # Who is still awaited: not left, and (when the plan judges silences) not offline.
        if policy.offline_after_seconds is not None:
            awaited = self.liveness.awaited()
        else:
            awaited = self.liveness.staying()
        if reported >= max(1, policy.min_reports) and awaited <= set(reporters):
            return True
        if policy.policy is StragglerPolicy.CUTOFF:
            if self._started_at is None or reported < policy.min_reports:
                return False
            return self._clock() - self._started_at >= policy.cutoff_seconds
        if policy.policy is StragglerPolicy.PERCENTAGE:
            # Rounded first, so 0.3 * 10 counts as 3 and not as 3.0000000000000004 -> 4.
            needed = math.ceil(round(policy.percentage * len(self.collaborators), 9))
            return reported >= max(needed, policy.min_reports)
        return False

    @contextmanager
    def _averaging(
        self, counted: Sequence[Accepted], model: Mapping[str, Array], tasks: Sequence[str]
    ) -> Iterator[tuple[AveragedModel | None, dict[str, dict[str, float]], SiteMetrics]]:
        """The next global model, still to be averaged (None: no `train` result), the metrics'
        means and each site's own metrics; the results' files stay open until the block ends.

        The `train` results are averaged a slice at a time from where the store keeps them
        (their files read in collaborator order) into where the store keeps the new model, so
        memory stays a few slices whatever the model's size and the number of collaborators.
        """
        reported: dict[str, dict[str, tuple[int, dict[str, float]]]] = {}
        contributions: dict[str, tuple[int, TensorSource]] = {}
        sources: list[MappedArraySource] = []
        try:
            for accepted in counted:
                result = self.store.load(accepted)
                metrics = {
                    t.name: float(np.asarray(t.array, dtype=np.float64).reshape(-1)[0])
                    for t in result.tensors
                    if METRIC_TAG in t.tags
                }
                reported.setdefault(result.task_name, {})[result.collaborator] = (
                    result.data_size,
                    metrics,
                )
                if result.task_name == TRAIN:
                    source = MappedArraySource(
                        {t.name: t.array for t in result.tensors if METRIC_TAG not in t.tags}
                    )
                    sources.append(source)
                    contributions[result.collaborator] = (result.data_size, source)
            failpoint("while_aggregating")
            averaged: dict[str, dict[str, float]] = {}
            for task in tasks:
                means = weighted_metrics(reported.get(task, {}))
                if means:
                    averaged[task] = means
            sites: dict[str, dict[str, dict[str, float]]] = {}
            for task in sorted(reported):  # sorted throughout: a restart writes the same row
                for collaborator, (_, values) in sorted(reported[task].items()):
                    if values:
                        sites.setdefault(collaborator, {})[task] = dict(sorted(values.items()))
            new_model = AveragedModel(model, contributions) if contributions else None
            yield new_model, averaged, dict(sorted(sites.items()))
        finally:
            for source in sources:
                source.close()

    def _improved_best(
        self, round_number: int, metrics: Mapping[str, Mapping[str, float]]
    ) -> tuple[Best | None, bool]:
        """The new best, when this round improved the plan's best-model metric, and whether its
        model is the round's (validated before training) rather than the new one."""
        settings = self.best_model
        if settings is None:
            return None, False
        value = metrics.get(settings.task, {}).get(settings.metric)
        if value is None or not math.isfinite(value):
            return None, False
        best = self._best
        if best is not None and not (
            value > best.value if settings.maximize else value < best.value
        ):
            return None, False
        # aggregated_model_validation measured the model the round started from; the other
        # tasks measured local models, of which the round's aggregate is the global counterpart.
        validated_before = settings.task == AGGREGATED_MODEL_VALIDATION
        rounds = min(round_number + (0 if validated_before else 1), self.rounds)
        return Best(value, rounds), validated_before
