"""Where a federation keeps what it accepted: the `ResultStore` interface and `MemoryStore`.

`aggregator.state.DurableState` is the store that survives the process; see
`aggregator.federation` for the order in which the federation calls a store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aggregator.liveness import Departure
from aggregator.records import Accepted, Array, RoundCommit, RoundRecord, TaskResult


class ResultStore(Protocol):
    """Where accepted results and closed rounds are kept; see the module docstring for the order."""

    # Where uploads are written as they arrive, so that keeping one is a rename (None: anywhere).
    upload_folder: Path | None

    def stage(self, result: TaskResult) -> Accepted:
        """Keep `result`'s tensors where they survive; not accepted until `record`."""

    def record(self, accepted: Accepted) -> None:
        """Accept a staged result for good: the commit point of an accept."""

    def discard(self, accepted: Accepted) -> None:
        """Forget a staged result that was not recorded."""

    def load(self, accepted: Accepted) -> TaskResult:
        """The result with its tensors, as it was staged."""

    def decide_close(self, round_number: int, reporters: Sequence[str]) -> None:
        """Fix who reported in a round that is being closed."""

    def commit_round(self, commit: RoundCommit) -> Mapping[str, Array] | None:
        """Close the round for good: next round, its model, the record, the best.

        Averages `commit.model` where the store keeps it and returns it as kept, for the
        federation to hold (None when there is no new model).
        """

    def record_leave(self, departure: Departure) -> None:
        """Keep that a collaborator has left, for good, before its `Leave` is answered."""

    def record_rejoin(self, name: str) -> None:
        """Forget a departure: the collaborator called again."""


@dataclass
class MemoryStore:
    """Keeps results in memory only: nothing survives the process (tests, embedding)."""

    closed: list[RoundRecord] = field(default_factory=list)
    upload_folder: Path | None = None

    def stage(self, result: TaskResult) -> Accepted:
        """The index entry, holding the result itself."""
        return Accepted(
            result.collaborator, result.round_number, result.task_name, result.data_size, result
        )

    def record(self, accepted: Accepted) -> None:
        """Nothing to make durable."""

    def discard(self, accepted: Accepted) -> None:
        """Nothing to remove."""

    def load(self, accepted: Accepted) -> TaskResult:
        """The result that was staged."""
        if not isinstance(accepted.handle, TaskResult):
            raise TypeError(f"not a result staged in memory: {accepted!r}")
        return accepted.handle

    def decide_close(self, round_number: int, reporters: Sequence[str]) -> None:
        """Nothing to make durable."""

    def commit_round(self, commit: RoundCommit) -> Mapping[str, Array] | None:
        """Keep the round's record; the new model is averaged into arrays."""
        model = None if commit.model is None else commit.model.arrays()
        self.closed.append(commit.record)
        return model

    def record_leave(self, departure: Departure) -> None:
        """Nothing to make durable."""

    def record_rejoin(self, name: str) -> None:
        """Nothing to make durable."""
