"""The few ways the envoy's work fails; plain Python, the CLI maps them to exit codes.

Those the site API may answer are refusals too (`foedus.refusals.errors`), so `foedus.refusals.http`
gives their HTTP status.
"""

from foedus.refusals.errors import NotFoundError, PreconditionError, StorageError


class EnvoyError(Exception):
    """Base of the envoy's errors; the message names what to fix."""


class StateError(EnvoyError, StorageError):
    """The envoy cannot read or write its state folder; the message names the file."""


class UnknownExperimentError(EnvoyError, NotFoundError):
    """No experiment of that id in this envoy's state."""


class IllegalTransitionError(EnvoyError, PreconditionError):
    """A collaborator was asked to move between two states its lifecycle does not connect."""


class FinishedError(EnvoyError, PreconditionError):
    """A collaborator that has already ended was asked to stop."""


class DirectorUnavailableError(EnvoyError):
    """The director did not answer (away, unreachable, too slow): try again after a backoff."""


class DirectorRefusedError(EnvoyError):
    """The director answered with a refusal a retry cannot change; `code` is the gRPC status name."""

    def __init__(self, rpc: str, code: str, details: str) -> None:
        self.rpc = rpc
        self.code = code
        super().__init__(f"the director refused {rpc} with {code}: {details}")
