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

`set_latency` makes the proxy a delay line from the moment it is called: every byte, in both
directions, is forwarded that much later than it arrived, and throughput is unchanged (a chunk
waits for its own due time on a thread of its own, never holding up the next read). The bytes a
direction holds are bounded (`DELAY_LINE_BYTES`): past that, reading waits, as a full link would.

Every thread is a daemon; a blocked read is woken by shutting its socket down, every other wait
is bounded, and `stop` joins the threads within a timeout.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

logger = logging.getLogger(__name__)

CHUNK_BYTES = 65536
ACCEPT_POLL_SECONDS = 0.1
CONNECT_TIMEOUT_SECONDS = 5.0
JOIN_TIMEOUT_SECONDS = 5.0
# What one direction of a connection may hold in its delay line: 320 ms at 200 Mbit/s, so a
# shaped wide-area link is never throttled by it, and memory stays bounded on loopback.
DELAY_LINE_BYTES = 8 * 1024 * 1024


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
        # The delay line of each direction (True: client to server), made at its first delayed
        # chunk; from then on every chunk of that direction goes through it, in order.
        self.lines: dict[bool, _DelayLine] = {}

    def end(self, *, reset: bool) -> None:
        """Cut both sides at once: an RST each (`reset`), or a FIN each; wakes both pumps."""
        with self._lock:
            if self.cut:
                return
            self.cut = True
            lines = list(self.lines.values())
        for line in lines:
            line.close()
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

    def add_line(self, upstream: bool, line: _DelayLine) -> None:
        """From now on, the direction `upstream` (client to server) goes through `line`."""
        with self._lock:
            self.lines[upstream] = line

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


class _DelayLine:
    """One direction of one connection, forwarded `latency` after each chunk arrived.

    `push` only queues (waiting while the line holds `DELAY_LINE_BYTES`); a thread of its own
    sends each chunk at its due time, so the reading side keeps the link's pace.
    """

    def __init__(self, connection: _Connection, target: socket.socket, stop: threading.Event):
        self.connection = connection
        self.target = target
        self._stop = stop
        self._queue: deque[tuple[float, bytes | None]] = deque()  # None: pass the EOF on
        self._held = 0
        self._changed = threading.Condition()
        self.closed = False

    def push(self, due: float, data: bytes | None) -> None:
        """Queue `data` (None for the EOF) to leave at `due`; waits while the line is full."""
        with self._changed:
            while self._held >= DELAY_LINE_BYTES and not (self.closed or self._stop.is_set()):
                self._changed.wait(ACCEPT_POLL_SECONDS)
            self._queue.append((due, data))
            self._held += 0 if data is None else len(data)
            self._changed.notify_all()

    def close(self) -> None:
        """Stop sending; what is still in the line is dropped, as on a cut link."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def run(self) -> None:
        """Send each chunk at its due time until the EOF passes, the line closes or stop; then
        this direction is finished (its pump handed that over to the line)."""
        try:
            self._send_all()
        except OSError:
            # The peer reset its side (or `end` closed the socket): reset the other side.
            self.connection.end(reset=True)
        finally:
            self.connection.pump_finished()

    def _send_all(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not (self.closed or self._stop.is_set()):
                    self._changed.wait(ACCEPT_POLL_SECONDS)
                if self.closed or self._stop.is_set():
                    return
                due, data = self._queue[0]
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            with self._changed:
                self._queue.popleft()
                self._held -= 0 if data is None else len(data)
                self._changed.notify_all()
            if data is None:
                self.target.shutdown(socket.SHUT_WR)
                return
            self.target.sendall(data)


class FaultProxy:
    """Forwards `listen_host`:`port` to `upstream`, with the faults it is told to inject."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
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
        """Listen on `listen_host` on a free port and start accepting; returns the port."""
        listener = socket.socket()
        listener.bind((self.listen_host, 0))
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
        """Forward every byte arriving from now on `seconds` after it arrived, each way."""
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
        line: _DelayLine | None = None
        try:
            while True:
                data = source.recv(CHUNK_BYTES)
                if connection.cut:
                    return
                arrived = time.monotonic()
                line = self._line(connection, upstream, target)
                if not data:  # EOF: pass the half-close on, keep the other direction going
                    if line is None:
                        target.shutdown(socket.SHUT_WR)
                    else:
                        line.push(arrived + self._latency, None)
                    return
                self._hold_while_stalled()
                if upstream:
                    rest = self._forward_upload(connection, data)
                    if rest is None:
                        return
                    data = rest
                else:
                    connection.burst = 0
                if not data:
                    continue
                if line is None:
                    target.sendall(data)
                else:
                    line.push(arrived + self._latency, data)
        except OSError:
            # A peer reset its side (or `end` closed the socket under us): reset the other side.
            connection.end(reset=True)
        finally:
            if line is None:  # else the line finishes this direction once it has drained
                connection.pump_finished()

    def _line(
        self, connection: _Connection, upstream: bool, target: socket.socket
    ) -> _DelayLine | None:
        """The delay line of this direction: made (with its thread) once latency is set."""
        line = connection.lines.get(upstream)
        if line is None and self._latency > 0:
            line = _DelayLine(connection, target, self._stop)
            connection.add_line(upstream, line)
            direction = "up" if upstream else "down"
            self._spawn(line.run, f"fault-proxy-{connection.number}-{direction}-line")
        return line

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
