"""What a secure round's record says of its steps: each one's time and who dropped out in it.

`foedus.aggregator.secure_stages` notes when each stage of the round in progress started and
ended, and with whom (`Step`); `stage_records` makes of them the round's `StageRecord`s, which its
`metrics.jsonl` row carries (`foedus.history.rows`). The masked upload is a step of its own,
between SHARES and SURVIVORS: it ends when the survivors are named, its members the survivors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from foedus.history.rows import StageRecord


@dataclass(frozen=True)
class Step:
    """A step of the round in progress that ended: with whom, and when (the stages' clock)."""

    stage: str  # one of `foedus.history.rows.SECURE_STEPS`
    members: tuple[str, ...]
    started: float | None  # None: before the aggregator restarted
    ended: float | None  # None: before the aggregator restarted


def stage_records(collaborators: Sequence[str], steps: Sequence[Step]) -> tuple[StageRecord, ...]:
    """Each step's time (to the millisecond; None when it ended before a restart) and who of
    the step before (KEYS: the collaborators) is not among its members."""
    records: list[StageRecord] = []
    previous: Sequence[str] = collaborators
    for step in steps:
        seconds = None
        if step.started is not None and step.ended is not None:
            seconds = round(max(0.0, step.ended - step.started), 3)
        dropped = tuple(sorted(set(previous) - set(step.members)))
        records.append(StageRecord(step.stage, seconds, dropped))
        previous = step.members
    return tuple(records)
