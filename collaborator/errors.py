"""The few ways a call to the aggregator fails, as the collaborator loop needs to tell them apart.

Retrying is decided in `foedus.collaborator.client` before any of these is raised: by the time the
loop sees one, retrying the same call would not help (or the retry budget is spent).
"""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """Base of every client failure, so a CLI can catch them in one place and print one line."""


class ClientConfigurationError(ClientError):
    """The client cannot be used as configured: missing or unreadable TLS files, bad settings."""


class AggregatorUnavailableError(ClientError):
    """The aggregator could not be reached (or stopped answering) within the retry budget."""

    def __init__(
        self,
        message: str,
        *,
        attempts: int,
        elapsed: float,
        code: grpc.StatusCode | None,
        details: str,
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.elapsed = elapsed
        self.code = code
        self.details = details


class RequestRejectedError(ClientError):
    """The aggregator answered with a refusal that a retry cannot change (identity, round, size)."""

    def __init__(self, rpc: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"the aggregator refused {rpc} with {code.name}: {details}")
        self.rpc = rpc
        self.code = code
        self.details = details


class ResponseValidationError(ClientError):
    """A response did not come from our aggregator for us, or carries data that cannot be trusted."""


class AggregatorIdentityError(ClientError):
    """The server is not this federation's aggregator (name, CA, binding or pinned fingerprint)."""
