"""The federation's value types: what is handed out, received, accepted, closed and recovered.

Plain frozen dataclasses shared by the federation (`foedus.aggregator.federation`), its stores
(`foedus.aggregator.store`, `foedus.aggregator.state`) and the servicer; nothing here does anything
but carry values (and, for `AveragedModel`, say how the next model is averaged).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from foedus.aggregator.fedavg import (
    AVERAGING_THREADS,
    SliceSink,
    TensorSource,
    average_sources,
    average_sources_into,
)
from foedus.aggregator.liveness import Departure
from foedus.history.rows import StageRecord

Array = npt.NDArray[np.generic]
METRIC_TAG = "metric"
DELTA_TAG = "delta"
MAX_DATA_SIZE = 2**31 - 1
Key = tuple[str, str]  # (collaborator, task) of one result in a round
# collaborator -> task -> metric -> value: each site's own metrics of a round, as it sent them
SiteMetrics = Mapping[str, Mapping[str, Mapping[str, float]]]


@dataclass(frozen=True)
class Assignment:
    """What `GetTasks` tells one collaborator: its tasks of a round, or to wait, or to quit."""

    round_number: int
    tasks: tuple[str, ...]
    sleep_seconds: int
    quit: bool


@dataclass(frozen=True)
class ResultTensor:
    """One tensor of a task's results: a model tensor it trained, or a metric it measured."""

    name: str
    tags: frozenset[str]
    array: Array
    # Whether every value is finite, when whoever read the values found out on the way
    # (`aggregator.upload` does, as the bytes arrive); None: the federation checks the array.
    finite: bool | None = None


@dataclass(frozen=True)
class UploadFile:
    """The file an upload was written to as it arrived: the serialized `TaskResults` as sent.

    A result that comes with one has its tensors mapped from that file, so a store keeps the
    file itself (`foedus.aggregator.state.DurableState` moves it into place) instead of writing the
    tensors again.
    """

    path: Path
    size: int
    digest: str  # of its bytes as they arrived (`aggregator.digest`)


@dataclass(frozen=True)
class TaskResult:
    """A collaborator's results for one task of one round."""

    collaborator: str
    round_number: int
    task_name: str
    data_size: int
    tensors: tuple[ResultTensor, ...]
    upload: UploadFile | None = None  # where the tensors' bytes are, if they came as a stream


@dataclass(frozen=True)
class Accepted:
    """The index entry of an accepted result; its tensors stay with the store (`handle`)."""

    collaborator: str
    round_number: int
    task_name: str
    data_size: int
    handle: object  # the store's own reference: a file for DurableState, the result in memory

    @property
    def key(self) -> Key:
        """(collaborator, task): what identifies the result within its round."""
        return (self.collaborator, self.task_name)


@dataclass(frozen=True)
class Best:
    """The best value of the plan's best-model metric so far, and the model's training rounds."""

    value: float
    training_rounds: int


@dataclass(frozen=True)
class RoundRecord:
    """What a closed round did, as kept for good: the source of its `metrics.jsonl` row."""

    round_number: int
    final_validation: bool  # the extra round that only validates the final model
    reporters: tuple[str, ...]  # collaborators whose results counted, sorted
    missing: tuple[str, ...]  # collaborators that had not finished when the round closed
    metrics: Mapping[str, Mapping[str, float]]  # task -> metric -> weighted mean
    seconds: float  # from the first hand-out of the round's tasks to its close
    trained: bool  # whether any `train` result was averaged into the model
    # Each reporter's own metrics, as it sent them; empty for rounds closed before they were kept.
    sites: SiteMetrics = field(default_factory=dict)
    secure: bool = False  # a training round of a secure federation: unmasked, not averaged
    stages: tuple[StageRecord, ...] = ()  # its steps (`foedus.aggregator.secure_record`)
    untrained: str = ""  # why a secure round closed untrained (one line); "" if it did not
    # Adaptive clipping (`foedus.privacy.adaptive`): the clip this training round used (None:
    # not a training round, or the plan's clip is fixed), and the clip of the round after it
    # (the round in progress's, read back at recovery; None: the plan's clip is fixed).
    clip: float | None = None
    next_clip: float | None = None


@dataclass(frozen=True, kw_only=True)
class RoundSummary(RoundRecord):
    """What one closed round did (its `RoundRecord`), with the models before and after it."""

    round_model: Mapping[str, Array]  # the global model the collaborators worked on this round
    model: Mapping[str, Array]  # the global model after this round (the same if nobody trained)
    finished: bool  # whether this was the federation's last round
    best: Best | None = None  # the best so far, this round included (None: no best-model metric)
    best_model: Mapping[str, Array] | None = None  # the new best model, when this round improved

    @property
    def record(self) -> RoundRecord:
        """The part of the summary that is kept for good."""
        return RoundRecord(**{kept.name: getattr(self, kept.name) for kept in fields(RoundRecord)})


class NextModel(Protocol):
    """A round's next global model before it is computed: `AveragedModel` (FedAvg of the sites'
    models), or `foedus.aggregator.secure_model.SecureModel` (the unmasked sum of a secure
    round); the store has it computed a slice at a time into wherever it keeps the model."""

    @property
    def reference(self) -> Mapping[str, Array]:
        """The round's model: the names, shapes and dtypes of the next one."""
        ...

    def into(self, sink: SliceSink) -> None:
        """Compute the model, handing each slice to `sink`."""
        ...

    def arrays(self) -> dict[str, Array]:
        """Compute the model into arrays in memory."""
        ...


@dataclass(frozen=True)
class AveragedModel:
    """The next global model before it is computed: the counted `train` results, averaged a
    slice at a time into wherever it is kept (`into`), or into arrays (`arrays`)."""

    reference: Mapping[str, Array]  # the round's model: names, shapes and dtypes
    contributions: Mapping[str, tuple[int, TensorSource]]  # collaborator -> (data size, tensors)
    workers: int = AVERAGING_THREADS

    def into(self, sink: SliceSink) -> None:
        """Average, handing each slice to `sink` (`fedavg.average_sources_into`)."""
        average_sources_into(self.reference, self.contributions, sink, workers=self.workers)

    def arrays(self) -> dict[str, Array]:
        """Average into arrays in memory (`fedavg.average_sources`)."""
        return average_sources(self.reference, self.contributions, workers=self.workers)


@dataclass(frozen=True)
class RoundCommit:
    """What closing a round changes, for the store to make durable in one step."""

    record: RoundRecord
    model: NextModel | None  # the next round's global model; None: unchanged
    best: Best | None  # the new best, when this round improved it
    best_is_round_model: bool  # the new best model is the round's (validated) model, not `model`


@dataclass(frozen=True)
class SecurePost:
    """A site's accepted post to one stage of a round's secure aggregation, as it arrived
    (`foedus.secure.wire.post_bytes`); `stage` is a `foedus.secure.wire.Stage` value."""

    round_number: int
    stage: int
    collaborator: str
    message: bytes


@dataclass(frozen=True)
class SecureClose:
    """A stage of a round's secure aggregation closed, with the sites it closed with (sorted)."""

    round_number: int
    stage: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class Progress:
    """Where a federation stands: the round in progress and what it has; what a store recovers."""

    round_number: int
    model: Mapping[str, Array]  # the global model of `round_number`
    accepted: tuple[Accepted, ...] = ()  # results accepted in `round_number`
    previous: frozenset[Key] = frozenset()  # results accepted in the round before
    closing: tuple[str, ...] | None = None  # reporters of a close decided, not yet committed
    best: Best | None = None
    departures: tuple[Departure, ...] = ()  # collaborators that have left (and not rejoined)
    # `round_number`'s secure aggregation so far: posts accepted, stages closed (in order)
    secure_posts: tuple[SecurePost, ...] = ()
    secure_closes: tuple[SecureClose, ...] = ()
    # the clip of `round_number` under adaptive clipping; None: the plan's (fixed, or initial)
    clip: float | None = None


@dataclass(frozen=True)
class Stranded:
    """Why the round in progress can never close: too many collaborators have left."""

    round_number: int
    needed: int  # reports the round needs (min_reports, at least one)
    reporters: tuple[str, ...]  # those that have reported in it
    departures: tuple[Departure, ...]  # every collaborator that has left, in the plan's order
