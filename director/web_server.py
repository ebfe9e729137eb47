"""The dashboard's HTTPS server: uvicorn in a thread of the director, on its own socket.

TLS with the director's certificate and key (the ones its gRPC side serves with, CN = host), so a
browser that trusts the federation's CA sees the same name. No client certificate is asked for:
people authenticate with a token (see `foedus.director.dashboard`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from foedus.pki.layout import CertsLayout
from foedus.plans.schema import Address

if TYPE_CHECKING:  # FastAPI itself is imported with the dashboard's app, only when it is on
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

START_SECONDS = 30.0  # uvicorn loads the certificate and starts its loop in this time, or fails


class WebServerError(Exception):
    """The dashboard cannot serve (the certificate or key unusable, uvicorn failing to start)."""


class WebServer:
    """Serves `app` over HTTPS on `address` until stopped."""

    def __init__(self, app: FastAPI, address: Address, certs: CertsLayout) -> None:
        """Prepare; nothing listens before `start`."""
        self.address = address
        self.port = 0
        self._config = uvicorn.Config(
            app,
            ssl_certfile=str(certs.aggregator_cert),
            ssl_keyfile=str(certs.aggregator_key),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve; the port. `OSError` when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address.host, self.address.port))
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name="director-dashboard",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                sock.close()
                raise WebServerError(
                    f"the dashboard did not start on {self.address.with_port(self.port)}; "
                    "the director's log says why"
                )
            time.sleep(0.02)
        logger.info("dashboard on https://%s/", self.address.with_port(self.port))
        return self.port

    def stop(self) -> None:
        """Stop serving, closing open connections after a short grace."""
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._thread = None
