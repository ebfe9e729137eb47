"""The director's own refinement of a refusal; the refusals themselves are `refusals.errors`.

`director.service`, `director.servicer` and `director.state` still import the refusals from here
until they are switched to `refusals.errors`: the names below are those classes, not copies.
"""

from refusals.errors import (
    AuthorizationError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    PreconditionError,
    StorageError,
    StreamTimeoutError,
    UnavailableError,
)

__all__ = [
    "AuthorizationError",
    "IllegalTransitionError",
    "InvalidRequestError",
    "LimitExceededError",
    "NotFoundError",
    "PreconditionError",
    "StorageError",
    "StreamTimeoutError",
    "UnavailableError",
]


class IllegalTransitionError(PreconditionError):
    """An experiment was asked to move between two states its lifecycle does not connect."""
