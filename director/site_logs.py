"""The log rendezvous: a person's request for a site's log meets its envoy's upload.

The director cannot call an envoy: a request waits here until the envoy's next heartbeat takes
it (`orders_for`), and the person's call waits (at most its timeout) until the envoy's upload
answers it (`answer`). Nothing is kept once the person's call stops waiting: a late upload finds
no request and is refused (`NotFoundError`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable

from foedus.lifecycle.orders import LogOrder
from foedus.refusals.errors import LimitExceededError, NotFoundError


class LogRendezvous:
    """Log requests waiting for an envoy's heartbeat, and the envoys' answers."""

    def __init__(self) -> None:
        """No request waiting."""
        self._condition = threading.Condition()
        self._orders: dict[str, list[LogOrder]] = {}  # by envoy
        self._owners: dict[str, str] = {}  # request id -> envoy
        self._answers: dict[str, tuple[bool, bytes]] = {}

    def ask(
        self, site: str, experiment_id: str, offset: int, max_bytes: int, timeout: float
    ) -> tuple[bool, bytes] | None:
        """Ask `site`'s envoy for its log; (found, data), or None if no answer came in time."""
        order = LogOrder(str(uuid.uuid4()), experiment_id, offset, max_bytes)
        request_id = order.request_id
        with self._condition:
            self._orders.setdefault(site, []).append(order)
            self._owners[request_id] = site
            try:
                self._condition.wait_for(lambda: request_id in self._answers, timeout)
                return self._answers.pop(request_id, None)
            finally:
                self._owners.pop(request_id, None)
                pending = self._orders.get(site, [])
                if order in pending:
                    pending.remove(order)

    def orders_for(self, envoy: str) -> tuple[LogOrder, ...]:
        """The requests waiting for `envoy`, taken: its heartbeat's answer carries them."""
        with self._condition:
            return tuple(self._orders.pop(envoy, []))

    def answer(
        self, envoy: str, request_id: str, found: bool, pieces: Iterable[bytes], limit: int
    ) -> None:
        """Take `envoy`'s upload for one of its requests, at most `limit` bytes."""
        with self._condition:
            if self._owners.get(request_id) != envoy:
                raise NotFoundError(f"no log request {request_id!r} is waiting for {envoy!r}")
        data = bytearray()
        for piece in pieces:
            data += piece
            if len(data) > limit:
                raise LimitExceededError(f"the log upload is over the {limit} bytes asked for")
        with self._condition:
            if request_id in self._owners:
                self._answers[request_id] = (found, bytes(data))
                self._condition.notify_all()
