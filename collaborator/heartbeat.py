"""Heartbeats while a task runs, so the aggregator does not take a long task for a death.

The aggregator judges who is alive by their calls (`straggler.offline_after_seconds`); a
collaborator training for an hour makes none. While a task runs, a thread of its own sends a
`Heartbeat` every `connection.heartbeat_seconds` (`AggregatorGRPCClient.heartbeat`: a channel of
its own, one attempt each, never retried: the next one comes soon enough). An aggregator that
answers UNIMPLEMENTED (OpenFL's) gets no more of them, and the log says so once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# How long the end of a task waits for a heartbeat in flight (it is never waited for longer).
JOIN_SECONDS = 1.0


class Heartbeat:
    """Calls `send` every `interval` seconds while inside `during`; `interval` None: never.

    `send` returns False when the aggregator does not take heartbeats; none are sent after that.
    """

    def __init__(self, send: Callable[[], bool], interval: float | None) -> None:
        if interval is not None and not interval > 0:
            raise ValueError(f"interval must be > 0 seconds or None, got {interval}")
        self._send = send
        self.interval = interval
        self.supported = True
        self.sent = 0  # heartbeats the aggregator took

    @contextmanager
    def during(self) -> Iterator[None]:
        """Send heartbeats while inside (a task runs), from a thread of their own."""
        if self.interval is None or not self.supported:
            yield
            return
        stop = threading.Event()
        thread = threading.Thread(
            target=self._beat, args=(stop, self.interval), name="heartbeat", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(JOIN_SECONDS)  # a heartbeat in flight finishes on its own

    def _beat(self, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            if self._send():
                self.sent += 1
                continue
            self.supported = False
            logger.info(
                "the aggregator does not take heartbeats (it is not foedus): none are sent any "
                "more, and it judges this collaborator by its other calls only"
            )
            return
