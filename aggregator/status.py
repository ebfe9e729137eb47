"""The one table from refusals to gRPC status codes, and the guard every RPC runs under.

Refusals raised anywhere below the servicer (identity, federation logic, codec, stream joiner)
reach the caller as their status with their message; anything else is a bug, logged with its
traceback and answered `INTERNAL`, never `UNKNOWN`. One exception to that: when a call ends
while its stream is still being read (the caller cancelled, its deadline passed, or gRPC refused
a message over `limits.max_message_bytes` and answered RESOURCE_EXHAUSTED itself), gRPC's request
iterator raises. That is no bug of ours: it is logged without a traceback, and nothing more is
answered, since the call is already over.

Every refusal is also told to the servicer's `observers`, with the status it is answered with
(CANCELLED for a call that ended): metrics count it by RPC and status, the health learns from
it that something could not be stored.

The lookup (`status_in`) and the answer (`answer`) are the director's too (`director.status`),
with its own table and its name in the messages.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NoReturn, Protocol, TypeVar

import grpc

from aggregator.admission import UploadTimeoutError
from aggregator.errors import (
    AuthenticationError,
    AuthorizationError,
    InvalidRequestError,
    LimitExceededError,
    PreconditionError,
    StorageError,
)
from protos.codec import TensorFormatError, TensorTooLargeError
from protos.stream import StreamError, StreamTooLargeError

logger = logging.getLogger(__name__)


class RefusalObserver(Protocol):
    """Told of every call answered with an error status (`code` is the status's name)."""

    def refused(self, rpc: str, code: str, error: Exception) -> None:
        """Take note; must be quick and must not raise."""


class Observed(Protocol):
    """A servicer whose refusals are observed."""

    @property
    def observers(self) -> Sequence[RefusalObserver]:
        """Who is told of each refusal."""


S = TypeVar("S", bound=Observed)
R = TypeVar("R")
T = TypeVar("T")

# Most specific first: the first class an error is an instance of decides its status.
STATUS_CODES: Mapping[type[Exception], grpc.StatusCode] = {
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    AuthorizationError: grpc.StatusCode.PERMISSION_DENIED,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UploadTimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    TensorTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TensorFormatError: grpc.StatusCode.INVALID_ARGUMENT,
    StreamTooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StreamError: grpc.StatusCode.INVALID_ARGUMENT,
    # Nothing was acknowledged, so the caller may safely retry (its client retries UNAVAILABLE).
    StorageError: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: Exception) -> grpc.StatusCode:
    """The status a refusal is answered with (`INTERNAL` for anything that is not a refusal)."""
    return status_in(STATUS_CODES, error)


def status_in(
    codes: Mapping[type[Exception], grpc.StatusCode], error: Exception
) -> grpc.StatusCode:
    """The status of the first class in `codes` `error` is an instance of; else `INTERNAL`."""
    for kind, code in codes.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def refusals_as_status(
    method: Callable[[S, R, grpc.ServicerContext], T],
) -> Callable[[S, R, grpc.ServicerContext], T]:
    """Wrap an RPC method: a refusal is answered with its status and message, a bug with INTERNAL."""

    @functools.wraps(method)
    def guarded(servicer: S, request: R, context: grpc.ServicerContext) -> T:
        try:
            return method(servicer, request, context)
        except Exception as error:
            _abort(context, method.__name__, error, servicer.observers)

    return guarded


def stream_refusals_as_status(
    method: Callable[[S, R, grpc.ServicerContext], Iterator[T]],
) -> Callable[[S, R, grpc.ServicerContext], Iterator[T]]:
    """`refusals_as_status` for an RPC that answers with a stream: a refusal ends the stream."""

    @functools.wraps(method)
    def guarded(servicer: S, request: R, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from method(servicer, request, context)
        except Exception as error:
            _abort(context, method.__name__, error, servicer.observers)

    return guarded


def _abort(
    context: grpc.ServicerContext,
    method: str,
    error: Exception,
    observers: Sequence[RefusalObserver],
) -> NoReturn:
    ended = isinstance(error, grpc.RpcError) and not context.is_active()
    code = grpc.StatusCode.CANCELLED if ended else status_of(error)
    for observer in observers:
        observer.refused(method, code.name, error)
    if ended:
        logger.info(
            "%s: the call ended before its stream did (cancelled, past its deadline, or a "
            "message over limits.max_message_bytes)",
            method,
        )
        context.abort(code, "the call ended before its stream did")
    answer(context, method, error, code, service="aggregator", storage=StorageError, log=logger)


def answer(
    context: grpc.ServicerContext,
    method: str,
    error: Exception,
    code: grpc.StatusCode,
    *,
    service: str,
    storage: type[Exception],
    log: logging.Logger,
) -> NoReturn:
    """End the call with `code`; a bug's or a `storage` failure's detail goes to `log` only.

    The aggregator's and the director's servicers answer the same way; `service` names whose
    log has the details, `log` is that service's logger.
    """
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", method)
        context.abort(code, f"internal error in {method}; the {service}'s log has the details")
    if isinstance(error, storage):  # the detail names the service's files: log it only
        log.error("%s: cannot store: %s", method, error)
        context.abort(code, f"the {service} cannot store data right now; {method} may be retried")
    log.info("%s refused (%s): %s", method, code.name, error)
    context.abort(code, str(error))
