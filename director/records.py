"""The director's records: the experiment's lifecycle table (and the refusal of a move it does not
allow) and the values `foedus.director.state`
stores and gives back (plain, frozen; nothing here touches a disk). A site's collaborator's
states are the lifecycle's (`foedus.lifecycle.states`), shared with the envoy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from foedus.lifecycle.states import CollaboratorState
from foedus.refusals.errors import PreconditionError


class ExperimentState(Enum):
    """Where an experiment is in its lifecycle (see protos/director.proto, ExperimentState)."""

    SUBMITTED = "submitted"
    APPROVED = "approved"  # accepted and queued for a running place
    REJECTED = "rejected"
    WAITING = "waiting"  # has its place and its aggregator; its sites are starting
    RUNNING = "running"  # every site started its collaborator
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """Whether the experiment has ended: nothing moves it any more."""
        return not TRANSITIONS[self]


_S = ExperimentState
# The lifecycle, whole: from each state, the states it may move to.
TRANSITIONS: Mapping[ExperimentState, frozenset[ExperimentState]] = MappingProxyType(
    {
        _S.SUBMITTED: frozenset({_S.APPROVED, _S.REJECTED, _S.CANCELLED}),
        _S.APPROVED: frozenset({_S.WAITING, _S.FAILED, _S.CANCELLED}),
        _S.WAITING: frozenset({_S.RUNNING, _S.FAILED, _S.CANCELLED}),
        _S.RUNNING: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED}),
        _S.REJECTED: frozenset(),
        _S.COMPLETED: frozenset(),
        _S.FAILED: frozenset(),
        _S.CANCELLED: frozenset(),
    }
)
ACTIVE = frozenset({_S.WAITING, _S.RUNNING})  # holding one of max_running_experiments places


class IllegalTransitionError(PreconditionError):
    """An experiment was asked to move between two states its lifecycle does not connect."""


@dataclass(frozen=True)
class ShardInfo:
    """What a site says it holds; informative only."""

    description: str = ""
    train_samples: int = 0
    valid_samples: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Envoy:
    """A registered envoy; `online` was computed from the clock when it was read."""

    name: str
    shard: ShardInfo
    version: str
    registered_at: float
    last_seen: float
    online: bool


@dataclass(frozen=True)
class SiteReport:
    """The last report of one site's collaborator for one experiment."""

    site: str
    state: CollaboratorState
    exit_code: int
    reason: str
    updated_at: float


@dataclass(frozen=True)
class Experiment:
    """One experiment as stored; `plan_yaml` is the plan as submitted, before the director's fields."""

    experiment_id: str
    sequence: int  # submission order
    name: str
    owner: str
    state: ExperimentState
    reason: str
    plan_yaml: str
    sites: tuple[str, ...]
    rounds: int
    has_initial_model: bool
    submitted_at: float
    started_at: float  # 0: not yet (set on entering waiting)
    ended_at: float  # 0: not yet (set on entering a final state)
    port: int | None  # the aggregator's port, from entering waiting until the end
    aggregator_pid: int | None  # the running aggregator's process, as last recorded
