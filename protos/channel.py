"""gRPC channel and server options both sides derive from the plan's limits.

Message size limits must agree on both ends, or the larger side's messages fail as
RESOURCE_EXHAUSTED; keepalive lets a collaborator notice a dead aggregator (and the reverse)
within about a minute instead of waiting for the TCP timeout.
"""

from __future__ import annotations

KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def client_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Options for a collaborator's channel to the aggregator."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Options for the aggregator's server; accepts the clients' keepalive pings."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        # gRPC sets SO_REUSEPORT by default: two aggregators would then share a port silently.
        ("grpc.so_reuseport", 0),
    ]
