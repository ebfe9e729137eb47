"""The collaborator loop: ask for tasks, run them with the task runner, send the results.

Plain Python over `AggregatorGRPCClient`; no protobuf here. The loop fetches the global model once
per round (the tensor names come from the runner's own `initial_model`, as an OpenFL collaborator
knows them from its runner) and reuses it for every task of that round. Client errors propagate
to the caller, with one exception: a result or tensor refused with FAILED_PRECONDITION means the
round closed without us (a straggler policy) or the federation finished, so the loop asks for
tasks again instead of giving up; a second refusal for the same round is raised.

A collaborator started again after sending a round's train result, and asked for that round's
`locally_tuned_model_validation`, trains the round again first: runners train a round alike in
any process, so it validates the very model it sent, as it would have without the restart.

In a secure federation (the plan's `secure_aggregation`) the loop keeps this shape: the round's
stages are `foedus.collaborator.secure.SecureRounds`' hooks, one around the train task (KEYS and
SHARES before it, the masked update as its result) and one once the round's last task is sent
(SURVIVORS and UNMASK; also when a restarted site is owed no task). A stage that closed without
this site counts as a round closed without it, like a refused result, except that the
aggregator may go on offering the round's tasks: in a secure federation a site refused in a
round sits the rest of it out (none of its tasks could count without its part in the stages)
and asks again until a later round.

In a federation with differential privacy (the plan's `differential_privacy`) the site clips
its update (trained - global) to the plan's `clip` as it sends it, a slice at a time as the
upload is framed (`foedus.privacy.clipping.update_clips`); it validates its model as trained. In a secure one
the masked update is clipped and given the site's noise share by `SecureRounds` instead
(`foedus.privacy.shares`).

With the plan's `compression.upload` code, the train result's model tensors travel coded against
the round's global model as the site received it (`foedus.collaborator.compressed`): clipped
first under differential privacy, then coded; a lossy code's residuals are saved before the
result is sent, so a site restarted in the round sends the same bytes again.

A site that trains with sample-level DP-SGD (its runner's `private_training`) has its round
counted before it trains it (`foedus.collaborator.private.PrivateRounds.before_train`: in its
ledger, durably, or `BudgetSpentError` at its cap, which ends the loop); its train result
carries its budget after the round (`dp_epsilon`, `dp_delta` and its cap `dp_max_epsilon`:
`foedus.privacy.site_budget`), beside the runner's metrics.

A site that keeps its metrics (`keep_metrics`, `collaborator start --keep-metrics`, only in a
secure federation) sends results without them, its validations with a `data_size` of 1 (the
count weighs metrics alone: the size of its validation set stays at the site too); it logs them
as any site does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from foedus.collaborator.answers import AnswerChecker, PlannedWork
from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor
from foedus.collaborator.compressed import UploadEncoder
from foedus.collaborator.errors import ClientError, RequestRejectedError
from foedus.collaborator.heartbeat import Heartbeat
from foedus.collaborator.private import PrivateRounds
from foedus.collaborator.secure import SecureRoundMissedError, SecureRounds
from foedus.history.rows import metric_text
from foedus.plans.runners import Array, TaskRunner, TrainOutcome
from foedus.plans.schema import (
    AGGREGATED_MODEL_VALIDATION,
    LOCALLY_TUNED_MODEL_VALIDATION,
    TRAIN,
    RunnerSettings,
)
from foedus.privacy.clipping import clipped_model, update_clips

logger = logging.getLogger(__name__)

# Tags as OpenFL puts them on each kind of result tensor.
TRAINED_TAGS = ("trained",)
TRAIN_METRIC_TAGS = ("metric",)
AGGREGATED_VALIDATION_TAGS = ("metric", "validate_agg")
LOCAL_VALIDATION_TAGS = ("metric", "validate_local")
METRIC_TAG = "metric"
# A validation's data_size from a site that keeps its metrics: the count weighs nothing then.
KEPT_DATA_SIZE = 1


class CollaboratorError(ClientError):
    """The loop cannot go on: a task it does not know, or a runner whose output does not fit."""


@dataclass
class CollaboratorReport:
    """What one run of the loop did, and why it ended."""

    quit: bool = False  # True: the aggregator said quit; False: stopped after max_idle_polls
    tasks_run: int = 0  # tasks whose results the aggregator accepted
    rounds: list[int] = field(default_factory=list)  # rounds in which this collaborator worked
    missed_rounds: list[int] = field(default_factory=list)  # rounds that closed without us


@dataclass
class _Round:
    """The global model of one round, and the model this collaborator trained in it."""

    number: int
    global_model: dict[str, Array]
    trained_model: dict[str, Array] | None = None


def run_collaborator(
    client: AggregatorGRPCClient,
    runner: TaskRunner,
    settings: RunnerSettings,
    *,
    sleep: Callable[[float], None] = time.sleep,
    max_idle_polls: int | None = None,
    planned: PlannedWork | None = None,
    heartbeat_seconds: float | None = None,
    secure: SecureRounds | None = None,
    keep_metrics: bool = False,
    clip: float | None = None,
    private: PrivateRounds | None = None,
    upload: UploadEncoder | None = None,
) -> CollaboratorReport:
    """Work for the aggregator until it says quit, or until `max_idle_polls` idle answers in a row.

    `settings` are the plan's runner settings, from which the runner's `initial_model` gives the
    names, shapes and dtypes of the global model's tensors; `planned` (the plan's rounds and tasks)
    bounds what the aggregator may ask for (`foedus.collaborator.answers`). While a task runs, a
    heartbeat goes to the aggregator every `heartbeat_seconds` (None: none;
    `foedus.collaborator.heartbeat`). `secure`: this site's part in secure rounds (None: a plain
    federation); `keep_metrics`: its results carry no metric; `clip`: the plan's
    `differential_privacy.clip`, to which each trained model's update is clipped before it is
    sent (None: sent as trained; in a secure federation `secure` clips and noises it);
    `private`: this site's DP-SGD budget (None: it does not train privately), whose
    `BudgetSpentError` at the cap propagates; `upload`: the plan's `compression.upload` code,
    in which each train result's model tensors are sent (None: raw).
    """
    if max_idle_polls is not None and max_idle_polls < 1:
        raise ValueError(f"max_idle_polls must be >= 1 or None, got {max_idle_polls}")
    reference = runner.initial_model(settings)
    names = tuple(reference)
    answers = AnswerChecker(planned)
    beat = Heartbeat(client.heartbeat, heartbeat_seconds)
    report = CollaboratorReport()
    current: _Round | None = None
    idle = 0
    # Rounds whose secure stage closed without this site: it sits the rest of them out.
    sat_out: set[int] = set()
    while True:
        tasks = client.get_tasks()
        answers.check(tasks)
        if secure is not None:
            secure.seen(tasks.round_number, finished=tasks.quit)
        if tasks.quit:
            logger.info(
                "the federation is finished; this collaborator ran %d tasks in %d rounds",
                report.tasks_run,
                len(report.rounds),
            )
            report.quit = True
            return report
        if not tasks.tasks or tasks.round_number in sat_out:
            # A restarted site that sent every task may still owe SURVIVORS and UNMASK.
            if (
                secure is not None
                and tasks.round_number not in report.missed_rounds
                and not _finish_secure(secure, tasks.round_number, report)
            ):
                continue
            idle += 1
            if max_idle_polls is not None and idle >= max_idle_polls:
                logger.info("stopping after %d answers in a row without a task", idle)
                return report
            wait = answers.wait_seconds(tasks)
            logger.debug("no task in round %d; asking again in %g s", tasks.round_number, wait)
            sleep(wait)
            continue
        idle = 0
        if tasks.round_number in report.missed_rounds:
            # The aggregator refused this round as closed, yet offers its tasks again: a loop.
            raise CollaboratorError(
                f"the aggregator offers tasks of round {tasks.round_number} after refusing "
                f"that round's results as not in progress"
            )
        if current is None or current.number != tasks.round_number:
            report.rounds.append(tasks.round_number)
            current = None  # the last round's models are not needed any more
        try:
            if current is None:
                model = _fetch_model(client, names, tasks.round_number)
                _check_global(model, reference)
                current = _Round(tasks.round_number, model)
            for task in tasks.tasks:
                _run_task(
                    client,
                    runner,
                    current,
                    task,
                    beat,
                    planned=planned,
                    secure=secure,
                    keep_metrics=keep_metrics,
                    clip=clip,
                    private=private,
                    upload=upload,
                )
                report.tasks_run += 1
        except (RequestRejectedError, SecureRoundMissedError) as error:
            _missed(error, tasks.round_number, report)
            if secure is not None:
                # Its tasks may be offered still, but a site without a part in the round's
                # secure stages (or refused one) cannot count in it: it sits the round out.
                sat_out.add(tasks.round_number)
            current = None
            continue
        if secure is not None and not _finish_secure(secure, tasks.round_number, report):
            current = None


def _finish_secure(secure: SecureRounds, round_number: int, report: CollaboratorReport) -> bool:
    """SURVIVORS and UNMASK of the round; False when the round closed without this site."""
    try:
        secure.after_round(round_number)
    except (RequestRejectedError, SecureRoundMissedError) as error:
        _missed(error, round_number, report)
        return False
    return True


def _missed(
    error: RequestRejectedError | SecureRoundMissedError,
    round_number: int,
    report: CollaboratorReport,
) -> None:
    """Note a round that closed without this site, or raise `error` if it says something else."""
    if (
        isinstance(error, RequestRejectedError)
        and error.code != grpc.StatusCode.FAILED_PRECONDITION
    ):
        raise error
    # The round closed without us (a straggler policy) or the federation finished: what the
    # aggregator wants now is the answer to the next GetTasks.
    report.missed_rounds.append(round_number)
    details = error.details if isinstance(error, RequestRejectedError) else str(error)
    logger.warning(
        "round %d closed before this collaborator finished it (%s); asking for tasks again",
        round_number,
        details,
    )


def _fetch_model(
    client: AggregatorGRPCClient, names: Sequence[str], round_number: int
) -> dict[str, Array]:
    """The global model of `round_number`: the tensors `names` the runner's model has."""
    model = client.get_aggregated_model(names, round_number)
    logger.debug("fetched the global model of round %d (%d tensors)", round_number, len(model))
    return model


def _run_task(
    client: AggregatorGRPCClient,
    runner: TaskRunner,
    current: _Round,
    task: str,
    beat: Heartbeat,
    *,
    planned: PlannedWork | None,
    secure: SecureRounds | None = None,
    keep_metrics: bool = False,
    clip: float | None = None,
    private: PrivateRounds | None = None,
    upload: UploadEncoder | None = None,
) -> None:
    """Run one task on the round's model, with heartbeats while it runs, and send its results
    (without metrics when the site keeps them)."""
    round_number = current.number
    if task == AGGREGATED_MODEL_VALIDATION:
        with beat.during():
            validation = runner.validate(current.global_model)
        tensors = _metrics(validation.metrics, AGGREGATED_VALIDATION_TAGS)
        data_size, metrics = validation.data_size, validation.metrics
        samples = data_size
    elif task == TRAIN:
        if private is not None:  # the cap, then the ledger, before anything of the round is sent
            private.before_train(round_number)
        if secure is not None:
            secure.before_train(round_number)  # KEYS and SHARES
        with beat.during():
            outcome = runner.train(current.global_model, round_number)
        _check_trained(outcome.model, current.global_model)
        current.trained_model = outcome.model
        trained, data_size = _trained_tensors(current, outcome, secure, clip, upload)
        metrics = dict(outcome.metrics)
        if private is not None:
            metrics.update(private.metrics())
        tensors = [*trained, *_metrics(metrics, TRAIN_METRIC_TAGS)]
        samples = outcome.data_size
    elif task == LOCALLY_TUNED_MODEL_VALIDATION:
        if current.trained_model is None and planned is not None and TRAIN in planned.tasks:
            # This round's train result went out before a restart: runners train a round alike
            # in any process, so training it again gives the very model that was sent.
            logger.info(
                "round %d: training again to validate the model sent before a restart", round_number
            )
            with beat.during():
                current.trained_model = runner.train(current.global_model, round_number).model
        # Without a train task in the plan, the global model stands in.
        model = current.trained_model if current.trained_model is not None else current.global_model
        with beat.during():
            validation = runner.validate(model)
        tensors = _metrics(validation.metrics, LOCAL_VALIDATION_TAGS)
        data_size, metrics = validation.data_size, validation.metrics
        samples = data_size
    else:
        raise CollaboratorError(
            f"the aggregator asked for task {task!r} of round {round_number}; this collaborator "
            f"knows {AGGREGATED_MODEL_VALIDATION}, {TRAIN} and {LOCALLY_TUNED_MODEL_VALIDATION}"
        )
    if keep_metrics:
        tensors = [tensor for tensor in tensors if METRIC_TAG not in tensor.tags]
        if task != TRAIN:
            data_size = KEPT_DATA_SIZE
    client.send_local_task_results(round_number, task, data_size, tensors)
    logger.info(
        "round %d: %s on %d samples: %s",
        round_number,
        task,
        samples,
        " ".join(f"{name}={metric_text(value)}" for name, value in metrics.items()),
    )
    if task == TRAIN and private is not None:
        logger.info("%s", private.budget_line())


def _trained_tensors(
    current: _Round,
    outcome: TrainOutcome,
    secure: SecureRounds | None,
    clip: float | None,
    upload: UploadEncoder | None = None,
) -> tuple[list[OutgoingTensor], int]:
    """The train result's model tensors and data size: clipped when the plan says `clip` (as
    they are framed, when raw), coded against the round's global model when it says an `upload`
    code; or masked (its weight too) in a secure round (whose plan allows no upload code)."""
    if secure is not None:  # the update masked; its weight travels masked too
        return secure.masked_results(
            current.number, current.global_model, outcome.model, outcome.data_size
        )
    # The aggregator clips again: this is the honest site's part.
    if upload is not None:  # coded from the clipped model whole
        sent = outcome.model
        if clip is not None:
            sent = clipped_model(current.global_model, outcome.model, clip)
        coded = upload.encode(current.number, current.global_model, sent)
        return [
            OutgoingTensor(name, array, tags=TRAINED_TAGS, coded=coded.get(name))
            for name, array in sent.items()
        ], outcome.data_size
    clips = {} if clip is None else update_clips(current.global_model, outcome.model, clip)
    return [
        OutgoingTensor(name, array, tags=TRAINED_TAGS, clip=clips.get(name))
        for name, array in outcome.model.items()
    ], outcome.data_size


def _metrics(metrics: Mapping[str, float], tags: tuple[str, ...]) -> list[OutgoingTensor]:
    """Metrics as scalar float32 tensors (what OpenFL peers expect), flagged for the report."""
    return [
        OutgoingTensor(name, np.float32(value), tags=tags, report=True)
        for name, value in metrics.items()
    ]


def _check_trained(trained: Mapping[str, Array], global_model: Mapping[str, Array]) -> None:
    """Refuse a trained model whose tensors differ from the global model's in names, shapes or dtypes."""
    if set(trained) != set(global_model):
        raise CollaboratorError(
            f"the runner's trained model has tensors {', '.join(sorted(trained))}; the global "
            f"model has {', '.join(sorted(global_model))}"
        )
    for name, array in trained.items():
        reference = global_model[name]
        if array.shape != reference.shape or array.dtype != reference.dtype:
            raise CollaboratorError(
                f"the runner's trained {name!r} is {array.dtype}{list(array.shape)}, the global "
                f"model's is {reference.dtype}{list(reference.shape)}"
            )


def _check_global(global_model: Mapping[str, Array], reference: Mapping[str, Array]) -> None:
    """Refuse a global model whose tensors differ from the runner's own model in shape or dtype."""
    for name, array in reference.items():
        got = global_model[name]  # the client fetched exactly these names
        if got.shape != array.shape or got.dtype != array.dtype:
            raise CollaboratorError(
                f"the aggregator's global {name!r} is {got.dtype}{list(got.shape)}; this "
                f"collaborator's runner has {array.dtype}{list(array.shape)}"
            )
