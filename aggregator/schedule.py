"""The federation's schedule: which tasks each round runs, who owes what, when a round closes.

Rounds are counted from 0, as OpenFL counts them. Each training round runs the plan's tasks; it
closes when the plan's straggler policy says so (`Schedule.due`, asked by the federation's
`close_round_if_due`, which the runtime calls after every submission and on a short timer):

* ``wait_for_all``: when every collaborator has reported;
* ``cutoff``: when every collaborator has reported, or once ``cutoff_seconds`` have passed since
  the round's tasks were first handed out and at least ``min_reports`` have reported (it keeps
  waiting past the cut-off until they have);
* ``percentage``: once at least ``ceil(percentage * N)`` and at least ``min_reports`` have reported.

A collaborator has *reported* when it has finished every task of the round; only reporters'
results count.

With ``straggler.offline_after_seconds`` set, under any policy a round also closes as soon as every
collaborator still online has reported and at least ``min_reports`` have
(`foedus.aggregator.liveness` says who is online), so a dead site costs seconds, not the whole
cut-off. One that calls again before the round closes is online again, and the round waits for it
again; one that comes back after the close takes part from the next round (its results for the
closed round are refused, as any straggler's).

A collaborator that has *left* (it said it gives up: the foedus `Leave` RPC) is awaited by no
round under any policy, whether or not ``offline_after_seconds`` is set: a round closes as soon
as every collaborator that has not left (and, with ``offline_after_seconds``, is not offline)
has reported, and at least ``min_reports`` have. Results it had sent in the open round count if
it had reported (finished every task); a half-finished one's results do not, as any
non-reporter's. When no round can close any more because too many have left (`stranded`: fewer
collaborators that have not left, plus those that reported while leaving, than ``min_reports``
or one), the runtime ends the aggregator.

Final validation round: after the last training round (``rounds``), if the plan's tasks include
``aggregated_model_validation``, one more round numbered ``rounds`` runs that task alone, so the
accuracy of the final global model is measured. Then the federation is finished and every
assignment answers quit. Without that task the federation finishes after the last training round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from foedus.aggregator.liveness import Departure, Liveness
from foedus.aggregator.records import Accepted, Array, Assignment, Best, Key, Stranded
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION, StragglerPolicy, StragglerSettings


@dataclass
class RoundState:
    """Where the federation stands: the round in progress and what it has accepted in it.

    The federation's records, read and changed only under its lock.
    """

    number: int  # the round in progress; `Schedule.total_rounds` when finished
    model: Mapping[str, Array]  # its global model
    results: dict[Key, Accepted]  # (collaborator, task) -> accepted this round
    previous: frozenset[Key]  # accepted in the round before
    decided: tuple[str, ...] | None  # reporters of a decided close
    best: Best | None
    opened_at: float  # when the round opened (the federation's clock)
    started_at: float | None = None  # when the round's tasks were first handed out
    closing: bool = False  # its close is under way
    told_quit: set[str] = field(default_factory=set)  # collaborators told to quit
    clip: float | None = None  # the round's clip under adaptive clipping (None: not adaptive)

    @property
    def refusing(self) -> bool:
        """Whether the round in progress is closing, so refuses results."""
        return self.closing or self.decided is not None

    def is_resend(self, collaborator: str, round_number: int, task_name: str) -> bool:
        """Whether that result was accepted already, this round or in the round just closed."""
        key = (collaborator, task_name)
        if round_number == self.number:
            return key in self.results
        return round_number == self.number - 1 and key in self.previous


class Schedule:
    """The plan's rounds and straggler policy, applied to a `RoundState` under the caller's lock.

    `clock` times the straggler cut-off; `poll_seconds` is how long a collaborator with nothing
    to do is told to sleep.
    """

    def __init__(
        self,
        *,
        collaborators: Sequence[str],
        tasks: Sequence[str],
        rounds: int,
        straggler: StragglerSettings,
        poll_seconds: int,
        clock: Callable[[], float],
    ) -> None:
        self.collaborators = tuple(collaborators)
        self.tasks = tuple(tasks)
        self.rounds = rounds
        self.straggler = straggler
        self.poll_seconds = poll_seconds
        self.final_validation = AGGREGATED_MODEL_VALIDATION in self.tasks
        self.total_rounds = rounds + (1 if self.final_validation else 0)
        self._clock = clock

    def tasks_of_round(self, round_number: int) -> tuple[str, ...]:
        """The tasks every collaborator runs in `round_number`."""
        if round_number >= self.rounds:
            return (AGGREGATED_MODEL_VALIDATION,)
        return self.tasks

    def finished(self, state: RoundState) -> bool:
        """Whether every round, the final validation round included, has closed."""
        return state.number >= self.total_rounds

    def assignment(self, state: RoundState, collaborator: str) -> Assignment:
        """The tasks `collaborator` still owes this round; wait if none; quit when all rounds ran."""
        if self.finished(state):
            state.told_quit.add(collaborator)
            return Assignment(state.number, (), 0, quit=True)
        if state.refusing:
            return Assignment(state.number, (), self.poll_seconds, quit=False)
        owed = tuple(
            task
            for task in self.tasks_of_round(state.number)
            if (collaborator, task) not in state.results
        )
        if not owed:
            return Assignment(state.number, (), self.poll_seconds, quit=False)
        if state.started_at is None:
            state.started_at = self._clock()
        return Assignment(state.number, owed, 0, quit=False)

    def reporters(self, state: RoundState) -> tuple[str, ...]:
        """Who has finished every task of the round in progress, sorted."""
        round_tasks = self.tasks_of_round(state.number)
        return tuple(
            name
            for name in sorted(self.collaborators)
            if all((name, task) in state.results for task in round_tasks)
        )

    def due(
        self,
        state: RoundState,
        reporters: Sequence[str],
        liveness: Liveness,
        *,
        excluded: frozenset[str] = frozenset(),
    ) -> bool:
        """Whether the straggler policy closes the round now that `reporters` have reported;
        `excluded` can no longer report (a secure stage closed without them), so is not awaited."""
        reported = len(reporters)
        if reported >= len(self.collaborators):
            return True
        policy = self.straggler
        # Who is still awaited: not left, and (when the plan judges silences) not offline.
        if policy.offline_after_seconds is not None:
            awaited = liveness.awaited() - excluded
        else:
            awaited = liveness.staying() - excluded
        if reported >= max(1, policy.min_reports) and awaited <= set(reporters):
            return True
        if policy.policy is StragglerPolicy.CUTOFF:
            if state.started_at is None or reported < policy.min_reports:
                return False
            return self._clock() - state.started_at >= policy.cutoff_seconds
        if policy.policy is StragglerPolicy.PERCENTAGE:
            # Rounded first, so 0.3 * 10 counts as 3 and not as 3.0000000000000004 -> 4.
            needed = math.ceil(round(policy.percentage * len(self.collaborators), 9))
            return reported >= max(needed, policy.min_reports)
        return False

    def stranded(
        self, state: RoundState, staying: frozenset[str], departures: tuple[Departure, ...]
    ) -> Stranded | None:
        """Why the round in progress can never close because too many have left; None if it can.

        It can while the collaborators that have not left (`staying`), plus those that reported
        before leaving, are at least ``min_reports`` (and one). One that rejoins makes it
        possible again.
        """
        if self.finished(state) or state.refusing:
            return None
        reporters = self.reporters(state)
        needed = max(1, self.straggler.min_reports)
        if len(staying | set(reporters)) >= needed:
            return None
        return Stranded(state.number, needed, reporters, departures)
