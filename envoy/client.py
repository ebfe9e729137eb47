"""The envoy's side of the wire: director.proto's envoy RPCs over mutual TLS, one attempt each.

The envoy's identity is its site's collaborator certificate (CN = the site's name); the director's
certificate is checked against the CA bundle and the director's host name, as a collaborator checks
its aggregator's (`foedus.pki.tls.channel_credentials`, read again on every new channel, so renewed
files are used after a reconnect). Protobuf stays here: the envoy's loop gets
`foedus.lifecycle.orders` dataclasses (converted by `foedus.lifecycle.wire`). A call that did not
reach the director or got no answer raises `DirectorUnavailableError` (the channel is dropped; the
caller backs off and tries again); every other status is a refusal, `DirectorRefusedError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Self, TypeVar

import grpc

from foedus.envoy.config import EnvoyConfig, Shard
from foedus.envoy.errors import DirectorRefusedError, DirectorUnavailableError
from foedus.envoy.site import LogPiece, Report
from foedus.lifecycle.orders import Work
from foedus.lifecycle.wire import report_to_proto, work_from_proto
from foedus.pki.tls import channel_credentials
from foedus.protos import director_pb2
from foedus.protos.channel import client_options
from foedus.protos.director_pb2_grpc import DirectorStub
from foedus.retry.backoff import RETRYABLE

logger = logging.getLogger(__name__)

R = TypeVar("R")
MAX_MESSAGE_BYTES = 128 * 1024 * 1024  # a heartbeat's answer carries whole plans
LOG_MESSAGE_BYTES = 256 * 1024  # a log is sent in pieces of this size


class DirectorClient:
    """Calls the director for one envoy; one thread at a time."""

    def __init__(self, name: str, config: EnvoyConfig) -> None:
        """`name` is the site's (its certificate's CN); `config` says where and how."""
        self.name = name
        self.target = config.director_target
        self.deadline = config.connection.deadline_seconds
        self._certs = config.certs
        self._channel: grpc.Channel | None = None
        self._stub: DirectorStub | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop the channel (a new one is made, with the files read again, at the next call)."""
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def check_identity(self) -> None:
        """Read and check the certificate, key and CA bundle now; `PkiError` naming the file."""
        self._credentials()

    def register(self, shard: Shard, version: str) -> float:
        """RegisterEnvoy: the heartbeat period the director asks for."""
        request = director_pb2.RegisterEnvoyRequest(
            shard=director_pb2.ShardInfo(
                description=shard.description,
                train_samples=shard.train_samples,
                valid_samples=shard.valid_samples,
                labels=dict(shard.labels),
            ),
            version=version,
        )
        response = self._call(
            "RegisterEnvoy", lambda stub: stub.RegisterEnvoy(request, timeout=self.deadline)
        )
        return response.health_check_seconds

    def heartbeat(self, reports: list[Report]) -> tuple[Work | None, float]:
        """EnvoyHeartbeat: the work, or None when the director says register again; the period."""
        request = director_pb2.EnvoyHeartbeatRequest(
            collaborators=[report_to_proto(r) for r in reports]
        )
        response = self._call(
            "EnvoyHeartbeat", lambda stub: stub.EnvoyHeartbeat(request, timeout=self.deadline)
        )
        return work_from_proto(response), response.health_check_seconds

    def report(self, report: Report) -> None:
        """ReportCollaborator (idempotent on the director's side)."""
        request = report_to_proto(report)
        self._call(
            "ReportCollaborator",
            lambda stub: stub.ReportCollaborator(request, timeout=self.deadline),
        )

    def upload_log(self, request_id: str, piece: LogPiece) -> None:
        """UploadLog: the piece in messages of at most `LOG_MESSAGE_BYTES`."""

        def messages() -> Iterator[director_pb2.LogUpload]:
            data = piece.data
            yield director_pb2.LogUpload(
                request_id=request_id,
                found=piece.found,
                log_size=piece.size,
                data=data[:LOG_MESSAGE_BYTES],
            )
            for start in range(LOG_MESSAGE_BYTES, len(data), LOG_MESSAGE_BYTES):
                yield director_pb2.LogUpload(data=data[start : start + LOG_MESSAGE_BYTES])

        self._call("UploadLog", lambda stub: stub.UploadLog(messages(), timeout=self.deadline))

    # -- the one place calls go through --------------------------------------------------------

    def _call(self, rpc: str, invoke: Callable[[DirectorStub], R]) -> R:
        try:
            return invoke(self._connected())
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
            if code in RETRYABLE:
                self.close()  # a new channel next time, so it does not reconnect while we wait
                raise DirectorUnavailableError(
                    f"{rpc} to the director at {self.target}: {code.name} ({details})"
                ) from None
            raise DirectorRefusedError(rpc, code.name, details) from None

    def _connected(self) -> DirectorStub:
        if self._stub is None:
            self._channel = grpc.secure_channel(
                self.target, self._credentials(), options=client_options(MAX_MESSAGE_BYTES)
            )
            self._stub = DirectorStub(self._channel)
        return self._stub

    def _credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(
            self._certs.ca_bundle,
            self._certs.collaborator_cert(self.name),
            self._certs.collaborator_key(self.name),
        )
