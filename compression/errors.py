"""What a decoder raises for bytes it cannot trust: refusals a service answers with their status.

A malformed payload is the caller's error (INVALID_ARGUMENT); one that would inflate past what it
declared, or past the receiver's limit, is refused before anything is inflated
(RESOURCE_EXHAUSTED, as any tensor past the limit).
"""

from __future__ import annotations

from foedus.refusals.errors import InvalidRequestError, LimitExceededError


class CompressedFormatError(InvalidRequestError, ValueError):
    """A compressed tensor's bytes cannot be decoded as they claim; the message says which and why."""


class CompressedTooLargeError(CompressedFormatError, LimitExceededError):
    """A compressed tensor would inflate past its declared size or the receiver's limit."""
