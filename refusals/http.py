"""The one table from refusals to HTTP status codes: the director's dashboard and the site API.

Both answer a refusal as `{"error": "..."}` with its status here; anything that is not a refusal is
a bug, answered 500. The envoy's own errors are refusals too (`foedus.envoy.errors`), so one table
serves both.
"""

from __future__ import annotations

from collections.abc import Mapping

from foedus.refusals.errors import (
    AuthenticationError,
    AuthorizationError,
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    PreconditionError,
    StorageError,
    StreamTimeoutError,
    UnavailableError,
)

# The first class an error is an instance of decides its status, as in `refusals.grpc`.
HTTP_STATUS: Mapping[type[Exception], int] = {
    AuthenticationError: 401,
    AuthorizationError: 403,
    LimitExceededError: 413,
    InvalidRequestError: 400,
    NotFoundError: 404,
    PreconditionError: 409,
    StreamTimeoutError: 408,  # gRPC's only today; here so that every refusal has its status
    UnavailableError: 503,
    StorageError: 503,
}


def http_status(error: Exception) -> int:
    """The HTTP status a refusal is answered with (500 for anything that is not one)."""
    for kind, code in HTTP_STATUS.items():
        if isinstance(error, kind):
            return code
    return 500
