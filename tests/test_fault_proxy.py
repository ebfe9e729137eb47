"""The fault proxy's delay line: every byte late by the latency each way, the pace unchanged.

A plain TCP echo server on 127.0.0.1 behind the proxy; no gRPC, the proxy never looks inside.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fault_proxy import CHUNK_BYTES, FaultProxy

LATENCY_SECONDS = 0.2
TIMEOUT_SECONDS = 30.0


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that sends back whatever it reads, one client at a time."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT_SECONDS)

    def serve() -> None:
        try:
            peer, _ = listener.accept()
        except OSError:
            return
        with peer:
            peer.settimeout(TIMEOUT_SECONDS)
            while data := peer.recv(CHUNK_BYTES):
                peer.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(TIMEOUT_SECONDS)


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from `sock`, or an error if it ends first."""
    parts = []
    while size:
        part = sock.recv(min(size, CHUNK_BYTES))
        assert part, f"the connection ended with {size} bytes still to come"
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def test_a_byte_comes_back_no_sooner_than_the_latency_each_way(echo_port: int) -> None:
    """With latency L set, one byte through the proxy and back takes at least 2 L."""
    with FaultProxy("127.0.0.1", echo_port) as proxy:
        proxy.set_latency(LATENCY_SECONDS)
        with socket.create_connection(("127.0.0.1", proxy.port), TIMEOUT_SECONDS) as sock:
            started = time.monotonic()
            sock.sendall(b"x")
            assert receive_exactly(sock, 1) == b"x"
            assert time.monotonic() - started >= 2 * LATENCY_SECONDS


def test_the_delay_line_keeps_the_pace_of_the_bytes(echo_port: int) -> None:
    """64 chunks echoed through the line in order, within far less than a sleep per chunk."""
    chunks = 64
    payload = bytes(range(256)) * (chunks * CHUNK_BYTES // 256)
    with FaultProxy("127.0.0.1", echo_port) as proxy:
        proxy.set_latency(LATENCY_SECONDS)
        with socket.create_connection(("127.0.0.1", proxy.port), TIMEOUT_SECONDS) as sock:
            sock.settimeout(TIMEOUT_SECONDS)
            started = time.monotonic()
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            echoed = receive_exactly(sock, len(payload))
            elapsed = time.monotonic() - started
            sender.join(TIMEOUT_SECONDS)
    assert echoed == payload
    # A proxy that slept L per chunk would take at least `chunks` x L each way; the line takes
    # about 2 L in all. Half of one way's sleeps tells them apart with room for a loaded machine.
    assert 2 * LATENCY_SECONDS <= elapsed < chunks * LATENCY_SECONDS / 2
