"""How much of the aggregator one collaborator may hold: calls at once, and time for one upload.

Both limits come from the plan (`limits.max_calls_per_collaborator`, `limits.upload_seconds`) and
exist so that one collaborator, hostile or broken, cannot take the worker threads every other
collaborator needs. The mechanism is the shared `foedus.admission.calls` (the director's too); this
module gives it the plan's keys and its refusals, which `foedus.refusals.grpc` answers
RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TypeVar

from foedus.admission import calls
from foedus.refusals.errors import LimitExceededError, StreamTimeoutError

T = TypeVar("T")


class UploadTimeoutError(StreamTimeoutError):
    """An upload stream did not end within the plan's `limits.upload_seconds`."""


class Admission(calls.Admission):
    """Counts each collaborator's calls in progress; one past `limit` is `LimitExceededError`."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            limit,
            key="limits.max_calls_per_collaborator",
            who="collaborator",
            refusal=LimitExceededError,
        )


def chunks_within(
    chunks: Iterator[T], seconds: float, *, what: str = "upload"
) -> Generator[T, None, None]:
    """The items of `chunks`, `UploadTimeoutError` once `seconds` have passed (`calls.chunks_within`)."""
    return calls.chunks_within(
        chunks, seconds, what=what, key="limits.upload_seconds", timeout=UploadTimeoutError
    )
