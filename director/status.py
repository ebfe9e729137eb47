"""The one table from the director's refusals to gRPC status codes, and the guard every RPC runs under.

Refusals raised anywhere below the servicer reach the caller as their status with their message;
anything else is a bug, logged with its traceback and answered `INTERNAL`, never `UNKNOWN`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NoReturn

import grpc

from aggregator.status import answer, status_in
from director.errors import (
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

logger = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of decides its status.
STATUS_CODES: Mapping[type[Exception], grpc.StatusCode] = {
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    AuthorizationError: grpc.StatusCode.PERMISSION_DENIED,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,  # IllegalTransitionError too
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StreamTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,  # why not CANCELLED: admission.calls
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    # Nothing was acknowledged, so the caller may safely retry.
    StorageError: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: Exception) -> grpc.StatusCode:
    """The status a refusal is answered with (`INTERNAL` for anything that is not a refusal)."""
    return status_in(STATUS_CODES, error)


def abort(context: grpc.ServicerContext, method: str, error: Exception) -> NoReturn:
    """End the call with the error's status and a message for the caller; log what a person needs."""
    if isinstance(error, grpc.RpcError) and not context.is_active():
        logger.info("%s: the call ended before its stream did", method)
        context.abort(grpc.StatusCode.CANCELLED, "the call ended before its stream did")
    answer(
        context,
        method,
        error,
        status_of(error),
        service="director",
        storage=StorageError,
        log=logger,
    )
