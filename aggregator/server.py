"""AggregatorGRPCServer: the gRPC server around one federation, its credentials, start and stop.

Beside the Aggregator service it serves the standard health service on the same port
(`foedus.aggregator.health_service`), and, when the plan gives `aggregator.metrics_address`,
Prometheus metrics over HTTP there (`foedus.aggregator.metrics`); both start and stop with it. Its
lifetime in a `with` and its binding are `foedus.serving.server.Serving`'s, as the director's
server's.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from foedus.aggregator.federation import Federation
from foedus.aggregator.health import Health, StorageWatch, free_bytes
from foedus.aggregator.health_service import HealthService
from foedus.aggregator.identity import Gatekeeper
from foedus.aggregator.inspection import PrivacySpent, budget_spent
from foedus.aggregator.metrics import Metrics, MetricsServer
from foedus.aggregator.servicer import AggregatorServicer
from foedus.pki.tls import server_credentials
from foedus.plans import Plan
from foedus.protos import aggregator_pb2
from foedus.protos.channel import host_port, server_options
from foedus.protos.stream import parse_chunk
from foedus.serving.server import ServerError, Serving

logger = logging.getLogger(__name__)

# Calls are short except uploads and downloads, which spend their time in I/O and numpy
# (both release the GIL), so more threads than cores keep many collaborators moving.
DEFAULT_WORKERS = 32


SERVICE = "openfl.aggregator.Aggregator"


def add_servicer(servicer: AggregatorServicer, server: grpc.Server) -> None:
    """Serve `servicer`'s RPCs on `server`, as the generated `add_AggregatorServicer_to_server` does."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def method_handlers(
    servicer: AggregatorServicer,
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The handler of each RPC, as the generated code makes them but for two differences.

    `GetAggregatedModel` answers with chunks serialized once per round
    (`foedus.aggregator.servicer.EncodedModel`), so its responses are bytes passed through as they
    are; `SendLocalTaskResults` reads its chunks in place (`foedus.protos.stream.parse_chunk`).
    """
    return {
        "Ping": grpc.unary_unary_rpc_method_handler(
            servicer.Ping,
            request_deserializer=aggregator_pb2.PingRequest.FromString,
            response_serializer=aggregator_pb2.PingResponse.SerializeToString,
        ),
        "GetTasks": grpc.unary_unary_rpc_method_handler(
            servicer.GetTasks,
            request_deserializer=aggregator_pb2.GetTasksRequest.FromString,
            response_serializer=aggregator_pb2.GetTasksResponse.SerializeToString,
        ),
        "GetAggregatedTensor": grpc.unary_unary_rpc_method_handler(
            servicer.GetAggregatedTensor,
            request_deserializer=aggregator_pb2.GetAggregatedTensorRequest.FromString,
            response_serializer=aggregator_pb2.GetAggregatedTensorResponse.SerializeToString,
        ),
        "SendLocalTaskResults": grpc.stream_unary_rpc_method_handler(
            servicer.SendLocalTaskResults,
            request_deserializer=parse_chunk,  # reads each chunk's payload in place
            response_serializer=aggregator_pb2.SendLocalTaskResultsResponse.SerializeToString,
        ),
        "InteropRelay": grpc.unary_unary_rpc_method_handler(
            servicer.InteropRelay,
            request_deserializer=aggregator_pb2.InteropMessage.FromString,
            response_serializer=aggregator_pb2.InteropMessage.SerializeToString,
        ),
        "GetAggregatedModel": grpc.unary_stream_rpc_method_handler(
            servicer.GetAggregatedModel,
            request_deserializer=aggregator_pb2.GetAggregatedModelRequest.FromString,
            response_serializer=_already_serialized,
        ),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(
            servicer.Heartbeat,
            request_deserializer=aggregator_pb2.HeartbeatRequest.FromString,
            response_serializer=aggregator_pb2.HeartbeatResponse.SerializeToString,
        ),
        "Leave": grpc.unary_unary_rpc_method_handler(
            servicer.Leave,
            request_deserializer=aggregator_pb2.LeaveRequest.FromString,
            response_serializer=aggregator_pb2.LeaveResponse.SerializeToString,
        ),
        "PostSecureMessage": grpc.unary_unary_rpc_method_handler(
            servicer.PostSecureMessage,
            request_deserializer=aggregator_pb2.SecureMessage.FromString,
            response_serializer=aggregator_pb2.SecureReceipt.SerializeToString,
        ),
        "GetSecureRelay": grpc.unary_unary_rpc_method_handler(
            servicer.GetSecureRelay,
            request_deserializer=aggregator_pb2.SecureRelayRequest.FromString,
            response_serializer=aggregator_pb2.SecureRelay.SerializeToString,
        ),
    }


def _already_serialized(message: bytes) -> bytes:
    return message


# Beside the collaborators' calls: health checks, and calls refused at once.
BACKLOG_MARGIN = 256


def backlog_calls(plan: Plan) -> int:
    """The calls gRPC may hold before a worker takes them: all that the collaborators may make.

    Each collaborator may have `limits.max_calls_per_collaborator` calls at once (more are
    refused by `foedus.aggregator.admission`, with a status that says so); gRPC must not cancel any
    of those before that check sees them.
    """
    return len(plan.collaborators) * plan.limits.max_calls_per_collaborator + BACKLOG_MARGIN


def _budget(plan: Plan, federation: Federation) -> Callable[[], PrivacySpent] | None:
    """What a DP federation has spent, read at each scrape: its training rounds closed so far
    (as `aggregator status` counts them); None without differential privacy."""
    settings = plan.differential_privacy
    if not settings.enabled:
        return None
    return lambda: budget_spent(settings, min(federation.round_number, federation.rounds))


class AggregatorGRPCServer(Serving):
    """Serves `federation` on the plan's address, over mutual TLS unless the plan says insecure."""

    def __init__(
        self,
        plan: Plan,
        federation: Federation,
        *,
        workers: int = DEFAULT_WORKERS,
        collaborators_online: Callable[[], int] | None = None,
    ) -> None:
        self.plan = plan
        # Uploads are stored here (a store in memory keeps none: the system's temporary folder
        # serves); the health probes this folder, where a crash's leftovers are removed.
        uploads = federation.store.upload_folder or Path(tempfile.gettempdir())
        self.health = Health(uploads)
        output = plan.aggregator.output_dir
        self.metrics = Metrics(
            round_number=lambda: federation.round_number,
            storage_free_bytes=lambda: free_bytes(output),
            serving=lambda: self.health.serving,
            collaborators_online=collaborators_online or federation.online_count,
            collaborators_left=lambda: {d.name: d.said for d in federation.liveness.departures()},
            privacy_spent=_budget(plan, federation),
        )
        address = plan.aggregator.metrics_address
        self.metrics_server = None if address is None else MetricsServer(self.metrics, address)
        self._storage_watch = StorageWatch(self.health)
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
            upload_folder=uploads,
            metrics=self.metrics,
            observers=(self.health,),
            compression=plan.compression,
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aggregator-rpc"),
            options=server_options(
                plan.limits.max_message_bytes,
                plan.limits.stream_window_bytes,
                backlog_calls=backlog_calls(plan),
            ),
        )
        add_servicer(self.servicer, self._server)
        self.health_service = HealthService(self.health, (SERVICE,))
        self.health_service.add_to(self._server)
        self.port = 0

    @property
    def address(self) -> str:
        """The host:port this server listens on, IPv6 addresses in brackets."""
        return host_port(self.plan.aggregator.listen_address, self.plan.aggregator.port)

    def start(self) -> int:
        """Bind and start serving; returns the port (the chosen one when the plan says 0)."""
        certs = self.plan.tls.certs
        credentials = None
        if certs is None:
            logger.warning(
                "INSECURE: serving without TLS, as %s says (tls.insecure: true); anyone who "
                "can reach %s can claim to be a collaborator",
                self.plan.path,
                self.address,
            )
        else:
            credentials = server_credentials(
                certs.aggregator_cert, certs.aggregator_key, certs.ca_bundle
            )
        self.port = self._bind(self.address, credentials)
        if self.metrics_server is not None:
            try:
                self.metrics_server.start()
            except OSError as error:
                self._server.stop(0)
                raise ServerError(
                    f"{self.plan.path}: aggregator.metrics_address: cannot serve metrics on "
                    f"{self.metrics_server.address}: {error.strerror or error}"
                ) from None
        self._server.start()
        self.health.started()
        self._storage_watch.start()
        logger.info(
            "aggregator serving federation %s on port %d", self.plan.federation.uuid, self.port
        )
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight calls get `grace` seconds (the plan's by default)."""
        if grace is None:
            grace = self.plan.aggregator.grace_seconds
        self.health.stopping()  # NOT_SERVING to watchers first, for the whole grace
        self.health_service.shutdown()
        self.servicer.stop_long_polls()  # waiting GetTasks calls answer now, not after the grace
        self._server.stop(grace).wait()
        self._storage_watch.stop()
        if self.metrics_server is not None:  # scraped until the end
            self.metrics_server.stop()
