"""What followed streams wait on: a count of the director's changes, and how long each may wait.

`DirectorState` signals `Changes` after every write it commits but a heartbeat's (it moves only
an envoy's `last_seen`, which no follower shows); the supervisor signals it when
what the state does not hold changes (an active experiment's log, metrics or models, written by
its aggregator; an envoy going offline as the clock runs). A followed stream (watch an
experiment, follow its metrics or logs) notes `count` before it reads, and after sending what it
read waits for a change past that count: so a change made while it read wakes it at once. It
waits at most until its `Follow` is over (the call ended or the server is stopping) and its
deadline, and looks again at least every `MAX_WAIT_SECONDS` whatever happened.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

MAX_WAIT_SECONDS = 10.0  # a followed stream looks again at least this often, whatever it was told


@dataclass(frozen=True)
class Follow:
    """A followed stream's bounds: `over()` once its call or the server is ending, and the
    seconds left to its call's deadline (`time_left()`)."""

    over: Callable[[], bool]
    time_left: Callable[[], float]


class Changes:
    """A count of changes, and a condition to wait for the next one."""

    def __init__(self) -> None:
        """No change yet."""
        self._condition = threading.Condition()
        self._count = 0

    @property
    def count(self) -> int:
        """How many changes were signalled so far: note it before reading, wait past it after."""
        with self._condition:
            return self._count

    def signal(self) -> None:
        """Something a stream may show changed: wake every waiter."""
        with self._condition:
            self._count += 1
            self._condition.notify_all()

    def wake(self) -> None:
        """Wake every waiter to look at its `Follow` again (a call or the server ending)."""
        with self._condition:
            self._condition.notify_all()

    def wait(self, seen: int, follow: Follow) -> bool:
        """Wait for a change past `seen`, within `follow`'s bounds; False: the stream is to end."""
        timeout = min(max(follow.time_left(), 0.0), MAX_WAIT_SECONDS)
        with self._condition:
            self._condition.wait_for(lambda: self._count > seen or follow.over(), timeout)
        return not follow.over()
