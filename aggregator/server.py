"""AggregatorGRPCServer: the gRPC server around one federation, its credentials, start and stop."""

from __future__ import annotations

import logging
from concurrent import futures
from types import TracebackType

import grpc

from aggregator.errors import ServerError
from aggregator.federation import Federation
from aggregator.identity import Gatekeeper
from aggregator.servicer import AggregatorServicer
from pki.tls import server_credentials
from plans import Plan
from protos import aggregator_pb2_grpc
from protos.channel import server_options

logger = logging.getLogger(__name__)

# Calls are short except uploads and downloads, which spend their time in I/O and numpy
# (both release the GIL), so more threads than cores keep many collaborators moving.
DEFAULT_WORKERS = 32


class AggregatorGRPCServer:
    """Serves `federation` on the plan's address, over mutual TLS unless the plan says insecure."""

    def __init__(
        self, plan: Plan, federation: Federation, *, workers: int = DEFAULT_WORKERS
    ) -> None:
        self.plan = plan
        self.gatekeeper = Gatekeeper(
            aggregator_id=plan.federation.aggregator_id,
            federation_uuid=plan.federation.uuid,
            collaborators=frozenset(plan.collaborators),
            tls=plan.tls.enabled,
        )
        self.servicer = AggregatorServicer(
            federation,
            self.gatekeeper,
            plan.limits,
            long_poll_seconds=plan.aggregator.long_poll_seconds,
            # Long polls hold a worker thread each; half the workers stay free for uploads.
            max_long_polls=workers // 2,
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aggregator-rpc"),
            options=server_options(plan.limits.max_message_bytes),
        )
        aggregator_pb2_grpc.add_AggregatorServicer_to_server(self.servicer, self._server)
        self.port = 0

    @property
    def address(self) -> str:
        """The host:port this server listens on, IPv6 addresses in brackets."""
        host = self.plan.aggregator.listen_address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.plan.aggregator.port}"

    def start(self) -> int:
        """Bind and start serving; returns the port (the chosen one when the plan says 0)."""
        certs = self.plan.tls.certs
        try:
            if certs is None:
                logger.warning(
                    "INSECURE: serving without TLS, as %s says (tls.insecure: true); anyone who "
                    "can reach %s can claim to be a collaborator",
                    self.plan.path,
                    self.address,
                )
                self.port = self._server.add_insecure_port(self.address)
            else:
                credentials = server_credentials(
                    certs.aggregator_cert, certs.aggregator_key, certs.ca_bundle
                )
                self.port = self._server.add_secure_port(self.address, credentials)
        except RuntimeError as error:
            raise ServerError(f"cannot listen on {self.address}: {error}") from None
        if self.port == 0:
            raise ServerError(f"cannot listen on {self.address}: the address is in use or invalid")
        self._server.start()
        logger.info(
            "aggregator serving federation %s on port %d", self.plan.federation.uuid, self.port
        )
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight calls get `grace` seconds (the plan's by default)."""
        if grace is None:
            grace = self.plan.aggregator.grace_seconds
        self.servicer.stop_long_polls()  # waiting GetTasks calls answer now, not after the grace
        self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops or `timeout` passes; True if it stopped."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> AggregatorGRPCServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop(0)
