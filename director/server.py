"""DirectorServer: the director's gRPC server, its credentials, its supervisor thread, start and stop."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc

from foedus.director.launcher import Launcher, LocalLauncher
from foedus.director.metrics import DirectorMetrics
from foedus.director.service import DirectorService
from foedus.director.servicer import DirectorServicer
from foedus.director.state import DirectorState
from foedus.director.tokens import TokenStore
from foedus.director.web_server import WebServer, WebServerError
from foedus.pki.tls import server_credentials
from foedus.plans.director_config import DirectorConfig
from foedus.protos import director_pb2_grpc
from foedus.protos.channel import host_port, server_options
from foedus.serving.server import ServerError, Serving

logger = logging.getLogger(__name__)

# Threads beyond those of every call the limits admit: for calls being refused, which end at once.
REFUSAL_WORKERS = 16
MESSAGE_BYTES_SLACK = 64 * 1024  # a chunk's message: the chunk plus its few other fields
CLIENT_CHUNK_BYTES = 1024 * 1024  # the largest piece a client may send (protos/director.proto)


def workers_for(config: DirectorConfig) -> int:
    """Worker threads enough for every call `foedus.director.capacity.Capacity` admits, and some over.

    A call holds its thread from start to end (a followed stream as long as it follows), so
    the threads are sized to the limits: all people's calls, each envoy's uploads and, apart, its
    heartbeats, registrations and reports. A call past the limits is refused at once by a thread
    of the margin, so nothing admitted (an envoy's heartbeat least of all) waits behind people's
    calls. gRPC's own `maximum_concurrent_rpcs` stays unset: it refuses by arrival, not by
    identity, so a flood of one caller's calls would refuse everyone's alike.
    """
    limits = config.limits
    envoys = 2 * len(config.envoys) * limits.max_calls_per_identity
    return limits.max_people_calls + envoys + REFUSAL_WORKERS


class DirectorServer(Serving):
    """Serves a director.yaml's director over mutual TLS, its supervisor running beside it."""

    def __init__(
        self,
        config: DirectorConfig,
        *,
        launcher: Launcher | None = None,
        supervise_seconds: float = 0.25,
    ) -> None:
        """Open the state (`StorageError` if unusable or in use) and prepare the server."""
        self.config = config
        self.state = DirectorState.open(
            config.state_dir, health_check_seconds=config.health_check_seconds
        )
        self.service = DirectorService(
            config, self.state, LocalLauncher() if launcher is None else launcher
        )
        self.stopping = threading.Event()
        limit = (
            max(config.limits.max_plan_bytes, config.limits.chunk_bytes, CLIENT_CHUNK_BYTES)
            + MESSAGE_BYTES_SLACK
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=workers_for(config), thread_name_prefix="director-rpc"
            ),
            options=server_options(limit),
        )
        self.servicer = DirectorServicer(self.service, self.stopping)
        director_pb2_grpc.add_DirectorServicer_to_server(self.servicer, self._server)
        self.dashboard: WebServer | None = None
        if config.dashboard_address is not None:
            # FastAPI took 0.3 s of every director's start, the dashboard on or not (off by default).
            from foedus.director.dashboard import create_app  # noqa: PLC0415

            app = create_app(self.service, TokenStore(config.state_dir))
            self.dashboard = WebServer(app, config.dashboard_address, config.certs)
        self.metrics: DirectorMetrics | None = None
        if config.metrics_address is not None:
            self.metrics = DirectorMetrics(self.state, config.metrics_address)
        self._supervise_seconds = supervise_seconds
        self._supervisor: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """The host:port this server listens on, IPv6 addresses in brackets."""
        return host_port(self.config.listen_address, self.config.port)

    def start(self) -> int:
        """Find running experiments again, bind and serve, start supervising; the port."""
        self.service.recover()
        certs = self.config.certs
        credentials = server_credentials(
            certs.aggregator_cert, certs.aggregator_key, certs.ca_bundle
        )
        self.port = self._bind(self.address, credentials)
        self._server.start()
        self._start_web()
        self._supervisor = threading.Thread(
            target=self.service.run,
            args=(self.stopping, self._supervise_seconds),
            name="director-supervisor",
            daemon=True,
        )
        self._supervisor.start()
        logger.info("director serving on port %d (state in %s)", self.port, self.config.state_dir)
        return self.port

    def _start_web(self) -> None:
        """The dashboard and the metrics endpoint, when director.yaml asks for them."""
        for key, web in (("dashboard.address", self.dashboard), ("metrics_address", self.metrics)):
            if web is None:
                continue
            try:
                web.start()
            except (OSError, WebServerError) as error:
                self._server.stop(0)
                for other in (self.dashboard, self.metrics):
                    if other is not None:
                        other.stop()
                detail = error.strerror if isinstance(error, OSError) else None
                raise ServerError(
                    f"{self.config.path}: {key}: cannot serve on "
                    f"{web.address.with_port(web.address.port)}: {detail or error}"
                ) from None

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving and supervising; running aggregators go on, to be adopted at next start."""
        self.stopping.set()
        for web in (self.dashboard, self.metrics):
            if web is not None:
                web.stop()
        self._server.stop(grace).wait()
        if self._supervisor is not None:
            self._supervisor.join(timeout=60)
        self.state.close()
