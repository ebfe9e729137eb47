"""What the collaborator takes from its aggregator's answers: every value bounded or checked.

The aggregator checks every value a collaborator sends; the collaborator checks the aggregator's
the same way, since a compromised or broken aggregator must not make it hang, crash or train on
garbage. A wait the aggregator asks for is capped at `MAX_SLEEP_SECONDS` (and the cut logged)
and is at least `MIN_IDLE_SECONDS` when there is nothing to do, so an answer can neither put the
collaborator to sleep for decades nor make it poll in a busy loop. Values no honest aggregator
sends (negative numbers, rounds going backwards or past the plan's, tasks the plan does not name,
quit together with tasks) end the collaborator with one line saying which value was wrong.
Tensor names, shapes, sizes and finiteness are checked where the model arrives
(`foedus.collaborator.client`, `foedus.collaborator.loop`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from foedus.collaborator.client import Tasks
from foedus.collaborator.errors import ResponseValidationError
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION

logger = logging.getLogger(__name__)

# The longest wait an answer can ask for; OpenFL's aggregator asks for 10 s, foedus's for 1 s.
MAX_SLEEP_SECONDS = 60
# The shortest wait between two answers without a task, whatever an answer says (0 would spin).
MIN_IDLE_SECONDS = 1


@dataclass(frozen=True)
class PlannedWork:
    """What the plan says the aggregator may ask for: its rounds and tasks."""

    rounds: int  # federation.rounds: training rounds 0..rounds-1, then round `rounds` validates
    tasks: tuple[str, ...]  # tasks: the tasks of every training round

    def allowed_tasks(self, round_number: int) -> Sequence[str]:
        """The tasks a round may hold: the plan's, or in the final round its validation alone."""
        return self.tasks if round_number < self.rounds else (AGGREGATED_MODEL_VALIDATION,)


class AnswerChecker:
    """Checks each `GetTasks` answer against the plan and the answers before it."""

    def __init__(self, planned: PlannedWork | None = None) -> None:
        self.planned = planned
        self._latest_round = -1

    def check(self, answer: Tasks) -> None:
        """Raise `ResponseValidationError` naming the value no honest aggregator sends."""
        number = answer.round_number
        if number < 0:
            raise _refused(f"round_number {number}: a round is never negative")
        if answer.sleep_seconds < 0:
            raise _refused(f"sleep_time {answer.sleep_seconds}: a wait is never negative")
        if answer.quit and answer.tasks:
            raise _refused(
                f"quit together with tasks {', '.join(map(repr, answer.tasks))}: an aggregator "
                "either hands out work or ends the federation"
            )
        if number < self._latest_round:
            raise _refused(
                f"round_number {number} after round {self._latest_round}: rounds never go back "
                "(an aggregator started over? start this collaborator again to join it)"
            )
        if len(set(answer.tasks)) != len(answer.tasks):
            raise _refused(f"tasks {', '.join(map(repr, answer.tasks))}: a task listed twice")
        if self.planned is not None:
            self._check_against_plan(answer, self.planned)
        self._latest_round = number

    def _check_against_plan(self, answer: Tasks, planned: PlannedWork) -> None:
        number = answer.round_number
        # Past the final validation round an aggregator only waits or says quit.
        last = planned.rounds if answer.tasks else planned.rounds + 1
        if number > last:
            raise _refused(
                f"round_number {number} of a federation of {planned.rounds} rounds "
                f"(federation.rounds; the last task round is {planned.rounds})"
            )
        allowed = planned.allowed_tasks(number)
        unknown = [task for task in answer.tasks if task not in allowed]
        if unknown:
            raise _refused(
                f"task {', '.join(map(repr, unknown))} in round {number}, which the plan does not "
                f"hold (tasks: {', '.join(allowed)})"
            )

    def wait_seconds(self, answer: Tasks) -> float:
        """How long to wait before asking again after an answer without a task (checked first)."""
        asked = answer.sleep_seconds
        if asked > MAX_SLEEP_SECONDS:
            logger.warning(
                "the aggregator asked to wait %d s; waiting %d s, the most a collaborator waits "
                "(foedus.collaborator.answers.MAX_SLEEP_SECONDS), before asking again",
                asked,
                MAX_SLEEP_SECONDS,
            )
            return MAX_SLEEP_SECONDS
        return max(asked, MIN_IDLE_SECONDS)


def _refused(what: str) -> ResponseValidationError:
    return ResponseValidationError(f"the aggregator's answer to GetTasks has {what}")
