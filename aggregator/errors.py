"""The few ways the aggregator refuses a request; `aggregator.status` maps each to a gRPC status.

These are plain Python: the federation logic raises them without knowing about gRPC.
"""


class AggregatorError(Exception):
    """Base of every refusal; the message is shown to the caller, so it names what did not match."""


class AuthenticationError(AggregatorError):
    """The caller has no usable identity (no client certificate, or no common name in it)."""


class AuthorizationError(AggregatorError):
    """The caller is known but may not do this: not in the federation, another name, wrong ids."""


class InvalidRequestError(AggregatorError):
    """The request itself is malformed: unknown task or tensor, bad shape, bad data size."""


class PreconditionError(AggregatorError):
    """The request is well formed but does not fit the federation's state: wrong or closed round."""


class LimitExceededError(AggregatorError):
    """The request is larger than the plan allows."""


class ServerError(Exception):
    """The aggregator cannot serve at all (port in use, unusable address); not a refusal."""


class StorageError(Exception):
    """The aggregator cannot write or read its output (models, metrics); the message names the file."""


class ModelFileError(StorageError):
    """A model file is missing, unreadable or not a valid model; the message says which and why."""
