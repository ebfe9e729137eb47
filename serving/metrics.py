"""Prometheus metrics over HTTP: one registry served by prometheus-client in a thread of its own.

The aggregator's metrics (`foedus.aggregator.metrics.MetricsServer`) and the director's
(`foedus.director.metrics.DirectorMetrics`) are both a `RegistryServer`: each serves only its own
registry, never the process-wide default one, started and stopped with its service.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from foedus.plans.schema import Address

logger = logging.getLogger(__name__)


class RegistryServer:
    """prometheus-client's HTTP server for one registry on `address`, in its own thread.

    `what` names the metrics in the log line, logged on `log` (the owner's logger).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        address: Address,
        what: str = "metrics",
        log: logging.Logger = logger,
    ) -> None:
        """Serve `registry` on `address` once started."""
        self.registry = registry
        self.address = address
        self.port = 0
        self._what = what
        self._log = log
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve; returns the port (the chosen one when the address says 0).

        `OSError` when the address cannot be bound (in use, not this machine's).
        """
        self._server, self._thread = start_http_server(
            self.address.port, addr=self.address.host, registry=self.registry
        )
        self.port = int(self._server.server_address[1])
        self._log.info("%s on http://%s/metrics", self._what, self.address.with_port(self.port))
        return self.port

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None
