"""The one hierarchy of refusals and its two tables: every service's refusals answered alike."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import grpc
import pytest

from foedus.aggregator.admission import UploadTimeoutError
from foedus.director.records import IllegalTransitionError
from foedus.envoy.errors import (
    DirectorUnavailableError,
    FinishedError,
    StateError,
    UnknownExperimentError,
)
from foedus.envoy.errors import IllegalTransitionError as CollaboratorTransitionError
from foedus.envoy.site_api import BadRequestError, TokenError
from foedus.envoy.site_plan import RefusedPlanError
from foedus.protos.codec import TensorFormatError, TensorTooLargeError
from foedus.protos.stream import StreamError, StreamTooLargeError
from foedus.refusals import errors
from foedus.refusals.errors import (
    AuthenticationError,
    AuthorizationError,
    InvalidRequestError,
    LimitExceededError,
    ModelFileError,
    NotFoundError,
    PreconditionError,
    RefusalError,
    StorageError,
    StreamTimeoutError,
    UnavailableError,
)
from foedus.refusals.grpc import STATUS_CODES, status_of
from foedus.refusals.http import HTTP_STATUS, http_status

Code = grpc.StatusCode
# Every service's refusals, each with its gRPC status and its HTTP status.
ANSWERS: list[tuple[Exception, grpc.StatusCode, int]] = [
    (AuthenticationError("x"), Code.UNAUTHENTICATED, 401),
    (AuthorizationError("x"), Code.PERMISSION_DENIED, 403),
    (InvalidRequestError("x"), Code.INVALID_ARGUMENT, 400),
    (NotFoundError("x"), Code.NOT_FOUND, 404),
    (PreconditionError("x"), Code.FAILED_PRECONDITION, 409),
    (LimitExceededError("x"), Code.RESOURCE_EXHAUSTED, 413),
    (StreamTimeoutError("x"), Code.DEADLINE_EXCEEDED, 408),
    (UnavailableError("x"), Code.UNAVAILABLE, 503),
    (StorageError("x"), Code.UNAVAILABLE, 503),
    (ModelFileError("x"), Code.UNAVAILABLE, 503),
    (IllegalTransitionError("x"), Code.FAILED_PRECONDITION, 409),
    (UploadTimeoutError("x"), Code.DEADLINE_EXCEEDED, 408),
    (TensorFormatError("x"), Code.INVALID_ARGUMENT, 400),
    (TensorTooLargeError("x"), Code.RESOURCE_EXHAUSTED, 413),
    (StreamError("x"), Code.INVALID_ARGUMENT, 400),
    (StreamTooLargeError("x"), Code.RESOURCE_EXHAUSTED, 413),
    (BadRequestError("x"), Code.INVALID_ARGUMENT, 400),
    (RefusedPlanError("x"), Code.INVALID_ARGUMENT, 400),
    (UnknownExperimentError("x"), Code.NOT_FOUND, 404),
    (FinishedError("x"), Code.FAILED_PRECONDITION, 409),
    (CollaboratorTransitionError("x"), Code.FAILED_PRECONDITION, 409),
    (StateError("x"), Code.UNAVAILABLE, 503),
    # Not refusals: bugs, or the envoy's own troubles, answered as such.
    (TokenError("x"), Code.INTERNAL, 500),
    (DirectorUnavailableError("x"), Code.INTERNAL, 500),
    (ValueError("a bug"), Code.INTERNAL, 500),
]


@pytest.mark.parametrize(
    ("error", "code", "http"),
    ANSWERS,
    ids=lambda value: type(value).__qualname__ if isinstance(value, Exception) else str(value),
)
def test_each_refusal_has_its_grpc_and_http_status(
    error: Exception, code: grpc.StatusCode, http: int
) -> None:
    """Each service's refusal is answered with its gRPC status and its HTTP status, a bug INTERNAL/500."""
    assert (status_of(error), http_status(error)) == (code, http)


def _kinds() -> Iterator[type[Exception]]:
    """Every class of `foedus.refusals.errors`."""
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, Exception):
            yield value


@pytest.mark.parametrize("kind", sorted(_kinds(), key=lambda kind: kind.__name__))
def test_every_refusal_of_the_hierarchy_is_in_both_tables(kind: type[Exception]) -> None:
    """No class of the hierarchy is left to INTERNAL or 500 (the base alone has no status)."""
    if kind is RefusalError:
        assert (status_of(kind("x")), http_status(kind("x"))) == (Code.INTERNAL, 500)
        return
    assert status_of(kind("x")) is not Code.INTERNAL
    assert http_status(kind("x")) != 500


@pytest.mark.parametrize("table", [STATUS_CODES, HTTP_STATUS], ids=["grpc", "http"])
def test_tables_list_subclasses_before_their_bases(table: Mapping[type[Exception], object]) -> None:
    """A subclass listed after its base would never be reached: the base would answer for it."""
    kinds = list(table)
    for index, kind in enumerate(kinds):
        for later in kinds[index + 1 :]:
            assert not issubclass(later, kind), f"{later.__name__} is shadowed by {kind.__name__}"


def test_the_tables_list_the_same_refusals_in_the_same_order() -> None:
    """One order for both protocols, so that an error that is two refusals is the same one in each."""
    assert list(STATUS_CODES) == list(HTTP_STATUS)
