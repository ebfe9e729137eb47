"""The few ways a foedus service refuses a request; `foedus.refusals.grpc` and `foedus.refusals.http` answer each.

Plain Python: the federation's and the director's logic, the codec and the stream reader raise
them without knowing gRPC or HTTP. A service's own refinements subclass the one they are
(`foedus.director.records.IllegalTransitionError` is a `PreconditionError`, the codec's
`TensorTooLargeError` a `LimitExceededError`), so the tables need no entry of their own for them.
"""


class RefusalError(Exception):
    """Base of every refusal; the message is shown to the caller, so it names what did not match."""


class AuthenticationError(RefusalError):
    """The caller has no usable identity (no client certificate, or no common name in it)."""


class AuthorizationError(RefusalError):
    """The caller is known but may not do this: not in the federation or director.yaml, another
    name, wrong ids, another's experiment."""


class InvalidRequestError(RefusalError):
    """The request itself is malformed: unknown task or tensor, bad shape or data size, a plan
    that does not parse, fields the service owns."""


class NotFoundError(RefusalError):
    """No such experiment (or none this caller may see), site or log."""


class PreconditionError(RefusalError):
    """The request is well formed but does not fit the state now: wrong or closed round, an
    experiment's state that does not allow it."""


class LimitExceededError(RefusalError):
    """The request is larger than the plan or director.yaml allows, or one call too many at once."""


class StreamTimeoutError(RefusalError):
    """A stream sent to the service did not end, or sent nothing, within its time limit."""


class UnavailableError(RefusalError):
    """What the request needs is away for now (an offline envoy); the caller may retry later."""


class StorageError(Exception):
    """The service cannot write or read its state or files; the message names the file.

    Not a refusal: the request may be fine. It is answered UNAVAILABLE (nothing was acknowledged,
    so a retry is safe), its detail logged only.
    """


class ModelFileError(StorageError):
    """A model file is missing, unreadable or not a valid model; the message says which and why."""
