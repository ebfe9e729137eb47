"""The guard every aggregator RPC runs under, and who is told of each refusal.

Each RPC runs under `refusals_as_status` (or `stream_refusals_as_status`): whatever it raises is
answered as `foedus.refusals.grpc` says (the one table: a refusal with its status and message, a bug
with INTERNAL, a call already over with nothing more).

Every refusal is also told to the servicer's `observers`, with the status it is answered with
(CANCELLED for a call that ended): metrics count it by RPC and status, the health learns from
it that something could not be stored.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, Protocol, TypeVar

import grpc

from foedus.refusals.grpc import answer, status_for

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
    code = status_for(context, error)
    for observer in observers:
        observer.refused(method, code.name, error)
    answer(
        context,
        method,
        error,
        code,
        service="aggregator",
        log=logger,
        size_limit="limits.max_message_bytes",
    )
