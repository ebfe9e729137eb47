"""The one table from refusals to gRPC status codes, and how a refused call is answered.

Refusals raised anywhere below a servicer (identity, the federation's or the director's logic,
the codec, the stream joiner) reach the caller as their status with their message; anything else
is a bug, logged with its traceback and answered `INTERNAL`, never `UNKNOWN`. A `StorageError`
is answered UNAVAILABLE with a message that names no file (the detail, which names the service's
files, goes to its log only). One exception to all that: when a call ends while its stream is
still being read (the caller cancelled, its deadline passed, or gRPC refused a message over the
size limit and answered RESOURCE_EXHAUSTED itself), gRPC's request iterator raises. That is no
bug of ours: it is logged without a traceback, and nothing more is answered, since the call is
already over (`status_for` says CANCELLED).

The aggregator's and the director's servicers both answer so; each service says its name and
logger (`answer`), the aggregator also tells its observers (`foedus.aggregator.status`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NoReturn

import grpc

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

# The first class an error is an instance of decides its status: subclasses before their bases,
# and LimitExceededError before InvalidRequestError (a tensor or stream over its limit is both:
# `protos.codec.TensorTooLargeError`, `protos.stream.StreamTooLargeError`).
STATUS_CODES: Mapping[type[Exception], grpc.StatusCode] = {
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    AuthorizationError: grpc.StatusCode.PERMISSION_DENIED,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    # Why not CANCELLED: admission.calls.
    StreamTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    # Nothing was acknowledged, so the caller may safely retry (clients retry UNAVAILABLE).
    StorageError: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: Exception) -> grpc.StatusCode:
    """The status a refusal is answered with (`INTERNAL` for anything that is not a refusal)."""
    for kind, code in STATUS_CODES.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def status_for(context: grpc.ServicerContext, error: Exception) -> grpc.StatusCode:
    """`status_of(error)`, or CANCELLED when the call ended while its stream was being read."""
    if isinstance(error, grpc.RpcError) and not context.is_active():
        return grpc.StatusCode.CANCELLED
    return status_of(error)


def answer(
    context: grpc.ServicerContext,
    method: str,
    error: Exception,
    code: grpc.StatusCode,
    *,
    service: str,
    log: logging.Logger,
    size_limit: str = "the message size limit",
) -> NoReturn:
    """End the call with `code` (from `status_for`); a bug's or a storage failure's detail goes
    to `log` only.

    `service` names whose log has the details, `log` is that service's logger, `size_limit` names
    the setting a message over which ends a call.
    """
    if code is grpc.StatusCode.CANCELLED:
        log.info(
            "%s: the call ended before its stream did (cancelled, past its deadline, or a "
            "message over %s)",
            method,
            size_limit,
        )
        context.abort(code, "the call ended before its stream did")
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", method)
        context.abort(code, f"internal error in {method}; the {service}'s log has the details")
    if isinstance(error, StorageError):  # the detail names the service's files: log it only
        log.error("%s: cannot store: %s", method, error)
        context.abort(code, f"the {service} cannot store data right now; {method} may be retried")
    log.info("%s refused (%s): %s", method, code.name, error)
    context.abort(code, str(error))
