"""The few ways the director refuses a request; `director.status` maps each to a gRPC status.

Plain Python: the state, the configuration and the service raise them without knowing gRPC.
"""


class DirectorError(Exception):
    """Base of every refusal; the message is shown to the caller, so it names what did not match."""


class AuthenticationError(DirectorError):
    """The caller has no usable identity (no client certificate, or no common name in it)."""


class AuthorizationError(DirectorError):
    """The caller is known but may not do this: not an allowed envoy or user, another's experiment."""


class InvalidRequestError(DirectorError):
    """The request is malformed: a plan that does not parse, unknown sites, fields the director owns."""


class NotFoundError(DirectorError):
    """No such experiment (or none this caller may see), site or log."""


class PreconditionError(DirectorError):
    """The request is well formed but the experiment's state does not allow it now."""


class IllegalTransitionError(PreconditionError):
    """An experiment was asked to move between two states its lifecycle does not connect."""


class LimitExceededError(DirectorError):
    """Over director.yaml's `limits`: a plan or model too large, or too many calls at once."""


class StreamTimeoutError(DirectorError):
    """A stream sent to the director sent nothing for `limits.idle_stream_seconds`."""


class UnavailableError(DirectorError):
    """What the request needs is away for now (an offline envoy); the caller may retry later."""


class StorageError(Exception):
    """The director cannot write or read its state or files; the message names the file."""
