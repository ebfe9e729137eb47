"""Test helper: a TCP proxy between collaborators and the aggregator that injects network faults.

The proxy forwards bytes and never looks inside them: TLS runs end to end through it, so it never
sees plaintext. Faults are placed by byte counts and time alone. An *upload* is a burst of
client-to-server bytes with no server-to-client byte in between; a collaborator's requests
(GetTasks, GetAggregatedModel, metric results) are a few hundred bytes, a trained model's
upload is kilobytes. A fault armed "at N bytes" fires once, in the first burst that grows past N
bytes, after forwarding exactly N bytes of it:

* `FaultKind.RESET`: then both sides get a TCP RST (SO_LINGER 0), as when a middlebox drops state;
* `FaultKind.HALF_SENT`: then both sides get a FIN, so the aggregator sees a truncated stream;
* `FaultKind.STALL`: then nothing moves on any connection for `seconds`, after which everything
  held back is delivered, late.

`set_latency` delays every chunk forwarded, in both directions, from the moment it is called.

Every thread is a daemon; a blocked read is woken by shutting its socket down, every other wait
is bounded, and `stop` joins the threads within a timeout.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

logger = logging.getLogger(__name__)

CHUNK_BYTES = 65536
ACCEPT_POLL_SECONDS = 0.1
CONNECT_TIMEOUT_SECONDS = 5.0
JOIN_TIMEOUT_SECONDS = 5.0


class FaultKind(Enum):
    """What happens to an upload once the armed number of its bytes has been forwarded."""

    RESET = "reset"
    HALF_SENT = "half-sent"
    STALL = "stall"


@dataclass(frozen=True)
class Fault:
    """A fault waiting for an upload: `kind` after `at_bytes` of it; `seconds` for a stall."""

    kind: FaultKind
    at_bytes: int
    seconds: float = 0.0


@dataclass(frozen=True)
class Fired:
    """A fault that happened: on which connection (numbered from 1) and how big the burst was."""

    fault: Fault
    connection: int
    burst_bytes: int  # of the burst at the moment the fault fired (at least at_bytes + 1)
    monotonic: float


class _Connection:
    """One client connection and the proxy's own connection to the upstream server."""

    def __init__(self, number: int, client: socket.socket, server: socket.socket) -> None:
        self.number = number
        self.client = client
        self.server = server
        self.burst = 0  # client-to-server bytes since the last server-to-client byte
        self.cut = False  # a fault or stop ended it: the pumps must not touch the sockets again
        self._open_pumps = 2
        self._lock = threading.Lock()

    def end(self, *, reset: bool) -> None:
        """Cut both sides at once: an RST each (`reset`), or a FIN each; wakes both pumps."""
        with self._lock:
            if self.cut:
                return
            self.cut = True
        for sock in (self.client, self.server):
            try:
                if reset:
                    # Linger 0: close sends RST instead of FIN. SHUT_RD sends nothing and only
                    # wakes a pump blocked in recv; the RST leaves when the last user lets go.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the peer went first
            sock.close()

    def pump_finished(self) -> None:
        """One direction is done; after both, close the sockets (a no-op after `end`)."""
        with self._lock:
            self._open_pumps -= 1
            last = self._open_pumps == 0 and not self.cut
            if last:
                self.cut = True
        if last:
            self.client.close()
            self.server.close()


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `upstream`, with the faults it is told to inject."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._connections: list[_Connection] = []
        self._latency = 0.0
        self._armed: Fault | None = None
        self._stalled_until = 0.0
        self._fired: list[Fired] = []
        self.port = 0

    # -- control ----------------------------------------------------------------------------------

    def start(self) -> int:
        """Listen on 127.0.0.1 on a free port and start accepting; returns the port."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(ACCEPT_POLL_SECONDS)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop, "fault-proxy-accept", listener)
        return self.port

    def stop(self, timeout: float = JOIN_TIMEOUT_SECONDS) -> None:
        """Stop accepting, close every connection, and join every thread within `timeout` s."""
        self._stop.set()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for connection in connections:
            connection.end(reset=False)  # SHUT_RDWR wakes a pump blocked in send as well
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
        alive = [thread.name for thread in threads if thread.is_alive()]
        if alive:
            raise RuntimeError(f"fault proxy threads still running after {timeout} s: {alive}")

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk forwarded from now on by `seconds` (0 turns latency off)."""
        self._latency = seconds

    def arm(self, fault: Fault) -> None:
        """Inject `fault` into the next upload that grows past `fault.at_bytes` (once)."""
        with self._lock:
            self._armed = fault

    @property
    def fired(self) -> tuple[Fired, ...]:
        """The faults that have happened, in order."""
        with self._lock:
            return tuple(self._fired)

    @property
    def connections(self) -> int:
        """How many client connections the proxy has accepted."""
        with self._lock:
            return len(self._connections)

    # -- threads ----------------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT_SECONDS)
            except OSError as error:
                logger.info("fault proxy: upstream %s:%d refused: %s", *self.upstream, error)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    server.close()
                    return
                connection = _Connection(len(self._connections) + 1, client, server)
                self._connections.append(connection)
            number = connection.number
            self._spawn(self._pump, f"fault-proxy-{number}-up", connection, True)
            self._spawn(self._pump, f"fault-proxy-{number}-down", connection, False)

    def _pump(self, connection: _Connection, upstream: bool) -> None:
        """Forward one direction of one connection until EOF, an error or a fault ends it."""
        source, target = (
            (connection.client, connection.server)
            if upstream
            else (connection.server, connection.client)
        )
        try:
            while True:
                data = source.recv(CHUNK_BYTES)
                if connection.cut:
                    return
                if not data:  # EOF: pass the half-close on, keep the other direction going
                    target.shutdown(socket.SHUT_WR)
                    return
                self._hold_while_stalled()
                if self._latency > 0:
                    self._stop.wait(self._latency)
                if upstream:
                    rest = self._forward_upload(connection, data)
                    if rest is None:
                        return
                    data = rest
                else:
                    connection.burst = 0
                if data:
                    target.sendall(data)
        except OSError:
            # A peer reset its side (or `end` closed the socket under us): reset the other side.
            connection.end(reset=True)
        finally:
            connection.pump_finished()

    def _forward_upload(self, connection: _Connection, data: bytes) -> bytes | None:
        """Count `data` into the burst; if the armed fault fires, inject it.

        Returns what is left to forward, or None when the fault ended the connection.
        """
        with self._lock:
            before = connection.burst
            connection.burst += len(data)
            fault = self._armed
            if fault is None or connection.burst <= fault.at_bytes:
                return data
            self._armed = None
            self._fired.append(Fired(fault, connection.number, connection.burst, time.monotonic()))
        keep = max(0, fault.at_bytes - before)
        logger.info(
            "fault proxy: %s on connection %d after %d bytes of an upload",
            fault.kind.value,
            connection.number,
            fault.at_bytes,
        )
        connection.server.sendall(data[:keep])
        if fault.kind is FaultKind.STALL:
            self._stalled_until = time.monotonic() + fault.seconds
            self._hold_while_stalled()
            return data[keep:]
        connection.end(reset=fault.kind is FaultKind.RESET)
        return None

    def _hold_while_stalled(self) -> None:
        """Wait (bounded, woken by `stop`) until no stall is in force."""
        while not self._stop.is_set():
            remaining = self._stalled_until - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(remaining)
