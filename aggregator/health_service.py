"""`grpc.health.v1.Health` on the aggregator's port: `foedus.aggregator.health.Health` on the wire.

The standard service (package `grpcio-health-checking`), so load balancers, Kubernetes' gRPC
probes and `grpc_health_probe` work unchanged. Two names answer, always alike: the server as a
whole (`""`) and `openfl.aggregator.Aggregator`.

Who may ask: the health service carries no message header, so the one check of every Aggregator RPC
(`foedus.aggregator.identity`) has nothing to compare; the TLS handshake is its check. On a TLS
server only a client with a certificate of the federation's CA gets that far, whatever its common
name; what it learns is SERVING or NOT_SERVING. A probe should have a certificate of its own whose
name is not a collaborator's (README, Health and metrics), so the Aggregator service refuses it
(`PERMISSION_DENIED`) and a leaked probe key cannot train or upload.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from foedus.aggregator.health import Health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService:
    """The standard health servicer, following a `Health`."""

    def __init__(self, state: Health, services: tuple[str, ...]) -> None:
        # Non-blocking Watch: a watcher costs a callback, not one of the server's threads.
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self.names = (health.OVERALL_HEALTH, *services)
        state.listen(self._set)

    def add_to(self, server: grpc.Server) -> None:
        """Serve `grpc.health.v1.Health` on `server` (before it starts)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def shutdown(self) -> None:
        """NOT_SERVING for good: the server is stopping (later changes are ignored)."""
        self.servicer.enter_graceful_shutdown()

    def _set(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in self.names:
            self.servicer.set(name, status)
