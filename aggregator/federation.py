"""The federation's state, in plain Python: rounds, tasks, the global model and accepted results.

The servicer hands decoded requests to a `Federation` and encodes what it answers; nothing here
knows about gRPC or protobuf, so tests drive it directly. `Federation` is the facade that holds the
lock and the records of the round in progress (`foedus.aggregator.schedule.RoundState`) and calls
the parts that each do one job: `foedus.aggregator.checks` refuses what arrives,
`foedus.aggregator.schedule` hands out tasks and says when a round closes (the straggler policy,
leaving, the final validation round), `foedus.aggregator.closing` closes it (averaging, the best
model). With the plan's `secure_aggregation` on, `foedus.aggregator.secure_stages` runs each
training round's secure stages (`post_secure`, `secure_relay`), the masked uploads are checked
for it, and the round's close waits for its unmasking. With `differential_privacy` on, each
round's new model is the sites' clipped updates, noised (`foedus.aggregator.dp_model`; with
secure aggregation too, the sites clip and noise theirs, `foedus.privacy.shares`, and the
unmasked sum is the new model), and the federation runs the training rounds its budget allows
(`foedus.privacy.budget`).

Every check runs before anything is stored, and a resend of an accepted result is recognised and
counted once (`foedus.aggregator.checks` says which results are refused). A collaborator's departure
(`leave`) is made durable (`FederationStore.record_leave`) before `Leave` is answered; a resend
changes nothing. Any later call of its but `Leave` and `Heartbeat` rejoins it (`rejoin`, durable
too), and it is awaited again from the next decision on.

Where results live: a `FederationStore`. `MemoryStore` (the default) keeps them in memory;
`foedus.aggregator.state.DurableState` writes them to disk so that a restarted aggregator resumes
(`Progress` is what it recovers). The order of an accept is: every check in memory, then
`stage` (the tensors are written where they survive), then, under the lock and after checking
the round again, `record` (the commit point), then OK. The federation keeps only an index of
accepted results (`Accepted`); tensors are read back from the store, in collaborator order, when
the round is aggregated (`foedus.aggregator.closing` says in which order a close is made durable).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from foedus.aggregator.checks import ResultChecks
from foedus.aggregator.closing import RoundCloser
from foedus.aggregator.dp_model import Privacy
from foedus.aggregator.liveness import Departure, Liveness, clean_reason, reporting_threshold
from foedus.aggregator.records import (
    Accepted,
    Array,
    Assignment,
    Best,
    Key,
    Progress,
    RoundSummary,
    Stranded,
    TaskResult,
)
from foedus.aggregator.schedule import RoundState, Schedule
from foedus.aggregator.secure_stages import SecureStages
from foedus.aggregator.store import FederationStore, MemoryStore
from foedus.plans.schema import (
    TRAIN,
    BestModelSettings,
    DifferentialPrivacySettings,
    Limits,
    Plan,
    SecureAggregationSettings,
    StragglerSettings,
)
from foedus.privacy.budget import training_rounds
from foedus.refusals.errors import InvalidRequestError, PreconditionError, StorageError
from foedus.secure.wire import Post, Relay, Stage

logger = logging.getLogger(__name__)


class Federation:
    """Round bookkeeping behind the aggregator's RPCs; thread-safe with short critical sections.

    `clock` times the straggler cut-off and the collaborators' silences (tests inject one that
    moves when told); long polls wait in real time. With `progress`, the federation resumes from
    there instead of round 0 of `model`. `liveness` judges who is online (by default from `straggler`, or from
    a silence of `reporting_threshold` when the plan sets no `offline_after_seconds`). With
    `secure` enabled, its training rounds aggregate securely (`federation_uuid` binds them);
    with `privacy` enabled, by DP-FedAvg (its noise secret made by the store, once).
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
        secure: SecureAggregationSettings | None = None,
        federation_uuid: str = "",
        privacy: DifferentialPrivacySettings | None = None,
    ) -> None:
        straggler = straggler or StragglerSettings()
        self.schedule = Schedule(
            collaborators=collaborators,
            tasks=tasks,
            rounds=rounds,
            straggler=straggler,
            poll_seconds=poll_seconds,
            clock=clock,
        )
        self.collaborators = self.schedule.collaborators
        self.rounds = rounds
        self.final_validation = self.schedule.final_validation
        self.best_model = best_model
        self.store: FederationStore = store if store is not None else MemoryStore(model)
        self._checks = ResultChecks(
            self.schedule, limits or Limits(), secure=secure is not None and secure.enabled
        )
        self._wall = wall
        self.liveness = liveness or Liveness(
            self.collaborators,
            straggler.offline_after_seconds or reporting_threshold(heartbeat_seconds),
            clock=clock,
            wall=wall,
        )
        start = progress or Progress(round_number=0, model=model)
        for departure in start.departures:
            if departure.name in self.collaborators:
                self.liveness.leave(departure)
        self._state = RoundState(
            number=start.round_number,
            # asanyarray: a model mapped from its file stays mapped (`np.memmap`), holding no memory.
            model={name: np.asanyarray(array) for name, array in start.model.items()},
            results={item.key: item for item in start.accepted},
            previous=start.previous,
            decided=start.closing,
            best=start.best,
            opened_at=clock(),
        )
        self._pending: dict[Key, threading.Event] = {}  # results being staged right now
        self.secure: SecureStages | None = None
        if secure is not None and secure.enabled:
            self.secure = SecureStages(
                federation_uuid=federation_uuid,
                collaborators=self.collaborators,
                settings=secure,
                rounds=rounds,
                store=self.store,
                liveness=self.liveness,
                straggler=straggler,
                clock=clock,
            )
            self.secure.open_round(
                start.round_number,
                finished=self.schedule.finished(self._state),
                posts=start.secure_posts,
                closes=start.secure_closes,
                survivors=start.closing,
            )
        self._lock = threading.Lock()
        self._round_changed = threading.Condition(self._lock)
        self.privacy: Privacy | None = None
        # The secret before any round's noise; under secure aggregation the sites add the noise
        # (`foedus.privacy.shares`): the aggregator adds none and keeps no secret.
        if privacy is not None and privacy.enabled and self.secure is None:
            self.privacy = Privacy(privacy, self.store.privacy_secret())
            if privacy.adaptive_clipping is not None:  # the round's clip: as kept, or the plan's
                self._state.clip = privacy.clip if start.clip is None else start.clip
        self._closer = RoundCloser(
            self.schedule,
            self.store,
            clock,
            self._round_changed,
            secure=self.secure,
            privacy=self.privacy,
        )
        with self._lock:
            self._closer.prepare(self._state)
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
        """The federation a plan describes, starting from `model` (or resuming at `progress`);
        with differential privacy, as many training rounds as its budget allows."""
        return cls(
            collaborators=plan.collaborators,
            tasks=plan.tasks,
            rounds=training_rounds(plan),
            model=model,
            straggler=plan.straggler,
            clock=clock,
            best_model=plan.best_model,
            limits=plan.limits,
            store=store,
            progress=progress,
            heartbeat_seconds=plan.connection.heartbeat_seconds,
            secure=plan.secure_aggregation,
            federation_uuid=plan.federation.uuid,
            privacy=plan.differential_privacy,
        )

    @property
    def round_number(self) -> int:
        """The round in progress (counted from 0, as OpenFL does); the schedule's total when done."""
        return self._state.number

    @property
    def finished(self) -> bool:
        """Whether every round has closed (`Schedule.finished`)."""
        return self.schedule.finished(self._state)

    @property
    def best(self) -> Best | None:
        """The best value of the plan's best-model metric so far (None: none yet, or no metric)."""
        return self._state.best

    def online_count(self) -> int:
        """How many collaborators are online now (see `foedus.aggregator.liveness`)."""
        return self.liveness.online_count()

    # -- handing out work -------------------------------------------------------------------------

    def assignment(self, collaborator: str) -> Assignment:
        """What `collaborator` is to do now: tasks, wait or quit (`Schedule.assignment`)."""
        with self._lock:
            return self.schedule.assignment(self._state, collaborator)

    def wait_for_assignment(
        self, collaborator: str, timeout: float, *, cancel: threading.Event | None = None
    ) -> Assignment:
        """Like `assignment`, but wait up to `timeout` s for tasks or quit (a long poll).

        Setting `cancel` and then calling `wake_waiters` ends the wait at once.
        """
        deadline = time.monotonic() + timeout
        with self._round_changed:
            while True:
                answer = self.schedule.assignment(self._state, collaborator)
                remaining = deadline - time.monotonic()
                cancelled = cancel is not None and cancel.is_set()
                if answer.tasks or answer.quit or remaining <= 0 or cancelled:
                    return answer
                self._round_changed.wait(remaining)

    def wake_waiters(self) -> None:
        """Make every `wait_for_assignment` and `secure_relay` look again now (to see that it
        was cancelled)."""
        with self._round_changed:
            self._round_changed.notify_all()
        if self.secure is not None:
            self.secure.wake()

    def told_to_quit(self) -> tuple[str, ...]:
        """The collaborators that have been told to quit, sorted."""
        with self._lock:
            return tuple(sorted(self._state.told_quit))

    def everyone_told_to_quit(self) -> bool:
        """Whether every collaborator of the plan has been told to quit (or has left)."""
        staying = self.liveness.staying()
        with self._lock:
            return self._state.told_quit.issuperset(staying)

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
        """Why the round in progress can never close because too many have left; None if it can
        (`Schedule.stranded`)."""
        departures = self.liveness.departures()
        if not departures:
            return None
        staying = self.liveness.staying()
        with self._lock:
            return self.schedule.stranded(self._state, staying, departures)

    # -- the global model -------------------------------------------------------------------------

    def global_tensor(self, name: str, round_number: int) -> Array:
        """The global model's tensor `name` for the round in progress."""
        with self._lock:
            array = self._state.model.get(name)
            if array is None:
                raise InvalidRequestError(f"tensor {name!r} is not in the global model")
            self._checks.round(self._state, round_number)
            return array

    def global_tensors(self, names: Sequence[str], round_number: int) -> list[tuple[str, Array]]:
        """The global model's tensors `names` (all, in name order, when empty) for the round in progress.

        All from the same model: a round that closes meanwhile cannot mix two rounds' tensors.
        """
        if len(set(names)) != len(names):
            raise InvalidRequestError("the request names a tensor more than once")
        with self._lock:
            model = self._state.model
            missing = [name for name in names if name not in model]
            if missing:
                shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
                raise InvalidRequestError(f"not in the global model: {shown}")
            self._checks.round(self._state, round_number)
            return [(name, model[name]) for name in (names or sorted(model))]

    def model(self) -> Mapping[str, Array]:
        """The global model of the round in progress."""
        with self._lock:
            return dict(self._state.model)

    def model_dtype(self, name: str) -> np.dtype[np.generic] | None:
        """The dtype of the global model's tensor `name` (None: no such tensor)."""
        with self._lock:
            array = self._state.model.get(name)
        return None if array is None else array.dtype

    # -- results ----------------------------------------------------------------------------------

    def check_arriving(self, collaborator: str, round_number: int, task_name: str) -> None:
        """Refuse a result now, before its tensors arrive, if it would be refused whatever they hold.

        A resend of an accepted result passes (it is answered OK once it has arrived).
        """
        with self._lock:
            if not self._state.is_resend(collaborator, round_number, task_name):
                self._checks.round(self._state, round_number)
        self._checks.task(round_number, task_name)

    def submit(self, result: TaskResult) -> bool:
        """Accept a task's results; False when it is a resend of one already accepted.

        Refusals and resends are decided before anything is written; an accepted result is in
        the store for good (`FederationStore.record`) before this returns True.
        """
        with self._lock:  # the cheap refusals first; checked again below
            if self._state.is_resend(result.collaborator, result.round_number, result.task_name):
                return False
            self._checks.round(self._state, result.round_number)
        ring = self._ring(result.round_number, result.task_name)
        self._checks.result(result, self._state.model, ring=ring)
        if ring is not None and self.secure is not None:  # after the tensors: a plaintext
            # update from a site outside U2 (an OpenFL collaborator) is told it is plaintext
            self.secure.check_member(result.collaborator, result.round_number)
        key = (result.collaborator, result.task_name)
        if not self._reserve(result):
            return False
        try:
            try:
                accepted = self.store.stage(result)
            except StorageError:
                with self._lock:  # a round that closed meanwhile is the better answer
                    self._checks.round(self._state, result.round_number)
                raise
            try:
                with self._lock:
                    # it may have closed while staging
                    self._checks.round(self._state, result.round_number)
                    self.store.record(accepted)
                    self._state.results[key] = accepted
                    self._closer.accepted(accepted)
            except BaseException:
                self.store.discard(accepted)
                raise
        finally:
            with self._lock:
                self._pending.pop(key).set()
        self._submitted.set()
        return True

    def _ring(self, round_number: int, task_name: str) -> np.dtype[np.generic] | None:
        """The dtype of a masked update, when this result is one (a secure round's `train`)."""
        if self.secure is None or task_name != TRAIN or round_number >= self.rounds:
            return None
        return self.secure.fixed_point.dtype

    # -- secure aggregation -----------------------------------------------------------------------

    def post_secure(self, caller: str, post: Post, data: bytes) -> bool:
        """Accept `caller`'s post to a secure stage (`SecureStages.post`); False for a resend."""
        accepted = self._secure_stages().post(caller, post, data)
        if accepted:
            self._submitted.set()  # the runtime looks at once whether the round can close now
        return accepted

    def secure_relay(
        self,
        caller: str,
        round_number: int,
        stage: Stage,
        timeout: float,
        *,
        cancel: threading.Event | None = None,
    ) -> Relay:
        """What a closed secure stage relays to `caller`, waiting up to `timeout` s for it."""
        return self._secure_stages().wait_for_relay(
            caller, round_number, stage, timeout, cancel=cancel
        )

    def _secure_stages(self) -> SecureStages:
        if self.secure is None:
            raise PreconditionError(
                "this federation does not aggregate securely (its plan's "
                "secure_aggregation.enabled is false): there are no secure stages"
            )
        return self.secure

    def results(self) -> tuple[TaskResult, ...]:
        """The results accepted this round, in a fixed order (collaborator, then task)."""
        return tuple(self.store.load(item) for item in self.accepted())

    def accepted(self) -> tuple[Accepted, ...]:
        """The index of the results accepted this round, in order (collaborator, then task)."""
        with self._lock:
            results = self._state.results
            return tuple(results[key] for key in sorted(results))

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
                if self._state.is_resend(
                    result.collaborator, result.round_number, result.task_name
                ):
                    return False
                self._checks.round(self._state, result.round_number)
                pending = self._pending.get(key)
                if pending is None:
                    self._pending[key] = threading.Event()
                    return True
            pending.wait()

    # -- closing rounds ---------------------------------------------------------------------------

    def wait_prepared(self, timeout: float) -> bool:
        """Wait up to `timeout` s for what the round in progress's close can have made while it
        is open (a DP round's noise and its uploads' clip factors); whether it is made."""
        with self._lock:
            ahead = self._closer.ahead()
        return ahead is None or ahead.join(timeout)

    def stop(self) -> None:
        """Stop the work done ahead for the round in progress's close (a DP round's noise): the
        aggregator is stopping. A later close computes what it needs itself."""
        with self._lock:
            self._closer.stop()

    def close_round_if_due(
        self, *, on_close: Callable[[], object] | None = None
    ) -> RoundSummary | None:
        """Close the round if the straggler policy says so (`RoundCloser.close_if_due`), and
        first the secure stages that are due."""
        if self.secure is not None:
            self.secure.advance()
        return self._closer.close_if_due(
            self._state, liveness=self.liveness, best_model=self.best_model, on_close=on_close
        )
