"""A round's close: who counted, the averaged model and metrics, the best model, made durable.

On close, the reporters' ``train`` results are averaged by data size (`foedus.aggregator.fedavg`)
into the next global model, and each task's metrics into weighted means; each reporter's own metrics
are kept beside them (`RoundRecord.sites`). A site that kept its metrics (a secure federation's
`collaborator start --keep-metrics`) counts as a reporter but is in neither: each mean is over the
sites that sent that metric, and a task nobody sent a metric of has no means. The plan's best-model metric is tracked here too
(`Best`).

A round's close is made durable in two steps: `FederationStore.decide_close` fixes who reported (so
a round killed while aggregating is recomputed from the very same results), then
`FederationStore.commit_round` moves to the next round with its model, the round's record and the
best score. The new model is handed to it still to be averaged (`AveragedModel`): the store
averages it a slice at a time into wherever it keeps it and hands it back as kept
(`DurableState`: its file, mapped), so no copy of the model is made in memory. Aggregation runs
outside the federation's lock, while the closing round refuses results.

A secure round (`foedus.aggregator.secure_stages`) closes in the same two steps, with its
unmasking between them: `decide_close` fixes the reporters (the survivors among them), then the
round waits, refusing results, for its SURVIVORS and UNMASK stages; once they have closed, the
new model is the survivors' unmasked sum (`SecureModel`) instead of an average. A round whose
secure stages failed closes at once, untrained. Its record keeps each step's time, who dropped
out in it and, when it closed untrained, why (`SecureStages.record`).

A round of a federation with differential privacy (the plan's `differential_privacy`) closes in
the same two steps; its new model is the reporters' clipped updates, summed, noised and divided
by their number (`foedus.aggregator.dp_model`) instead of the weighted average. Its uploads'
clip factors and its noise are made while it is open (`prepare`, `accepted`: a thread of the
round's own, `foedus.aggregator.dp_ahead`), and the close computes what was not made by then.
With secure aggregation too, the sites clipped theirs and added their noise shares before
masking (`foedus.privacy.shares`), each weighing 1: the secure round's unmasked sum over the
survivors' summed weight is that model already (nothing is made ahead for it). Under adaptive
clipping (`foedus.privacy.adaptive`) each round clips to its own clip (`RoundState.clip`, known
when it opens, so made ahead too), and its close computes the next round's, kept in the round's
record (`RoundRecord.next_clip`) by the same commit as the new model.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager

import numpy as np

from foedus.aggregator.dp_ahead import RoundAhead
from foedus.aggregator.dp_model import Privacy, PrivateModel
from foedus.aggregator.failpoints import failpoint
from foedus.aggregator.fedavg import MappedArraySource, TensorSource, weighted_metrics
from foedus.aggregator.liveness import Liveness
from foedus.aggregator.records import (
    METRIC_TAG,
    Accepted,
    Array,
    AveragedModel,
    Best,
    NextModel,
    RoundCommit,
    RoundSummary,
    SiteMetrics,
    TaskResult,
)
from foedus.aggregator.schedule import RoundState, Schedule
from foedus.aggregator.secure_stages import SecureStages
from foedus.aggregator.store import FederationStore
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION, TRAIN, BestModelSettings


class RoundCloser:
    """Closes a federation's rounds when its schedule says so, under the federation's lock.

    `round_changed` is the condition over that lock: the waiters on it are woken once the next
    round is in `state`. With `secure`, training rounds close by its stages as well.
    """

    def __init__(
        self,
        schedule: Schedule,
        store: FederationStore,
        clock: Callable[[], float],
        round_changed: threading.Condition,
        *,
        secure: SecureStages | None = None,
        privacy: Privacy | None = None,
    ) -> None:
        self.schedule = schedule
        self.privacy = privacy
        self.store = store
        self._clock = clock
        self._round_changed = round_changed
        self.secure = secure
        self._ahead: RoundAhead | None = None  # a DP round's factors and noise, made while open

    def prepare(self, state: RoundState) -> None:
        """Start what the close of the round in progress needs before any result: a DP round's
        noise (not a secure federation's: its sites add it). Under the federation's lock."""
        if self._ahead is not None:
            self._ahead.stop()
            self._ahead = None
        if (
            self.privacy is None
            or self.secure is not None
            or self.schedule.finished(state)
            or state.number >= self.schedule.rounds  # the final validation round trains nothing
        ):
            return
        self._ahead = self.privacy.ahead(state.number, state.model, clip=state.clip)
        for accepted in state.results.values():  # kept across a restart
            self.accepted(accepted)

    def accepted(self, accepted: Accepted) -> None:
        """A result of the round in progress was accepted: a DP round's `train` upload has its
        clip factor made now. Under the federation's lock."""
        ahead = self._ahead
        if ahead is None or accepted.task_name != TRAIN:
            return
        if accepted.round_number == ahead.round_number:
            ahead.accepted(accepted.collaborator, lambda: self._opened(accepted))

    def ahead(self) -> RoundAhead | None:
        """What is being made ahead for the close of the round in progress (None: nothing)."""
        return self._ahead

    def stop(self) -> None:
        """Make nothing more ahead (the aggregator is stopping). Under the federation's lock."""
        if self._ahead is not None:
            self._ahead.stop()

    def _opened(self, accepted: Accepted) -> AbstractContextManager[TensorSource]:
        """An accepted upload's tensors, open for reading until the block ends."""
        return closing(_model_source(self.store.load(accepted)))

    def close_if_due(
        self,
        state: RoundState,
        *,
        liveness: Liveness,
        best_model: BestModelSettings | None,
        on_close: Callable[[], object] | None = None,
    ) -> RoundSummary | None:
        """Close the round if the straggler policy says so: aggregate, move on, wake the waiters.

        A close decided before a restart (`Progress.closing`) is due at once, with the same
        reporters. The round is committed to the store before anyone sees the next round.
        `on_close` is called once the close is decided, before the results are read (the
        runtime gives the memory the uploads freed back to the system then).
        """
        schedule = self.schedule
        with self._round_changed:
            if schedule.finished(state) or state.closing:
                return None
            round_number = state.number
            round_tasks = schedule.tasks_of_round(round_number)
            secure = self.secure if self.secure is not None and self.secure.active else None
            decided = state.decided
            reporters = self._reporters(state, liveness, secure)
            if reporters is None:
                return None
            state.closing = True  # results for this round are refused from now on
            counted = [state.results[key] for key in sorted(state.results) if key[0] in reporters]
            round_model, clip = state.model, state.clip  # clip: adaptive clipping's
            started = state.opened_at if state.started_at is None else state.started_at
        try:
            if decided is None and not self._decide(state, reporters, secure):
                return None
            with self._round_changed:
                ahead, self._ahead = self._ahead, None
            if ahead is not None:
                ahead.stop()  # the close has the machine from now on; it makes what is left
            if on_close is not None:
                on_close()
            with self._averaging(
                counted, round_model, round_tasks, round_number, secure, ahead=ahead, clip=clip
            ) as (averaged, metrics, sites):
                round_clip, next_clip = self._clips(clip, averaged, round_number)
                best, best_is_round_model = improved_best(
                    best_model, state.best, round_number, metrics, rounds=schedule.rounds
                )
                stages, untrained = secure.record(started) if secure is not None else ((), "")
                now = self._clock()
                summary = RoundSummary(
                    round_number=round_number,
                    final_validation=round_number >= schedule.rounds,
                    reporters=reporters,
                    missing=tuple(sorted(set(schedule.collaborators) - set(reporters))),
                    metrics=metrics,
                    round_model=round_model,
                    model=round_model,  # until the new one is kept
                    trained=averaged is not None,
                    seconds=max(0.0, now - started),
                    finished=round_number + 1 >= schedule.total_rounds,
                    sites=sites,
                    best=best or state.best,
                    secure=secure is not None,
                    stages=stages,
                    untrained=untrained,
                    clip=round_clip,
                    next_clip=next_clip,
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
            with self._round_changed:
                state.closing = False  # tried again, it computes all it needs itself
            raise
        model = round_model if kept is None else kept
        summary = dataclasses.replace(
            summary,
            model=model,
            best_model=None if best is None else round_model if best_is_round_model else model,
        )
        with self._round_changed:
            state.model = model
            state.previous = frozenset(state.results)
            state.results = {}
            state.number += 1
            state.decided = None
            state.best = summary.best
            state.opened_at = now
            state.started_at = None
            state.closing = False
            state.clip = next_clip
            if self.secure is not None:
                self.secure.open_round(state.number, finished=schedule.finished(state))
            self.prepare(state)
            self._round_changed.notify_all()
        return summary

    def _clips(
        self, clip: float | None, averaged: NextModel | None, round_number: int
    ) -> tuple[float | None, float | None]:
        """Under adaptive clipping (`clip`, the round's, is not None), the clip a closing round
        used (None: the final validation round, which trains nothing) and the next round's:
        moved by the round's noisy count of unclipped updates, the same if nobody trained."""
        if clip is None or self.privacy is None:
            return None, None
        if round_number >= self.schedule.rounds:
            return None, clip
        if isinstance(averaged, PrivateModel):
            return clip, self.privacy.next_clip(clip, averaged, round_number)
        return clip, clip

    def _reporters(
        self, state: RoundState, liveness: Liveness, secure: SecureStages | None
    ) -> tuple[str, ...] | None:
        """Who counts in the round's close if it is due now (None: not due); under the lock.

        Decided before (or before a restart): the same reporters, once a secure round's
        survivors have confirmed and revealed their shares. A secure round whose stages failed
        is due at once.
        """
        decided = state.decided
        if decided is not None:
            if secure is not None and not secure.done():
                return None  # its survivors are confirming, or revealing shares
            return decided
        reporters = self.schedule.reporters(state)
        if secure is None:
            return reporters if self.schedule.due(state, reporters, liveness) else None
        if secure.failure() is not None:
            return reporters
        excluded = secure.excluded()  # they can no longer report: not awaited
        due = self.schedule.due(state, reporters, liveness, excluded=excluded)
        return reporters if due else None

    def _decide(
        self, state: RoundState, reporters: tuple[str, ...], secure: SecureStages | None
    ) -> bool:
        """Fix the reporters for good; False when a secure round waits for its unmasking now."""
        self.store.decide_close(state.number, reporters)
        with self._round_changed:
            state.decided = reporters
            if secure is not None:
                secure.decide(reporters)  # SURVIVORS opens: the round waits for it
                if not secure.done():
                    state.closing = False
                    return False
        return True

    @contextmanager
    def _averaging(
        self,
        counted: Sequence[Accepted],
        model: Mapping[str, Array],
        tasks: Sequence[str],
        round_number: int,
        secure: SecureStages | None = None,
        *,
        ahead: RoundAhead | None = None,
        clip: float | None = None,
    ) -> Iterator[tuple[NextModel | None, dict[str, dict[str, float]], SiteMetrics]]:
        """The next global model, still to be averaged (None: no `train` result), the metrics'
        means and each site's own metrics; the results' files stay open until the block ends.
        With `secure`, the round's: the survivors' masked uploads unmasked (None: untrained).
        With differential privacy (`self.privacy`), the clipped updates' noised mean
        (`foedus.aggregator.dp_model`), with what `ahead` made of it; `clip`: the round's
        under adaptive clipping.

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
                    source = _model_source(result)
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
            new_model: NextModel | None = None
            if secure is not None:  # also without uploads: it says why the round is untrained
                uploads = {name: source for name, (_, source) in contributions.items()}
                new_model = secure.next_model(model, uploads)
            elif contributions and self.privacy is not None:
                uploads = {name: source for name, (_, source) in contributions.items()}
                new_model = self.privacy.next_model(
                    model, uploads, round_number, clip=clip, ahead=ahead
                )
            elif contributions:
                new_model = AveragedModel(model, contributions)
            yield new_model, averaged, dict(sorted(sites.items()))
        finally:
            for source in sources:
                source.close()


def _model_source(result: TaskResult) -> MappedArraySource:
    """A `train` result's model (its tensors but the metrics), read from its files (`close` it)."""
    return MappedArraySource({t.name: t.array for t in result.tensors if METRIC_TAG not in t.tags})


def improved_best(
    settings: BestModelSettings | None,
    best: Best | None,
    round_number: int,
    metrics: Mapping[str, Mapping[str, float]],
    *,
    rounds: int,
) -> tuple[Best | None, bool]:
    """The new best, when round `round_number` (of `rounds` training rounds) improved on `best`
    by the plan's best-model metric, and whether its model is the round's (validated before
    training) rather than the new one."""
    if settings is None:
        return None, False
    value = metrics.get(settings.task, {}).get(settings.metric)
    if value is None or not math.isfinite(value):
        return None, False
    if best is not None and not (value > best.value if settings.maximize else value < best.value):
        return None, False
    # aggregated_model_validation measured the model the round started from; the other
    # tasks measured local models, of which the round's aggregate is the global counterpart.
    validated_before = settings.task == AGGREGATED_MODEL_VALIDATION
    training_rounds = min(round_number + (0 if validated_before else 1), rounds)
    return Best(value, training_rounds), validated_before
