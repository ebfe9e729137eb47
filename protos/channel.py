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


def server_options(
    max_message_bytes: int, stream_window_bytes: int | None = None
) -> list[tuple[str, int | str]]:
    """Options for the aggregator's server; accepts the clients' keepalive pings.

    Each stream's HTTP/2 flow-control window bounds how much of an upload can wait in the
    aggregator's memory before it reads it. By default gRPC sizes it from the bandwidth-delay
    product it measures (BDP probing), so a collaborator far away still fills its link; with
    `stream_window_bytes` the window is fixed: less memory, and at most that many bytes per round
    trip (4 MiB over 100 ms: 40 MB/s). In make bench's round of 8 concurrent 100 MB uploads
    on loopback the aggregator's peak was 241-274 MB with 4 MiB (three runs), 295-321 MB with
    8 MiB, 357-438 MB with 16 MiB (two runs each) and 286-429 MB by default, at the same round
    time.
    """
    window: list[tuple[str, int | str]] = []
    if stream_window_bytes is not None:
        window = [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", stream_window_bytes),
        ]
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
        *window,
    ]
