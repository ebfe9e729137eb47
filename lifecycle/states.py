"""One site's collaborator for one experiment: its states and their allowed moves, one table.

The envoy moves its collaborators through these states (`foedus.envoy.state`, which refuses any move
`TRANSITIONS` does not allow) and reports each change to the director, which records the last one
per site and judges the experiment by it. The values are director.proto's CollaboratorState
(`foedus.lifecycle.wire` converts them), and are stored as they are in both services' SQLite states:
renaming one is a schema change.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType


class CollaboratorState(Enum):
    """One experiment's collaborator at one site (director.proto's CollaboratorState)."""

    APPROVAL_PENDING = "approval_pending"  # review: manual, waiting for `envoy approve`
    SITE_APPROVED = "site_approved"  # approved (by the operator, or review: auto); starts next
    SITE_REJECTED = "site_rejected"  # the operator refused it (final)
    REFUSED = "refused"  # the envoy refused it: runner not allowed, a plan it cannot use (final)
    STARTED = "started"  # `collaborator start` launched
    RUNNING = "running"  # found running again after an envoy restart
    EXITED = "exited"  # ended with `exit_code`
    # The site will not start it again (final): exit 2, restarts used up, or its operator's stop;
    # the site is lost to the experiment.
    GAVE_UP = "gave_up"

    @property
    def final(self) -> bool:
        """Whether nothing moves it any more."""
        return not TRANSITIONS[self]

    @property
    def exited(self) -> bool:
        """Whether its collaborator has ended with an exit code (EXITED, or given up after)."""
        return self in (CollaboratorState.EXITED, CollaboratorState.GAVE_UP)


_C = CollaboratorState
TRANSITIONS: Mapping[CollaboratorState, frozenset[CollaboratorState]] = MappingProxyType(
    {
        _C.APPROVAL_PENDING: frozenset({_C.SITE_APPROVED, _C.SITE_REJECTED}),
        _C.SITE_APPROVED: frozenset({_C.STARTED, _C.REFUSED, _C.GAVE_UP}),
        _C.STARTED: frozenset({_C.RUNNING, _C.EXITED, _C.GAVE_UP}),
        _C.RUNNING: frozenset({_C.EXITED, _C.GAVE_UP}),
        # Started again: it died while its experiment ran; or given up if it cannot be.
        _C.EXITED: frozenset({_C.STARTED, _C.GAVE_UP}),
        _C.SITE_REJECTED: frozenset(),
        _C.REFUSED: frozenset(),
        _C.GAVE_UP: frozenset(),
    }
)
