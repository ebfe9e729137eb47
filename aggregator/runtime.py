"""The aggregator at work: serve the federation, close its rounds, save models and metrics, report.

`Runtime.run` is the loop around a `Federation`: after every accepted result (and on a short
timer, for the straggler cut-off) it asks the federation to close the round; each closed round
saves `last_model.pbuf`, `best_model.pbuf` when the plan's best-model metric improved, a line of
`metrics.jsonl`, and prints ONE line for a person. When the federation has finished it prints the
final global model's accuracy, then ends once every collaborator has been told to quit, or
`aggregator.quit_grace_seconds` later (a collaborator that died must not keep it alive).
`serve` puts the gRPC server around that loop. The loop also watches who is online
(`foedus.aggregator.liveness`): transitions go to the log, and to the federation's store for
``aggregator status`` (on a transition, at most once a second; otherwise every few seconds).
The runtime reaches the state only through the federation's store (`foedus.aggregator.store`).

When no round can close any more because too many collaborators have left (the foedus `Leave`
RPC; `Federation.stranded`) and none has rejoined for `STRANDED_GRACE_SECONDS` (an envoy that
starts its collaborator again gets that long for it to call), the run ends by itself with ONE
line naming the round and each collaborator that left with its reason (`Outcome.stranded`; the
command exits 1).

A close that cannot be stored (a full disk) does not end the aggregator: nothing of it was
committed, the health turns NOT_SERVING (`foedus.aggregator.health`), and the close is tried again
once the health's storage check finds that writing works. Saving the outputs of a committed round
(`last_model.pbuf`, `metrics.jsonl`) that fails still ends it: a restart writes them again.

With a durable store (`foedus.aggregator.state`), the federation resumes after a restart where it
stopped; before serving, `Runtime.restore` makes the outputs match the store again: it removes
temporary files a crash left, writes `last_model.pbuf` and `best_model.pbuf` again if they are
not the state's, and appends the rows of `metrics.jsonl` that a crash lost (never a second row
for a round). The ``run`` of a row is the aggregator run that wrote it.

With differential privacy (the plan's `differential_privacy`), the first line names its settings
and the training rounds its budget allows, the last the epsilon spent, and each training round's
row of `metrics.jsonl` the epsilon spent so far (`dp`), recomputed from the round: it is a pure
function of the plan.

Console lines number rounds from 1 ("round 3/10" is the third of ten); `metrics.jsonl` and the
wire count from 0, as OpenFL does. An accuracy measured by `aggregated_model_validation` in a
round is that of the global model the round started from, that is after one round less of
training; the best model is therefore labelled by the training rounds it had.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from foedus.aggregator.allocator import release_free_memory
from foedus.aggregator.federation import Federation
from foedus.aggregator.health import Health
from foedus.aggregator.metrics import Metrics
from foedus.aggregator.records import Best, RoundRecord, RoundSummary, Stranded
from foedus.aggregator.server import DEFAULT_WORKERS, AggregatorGRPCServer
from foedus.aggregator.storage import OutputFolder
from foedus.aggregator.store import FederationStore
from foedus.history.rows import MetricsRow
from foedus.plans import Plan
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION, TRAIN
from foedus.privacy.accountant import budget_line, epsilon_after
from foedus.privacy.budget import plan_text
from foedus.privacy.site_budget import budgets_by_site
from foedus.protos.channel import host_port
from foedus.refusals.errors import StorageError

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.1
# How long no round can close because of departures before the run gives up: long enough for
# an envoy to start a collaborator again (it rejoins with its first call), short for a person.
STRANDED_GRACE_SECONDS = 10.0
ACCURACY_NAMES = ("accuracy", "acc")


__all__ = ["Best", "Outcome", "Runtime", "serve"]


@dataclass(frozen=True)
class Outcome:
    """How a run ended."""

    finished: bool  # every round ran (False: stopped by a signal before that)
    rounds_closed: int
    final_accuracy: float | None  # the final global model's, when measured
    best: Best | None
    not_told_to_quit: tuple[str, ...]  # collaborators that never came for their quit
    stranded: str | None = None  # why it gave up: no round could close (too many had left)


class Runtime:
    """Drives one federation's rounds and writes its output; `run` until finished or stopped."""

    def __init__(
        self,
        plan: Plan,
        federation: Federation,
        output: OutputFolder,
        *,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: float = TICK_SECONDS,
        metrics: Metrics | None = None,
        health: Health | None = None,
        stranded_grace: float = STRANDED_GRACE_SECONDS,
    ) -> None:
        self.plan = plan
        self.stranded_grace = stranded_grace
        self.metrics = metrics
        self.health = health
        self.federation = federation
        self.store: FederationStore = federation.store
        self.output = output
        self.out = out
        self.clock = clock
        self.tick = tick
        self.final_accuracy: float | None = None
        self.rounds_closed = 0
        self.saved_last = False
        self._run = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    @property
    def best(self) -> Best | None:
        """The best value of the plan's best-model metric so far."""
        return self.federation.best

    def restore(self) -> None:
        """After a restart, make the output folder match the store: models, metrics rows."""
        recovered = self.store.recovered
        self.output.remove_temporaries()
        rounds = recovered.last_model_rounds
        if rounds is not None:
            self.saved_last = True
            if self.output.restore_model(self.output.last_model, recovered.progress.model, rounds):
                logger.info("wrote %s again from the saved state", self.output.last_model)
        best = recovered.progress.best
        best_model = self.store.best_model()
        if (
            best is not None
            and best_model is not None
            and self.output.restore_model(self.output.best_model, best_model, best.training_rounds)
        ):
            logger.info("wrote %s again from the saved state", self.output.best_model)
        uuid = self.plan.federation.uuid
        written = {row.round_number for row in self.output.read_metrics() if row.federation == uuid}
        for record in recovered.records:
            if record.round_number not in written:
                self.output.append_metrics(self.metrics_row(record))
            if record.final_validation:
                self.final_accuracy = _accuracy(record.metrics.get(AGGREGATED_MODEL_VALIDATION, {}))

    def resume_line(self) -> str | None:
        """What a restart resumed, for a person; None when the store was new."""
        recovered = self.store.recovered
        if recovered.fresh:
            return None
        progress = recovered.progress
        if self.federation.finished:
            where = "the federation had finished; telling the collaborators to quit"
        else:
            kept = len(progress.accepted)
            where = (
                f"resuming {self._round_label(progress.round_number)} with {kept} "
                f"result{'' if kept == 1 else 's'} kept"
            )
        left = progress.departures
        if left:
            where += "; not waiting for " + ", ".join(f"{d.name} (left: {d.said})" for d in left)
        return f"saved state in {self.store.location}: {where}"

    def run(self, stop: threading.Event) -> Outcome:
        """Close rounds as they become due until the federation ends, or `stop` is set."""
        finished_at: float | None = None
        stranded_at: float | None = None
        gave_up: str | None = None
        waiting: tuple[str, ...] = ()
        while not stop.is_set():
            self.federation.wait_for_submission(self.tick)
            self.watch_presence()
            summary = self._close_round()
            if summary is not None:
                self.record(summary)
                del summary  # or the arrays the model was averaged into live while we wait
                release_free_memory()
            if not self.federation.finished:
                stranded = self.federation.stranded()
                if stranded is None:
                    stranded_at = None
                elif stranded_at is None:
                    stranded_at = self.clock()
                elif self.clock() - stranded_at >= self.stranded_grace:
                    gave_up = self._stranded_line(stranded)
                    break
                continue
            if finished_at is None:
                finished_at = self.clock()
                self.say(self.final_line())
            if self.federation.everyone_told_to_quit():
                break
            if self.clock() - finished_at >= self.plan.aggregator.quit_grace_seconds:
                told = set(self.federation.told_to_quit())
                waiting = tuple(c for c in self.federation.collaborators if c not in told)
                logger.warning(
                    "stopping without telling %s to quit: not heard from in %g s "
                    "(aggregator.quit_grace_seconds)",
                    ", ".join(waiting),
                    self.plan.aggregator.quit_grace_seconds,
                )
                break
        self.watch_presence(final=True)
        if gave_up is None and not self.federation.finished:  # gave_up: the command prints it
            where = f"during {self._round_label(self.federation.round_number)}"
            self.say(f"stopped {where}{self._last_model_note()}")
        return Outcome(
            finished=self.federation.finished,
            rounds_closed=self.rounds_closed,
            final_accuracy=self.final_accuracy,
            best=self.best,
            not_told_to_quit=waiting,
            stranded=gave_up,
        )

    def _stranded_line(self, stranded: Stranded) -> str:
        """Why the run gives up, in one line: the round, and each collaborator that left, why."""
        left = "; ".join(f"{d.name} left: {d.said}" for d in stranded.departures)
        label = self._round_label(stranded.round_number)
        if not stranded.reporters and len(stranded.departures) == len(
            self.federation.collaborators
        ):
            why = "every collaborator has left"
        else:
            reported = ", ".join(stranded.reporters) or "nobody"
            why = (
                f"it needs {stranded.needed} report{'s' if stranded.needed != 1 else ''} "
                f"(straggler.min_reports) and too many have left (reported: {reported})"
            )
        return f"{label} can never close: {why}: {left}{self._last_model_note()}"

    def _last_model_note(self) -> str:
        """Where the last model is, once this run has saved one: the end of a line that ends it."""
        return f"; the last model is in {self.output.last_model}" if self.saved_last else ""

    def _close_round(self) -> RoundSummary | None:
        """The round's close if it is due, unless storage is known to fail (then not tried)."""
        health = self.health
        if health is not None and health.storage_problem is not None:
            return None  # tried again once the health's check finds storage working
        try:
            # Freed memory is given back before the close (what the uploads freed) and after it
            # (what the averaging freed), so neither adds to the other's peak.
            return self.federation.close_round_if_due(on_close=release_free_memory)
        except StorageError as error:
            if health is None:
                raise
            health.storage_failed(
                f"closing {self._round_label(self.federation.round_number)}: {error}"
            )
            return None

    def watch_presence(self, *, final: bool = False) -> None:
        """Log who went offline or came back; save presence when due (`final`: now)."""
        liveness = self.federation.liveness
        snapshot = liveness.poll()
        if final:
            snapshot = liveness.snapshot()
        if snapshot is None:
            return
        try:
            self.store.save_presence(snapshot)
        except StorageError as error:  # only status reads it: the federation goes on
            logger.warning("cannot save who is online: %s", error)

    def record(self, summary: RoundSummary) -> None:
        """Save what a closed (and committed) round produced and print its line."""
        self.rounds_closed += 1
        if self.metrics is not None:
            self.metrics.round_closed(summary.seconds)
        # The last round writes the model even when no round trained it (every secure round
        # failed, or a plan without `train`): the final line names the file.
        if summary.trained or (summary.finished and not self.output.last_model.exists()):
            self.output.save_last(summary.model, summary.round_number + 1)
            self.saved_last = True
        if summary.best_model is not None and summary.best is not None:
            self.output.save_best(summary.best_model, summary.best.training_rounds)
        if summary.final_validation:
            self.final_accuracy = _accuracy(summary.metrics.get(AGGREGATED_MODEL_VALIDATION, {}))
        self.output.append_metrics(self.metrics_row(summary.record))
        self.say(self.round_line(summary))

    def metrics_row(self, record: RoundRecord) -> MetricsRow:
        """The `metrics.jsonl` row of a closed round."""
        return MetricsRow(
            federation=self.plan.federation.uuid,
            run=self._run,
            round_number=record.round_number,
            final_validation=record.final_validation,
            reporters=tuple(record.reporters),
            missing=tuple(record.missing),
            metrics=record.metrics,
            seconds=round(record.seconds, 3),
            sites=record.sites,
            secure=record.secure,
            stages=record.stages,
            untrained=record.untrained,
            dp=self._privacy_spent(record),
        )

    def _privacy_spent(self, record: RoundRecord) -> dict[str, float] | None:
        """A DP federation's training round: the epsilon spent so far, with its delta (and,
        under adaptive clipping, the clip the round used)."""
        settings = self.plan.differential_privacy
        if not settings.enabled or record.final_validation:
            return None
        epsilon = epsilon_after(record.round_number + 1, settings.noise_multiplier, settings.delta)
        clip = {} if record.clip is None else {"clip": record.clip}  # adaptive clipping's
        return {"epsilon": epsilon, "delta": settings.delta, **clip}

    def round_line(self, summary: RoundSummary) -> str:
        """One line a person can read: round, who reported, loss and accuracy, the epsilon the
        sites that train with DP-SGD have spent (the lowest and highest), duration."""
        parts = [self._round_label(summary.round_number)]
        reported = ",".join(summary.reporters) or "nobody"
        if summary.missing:
            reported += f" (missing {','.join(summary.missing)})"
        parts.append(f"reported {reported}")
        train = summary.metrics.get(TRAIN, {})
        losses = sorted(name for name in train if "loss" in name.lower())
        if losses:
            parts.append(f"train loss {train[losses[0]]:.4f}")
        accuracy = _accuracy(summary.metrics.get(AGGREGATED_MODEL_VALIDATION, {}))
        if accuracy is not None:
            parts.append(f"accuracy {accuracy:.4f}")
        # Sites that train with DP-SGD send the budget they have spent with their metrics.
        spent = sorted(budget.epsilon for budget in budgets_by_site(summary.sites).values())
        if spent:
            span = f"{spent[0]:.2f}" + (f"-{spent[-1]:.2f}" if spent[-1] > spent[0] else "")
            parts.append(f"sites' epsilon {span}")
        secure = self.plan.secure_aggregation.enabled and not summary.final_validation
        if secure and not summary.trained:  # the log has the line that says why
            parts.append("untrained: secure aggregation failed, the model stays")
        parts.append(f"{summary.seconds:.2f} s")
        return "  ".join(parts)

    def final_line(self) -> str:
        """The line that ends a finished federation, with the final global model's accuracy."""
        rounds = self.federation.rounds
        if not self.federation.final_validation:
            accuracy = (
                f"final global model accuracy not measured (the plan has no "
                f"{AGGREGATED_MODEL_VALIDATION} task)"
            )
        elif self.final_accuracy is None:
            accuracy = (
                f"final global model accuracy not reported ({AGGREGATED_MODEL_VALIDATION} gave "
                "no 'accuracy' metric)"
            )
        else:
            accuracy = f"final global model accuracy {self.final_accuracy:.4f}"
        best = ""
        settings = self.plan.best_model
        if self.best is not None and settings is not None:
            label = "" if settings.metric in ACCURACY_NAMES else f"{settings.metric} "
            best = (
                f" (best {label}{self.best.value:.4f} after {self.best.training_rounds} "
                f"round{'s' if self.best.training_rounds != 1 else ''})"
            )
        privacy = self.plan.differential_privacy
        budget = f"; {budget_line(privacy, rounds)}" if privacy.enabled else ""
        return (
            f"federation finished: {rounds} round{'s' if rounds != 1 else ''}, {accuracy}{best}, "
            f"model saved to {self.output.last_model}{budget}"
        )

    def say(self, line: str) -> None:
        """Print a line for the person running the aggregator (log it when there is no console)."""
        if self.out is None:
            logger.info("%s", line)
        else:
            print(line, file=self.out, flush=True)

    def _round_label(self, round_number: int) -> str:
        if round_number >= self.federation.rounds:
            return "final validation"
        return f"round {round_number + 1}/{self.federation.rounds}"


def serve(
    plan: Plan,
    store: FederationStore,
    output: OutputFolder,
    stop: threading.Event,
    *,
    out: TextIO | None = None,
    workers: int = DEFAULT_WORKERS,
) -> Outcome:
    """Serve `plan`'s federation until it ends or `stop` is set, then stop the server.

    The federation resumes where `store` stands (`foedus.aggregator.state.DurableState`: every
    accepted result and closed round is durable; `foedus.aggregator.store.MemoryStore`: everything
    is kept in memory, from the model it was made with).
    Lines for a person go to `out` (the console), or to the log when it is None.
    """
    progress = store.recovered.progress
    federation = Federation.from_plan(plan, progress.model, store=store, progress=progress)
    server = AggregatorGRPCServer(plan, federation, workers=workers)
    runtime = Runtime(
        plan,
        federation,
        output,
        out=out,
        metrics=server.metrics,
        health=server.health,
    )
    runtime.restore()
    port = server.start()  # ServerError, PkiError: nothing was served
    try:
        final = " + final validation" if federation.final_validation else ""
        secure = plan.secure_aggregation
        masked = (
            f", aggregated securely (threshold {secure.threshold}, {secure.bits}-bit ring)"
            if secure.enabled
            else ""
        )
        private = f", {plan_text(plan)}" if plan.differential_privacy.enabled else ""
        address = host_port(plan.aggregator.listen_address, port)
        runtime.say(
            f"serving federation {plan.federation.name} on {address}: "
            f"{len(plan.collaborators)} collaborators, {federation.rounds} rounds{final}"
            f"{masked}{private}; output in {output.root}"
        )
        if server.metrics_server is not None:
            address = server.metrics_server.address.with_port(server.metrics_server.port)
            runtime.say(f"metrics on http://{address}/metrics")
        resumed = runtime.resume_line()
        if resumed is not None:
            runtime.say(resumed)
        return runtime.run(stop)
    finally:
        federation.stop()
        server.stop()


def _accuracy(metrics: Mapping[str, float]) -> float | None:
    for name in ACCURACY_NAMES:
        if name in metrics:
            return metrics[name]
    return None
