"""AggregatorConnection: the channels to one aggregator, opened, checked, dropped and opened again.

A channel is made in one place (`_open_channel`), with the TLS files read again each time, so a
rotated certificate is used after a reconnect. Kept between calls, or, with atomic connections,
one per call (the caller closes it). Before a connection's first call the server's certificate
is looked at (`foedus.collaborator.server_identity`): a look that cannot complete raises
`ProbeFailedError` (the caller counts it as UNAVAILABLE); a server that is not our aggregator
raises `AggregatorIdentityError`, never retried.

Not meant to be shared between threads, since a reconnect by one thread would close the channel
under another's call; the heartbeat's channel, used from a thread of its own, is the exception
and has its own lock.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Self

import grpc

from foedus.collaborator.errors import ClientConfigurationError
from foedus.collaborator.server_identity import ClientFiles, check_aggregator
from foedus.collaborator.settings import ClientSettings
from foedus.pki.errors import PkiError
from foedus.pki.tls import channel_credentials
from foedus.protos.channel import client_options


class AggregatorConnection:
    """The channels of one collaborator to its aggregator, as its `settings` say."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        # Who the aggregator must be (collaborator.server_identity); by default the host dialled.
        self.expected = settings.expected
        self._channel: grpc.Channel | None = None
        # Whether the server's certificate was seen since the last connection failure.
        self._identity_checked = False
        # Heartbeats come from another thread (`collaborator.heartbeat`), on a channel of their own.
        self._heartbeat_lock = threading.Lock()
        self._heartbeat_channel: grpc.Channel | None = None

    @property
    def target(self) -> str:
        """The `host:port` gRPC dials, an IPv6 literal in brackets."""
        return self.settings.target

    @property
    def connected(self) -> bool:
        """Whether a channel is held open between calls (never, with atomic connections)."""
        return self._channel is not None

    def connect(self) -> None:
        """Open the channel now (or, with atomic connections, check the TLS files now) to fail early."""
        if self.settings.enable_atomic_connections:
            self._credentials()
        else:
            self._kept_channel()

    def disconnect(self) -> None:
        """Close the channels; the next call opens a new one, after checking who is there again."""
        self._identity_checked = False
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._drop_heartbeat_channel()

    def reconnect(self) -> None:
        """Replace the channel with a new one, reading the TLS files again (rotated certificates)."""
        self.disconnect()
        self.connect()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.disconnect()

    def _heartbeat_channel_now(self) -> grpc.Channel:
        """The heartbeat's own channel, opened if there is none (safe from another thread)."""
        with self._heartbeat_lock:
            if self._heartbeat_channel is None:
                self._heartbeat_channel = self._open_channel()
            return self._heartbeat_channel

    def _drop_heartbeat_channel(self) -> None:
        with self._heartbeat_lock:
            channel, self._heartbeat_channel = self._heartbeat_channel, None
        if channel is not None:
            channel.close()

    def _credentials(self) -> grpc.ChannelCredentials:
        """The TLS credentials, read from the files now, so a rotated certificate is picked up."""
        settings = self.settings
        if settings.root_certificate is None:
            raise ClientConfigurationError("TLS needs root_certificate (the CA bundle)")
        try:
            return channel_credentials(
                settings.root_certificate, settings.certificate, settings.private_key
            )
        except PkiError as error:
            raise ClientConfigurationError(
                f"cannot load the TLS files of {settings.collaborator_name!r}: {error}"
            ) from None

    def _open_channel(self) -> grpc.Channel:
        """A new channel to the aggregator; the one place channels are made.

        gRPC checks the server's certificate against the name bound to the expected common name
        (`foedus.collaborator.server_identity`), in the handshake of the session that carries the
        RPCs.
        """
        options = client_options(self.settings.max_message_bytes)
        if not self.settings.tls:
            return grpc.insecure_channel(self.target, options=options)
        options.append(("grpc.ssl_target_name_override", self.expected.server_name))
        return grpc.secure_channel(self.target, self._credentials(), options=options)

    def _check_identity(self, timeout: float | None = None) -> None:
        """Look at the server's certificate on a handshake of our own, once per connection.

        Raises `AggregatorIdentityError` for a server that is not our aggregator and
        `ProbeFailedError` when no handshake completed.
        """
        settings = self.settings
        if not settings.tls or self._identity_checked:
            return
        if settings.root_certificate is None:
            raise ClientConfigurationError("TLS needs root_certificate (the CA bundle)")
        files = ClientFiles(settings.root_certificate, settings.certificate, settings.private_key)
        check_aggregator(
            settings.aggregator_address,
            settings.aggregator_port,
            self.expected,
            files,
            timeout=settings.deadline if timeout is None else timeout,
        )
        self._identity_checked = True

    def _kept_channel(self) -> grpc.Channel:
        """The channel kept between calls, opened if there is none."""
        if self._channel is None:
            self._channel = self._open_channel()
        return self._channel
