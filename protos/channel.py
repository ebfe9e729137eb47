"""gRPC channel and server options both sides derive from the plan's limits, and the address
both give gRPC (`host_port`).

Message size limits must agree on both ends, or the larger side's messages fail as
RESOURCE_EXHAUSTED; keepalive lets a collaborator notice a dead aggregator (and the reverse)
within about a minute instead of waiting for the TCP timeout.
"""

from __future__ import annotations

KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# gRPC's own bounds on the calls a server has received but not yet taken: past 1,000 it cancels
# new ones at random, all past 3,000, and any that waited 30 s, each as a bare CANCELLED the
# caller cannot tell from its own cancel (make bench's 2,000 collaborators met this: a
# collaborator's GetTasks cancelled before the aggregator saw it ended its loop, and the round
# waited for it without end). The aggregator's own limits, per caller and by deadline, do that
# work with statuses that say what happened; gRPC's only have to stay out of their way.
GRPC_BACKLOG_CALLS = 1_000
GRPC_BACKLOG_HARD_LIMIT = 3_000
BACKLOG_SECONDS = 24 * 3600


def _both_ends(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """What both ends must agree on: the message size limit, and keepalive pings when idle."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Options for a collaborator's channel to the aggregator."""
    return [*_both_ends(max_message_bytes), ("grpc.http2.max_pings_without_data", 0)]


def server_options(
    max_message_bytes: int,
    stream_window_bytes: int | None = None,
    *,
    backlog_calls: int = GRPC_BACKLOG_CALLS,
) -> list[tuple[str, int | str]]:
    """Options for the aggregator's server; accepts the clients' keepalive pings.

    Calls received while every worker is busy, or while the server's thread that takes them
    is slow to run (a loaded machine), wait in gRPC's backlog: up to `backlog_calls` of them
    (at least gRPC's defaults), for as long as their callers' deadlines allow.

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
        *_both_ends(max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        # gRPC sets SO_REUSEPORT by default: two aggregators would then share a port silently.
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", max(GRPC_BACKLOG_CALLS, backlog_calls)),
        (
            "grpc.server.max_pending_requests_hard_limit",
            max(GRPC_BACKLOG_HARD_LIMIT, backlog_calls),
        ),
        ("grpc.server_max_unrequested_time_in_server", BACKLOG_SECONDS),
        *window,
    ]


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC takes it, to dial or to listen on (and a URL's authority): an IPv6
    literal in brackets, a host already in brackets as it is."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
