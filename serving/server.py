"""A gRPC server's lifetime in a `with`, and its binding: the aggregator's server and the director's."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self

import grpc


class ServerError(Exception):
    """A service cannot serve at all (port in use, unusable address); not a refusal."""


class Serving(ABC):
    """A gRPC server's lifetime: started on entering a `with`, stopped at once on leaving.

    The aggregator's server and the director's are both this; each says how it starts and stops.
    """

    _server: grpc.Server

    @abstractmethod
    def start(self) -> int:
        """Bind and start serving; returns the port."""

    @abstractmethod
    def stop(self, grace: float) -> None:
        """Stop serving; in-flight calls get `grace` seconds."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops or `timeout` passes; True if it stopped."""
        return self._server.wait_for_termination(timeout)

    def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Listen on `address` (without TLS when `credentials` is None); the port bound.

        `ServerError` when the address cannot be used: in use, invalid, not this machine's.
        """
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise ServerError(f"cannot listen on {address}: {error}") from None
        if port == 0:
            raise ServerError(f"cannot listen on {address}: the address is in use or invalid")
        return port

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(0)
