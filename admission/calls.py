"""Counting a caller's calls in progress, and reading a client stream against a clock.

Both exist so that one caller, hostile or broken, cannot take the worker threads everyone else
needs. Plain Python: each service's servicer applies them, with its own limit keys in the
messages and its own refusals, which `foedus.refusals.grpc` answers RESOURCE_EXHAUSTED and
DEADLINE_EXCEEDED.

* `Admission` counts each caller's calls in progress; one past the limit is refused at once
  before it reads or computes anything. Counting is by the name the certificate proves, so a
  caller cannot spread its calls over names it does not own.
* `chunks_within` reads a client stream on a helper thread while the worker thread waits with a
  deadline: for the whole stream (the aggregator's `limits.upload_seconds`: an upload that has
  not ended in time, whether the client stalls or trickles) or for each message (`idle`, the
  director's `limits.idle_stream_seconds`: a stream that sends nothing for that long). Either is
  refused with DEADLINE_EXCEEDED: it says what happened in the words gRPC itself uses for running
  out of time, and clients treat it as transient (a resend is safe, as nothing of a cut-off
  stream is kept). CANCELLED would read as if the client had given up; ABORTED as a conflict it
  could retry at once. Waiting in the worker thread, not a timer calling `context.cancel()`, is
  what lets the answer carry a status and message: a cancelled call reaches the client as a bare
  CANCELLED.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Final, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Chunks read ahead of the worker thread; a few keep the reader busy, not memory.
READ_AHEAD: Final = 4
# How often a reader whose consumer stopped listening looks again (see `_read`).
_POLL_SECONDS: Final = 0.05


class Admission:
    """Counts each caller's calls in progress and refuses one past `limit`; thread-safe.

    A refusal is `refusal(message)`, its message naming the caller (`who` and its name), the
    limit and `key`, the setting that gives it.
    """

    def __init__(
        self, limit: int, *, key: str, who: str, refusal: Callable[[str], Exception]
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.key = key
        self.who = who
        self._refusal = refusal
        self._calls: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def admit(self, name: str) -> Iterator[None]:
        """Hold one of `name`'s call slots while inside; raise the refusal if none is free."""
        with self._lock:
            held = self._calls.get(name, 0)
            if held >= self.limit:
                raise self._refusal(
                    f"{self.who} {name!r} already has {held} calls in progress, the most "
                    f"{self.key} ({self.limit}) allows; try again when one has ended"
                )
            self._calls[name] = held + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._calls[name] - 1
                if left:
                    self._calls[name] = left
                else:
                    del self._calls[name]  # the table holds only callers with calls in progress

    def in_progress(self, name: str | None = None) -> int:
        """How many calls of `name` (of everyone, for None) are in progress now."""
        with self._lock:
            return sum(self._calls.values()) if name is None else self._calls.get(name, 0)


class _End:
    """What the reader thread queues last: the stream ended, or raised `error`."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def chunks_within(
    chunks: Iterator[T],
    seconds: float,
    *,
    what: str,
    key: str,
    timeout: Callable[[str], Exception],
    idle: bool = False,
) -> Generator[T, None, None]:
    """Yield the items of `chunks`, raising `timeout(message)` once `seconds` have passed.

    The `seconds` (the setting `key` gives) are for the whole stream, or with `idle` for each
    item: a stream that keeps sending may go on, one that sends nothing for that long ends.

    `chunks` is read on a daemon thread, so a client that stops sending holds that thread in
    gRPC's own wait, not the worker thread that called us; the reader ends when the call does
    (gRPC ends a request iterator whose call has been answered or cancelled). An error raised by
    `chunks` (a client that cancelled) is raised here as it is. A consumer that stops before the
    end must `close()` the generator (`contextlib.closing`), so the reader stops handing on.
    """
    deadline = time.monotonic() + seconds
    items: queue.Queue[T | _End] = queue.Queue(maxsize=READ_AHEAD)
    listening = threading.Event()
    listening.set()
    reader = threading.Thread(
        target=_read, args=(chunks, items, listening), name=f"{what}-reader", daemon=True
    )
    reader.start()
    try:
        while True:
            try:
                item = items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                said = "sent nothing for" if idle else "did not end within"
                raise timeout(
                    f"the {what} {said} {key} ({seconds:g} s); nothing of it was kept"
                ) from None
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
            if idle:
                deadline = time.monotonic() + seconds
    finally:
        listening.clear()  # the reader drops what it reads from now on and ends with the stream


def _read(chunks: Iterator[T], items: queue.Queue[T | _End], listening: threading.Event) -> None:
    """Move `chunks` into `items` until they end, handing on any error instead of raising it."""
    last: _End
    try:
        for chunk in chunks:
            if not _offer(items, chunk, listening):
                return
        last = _End()
    except BaseException as error:  # handed to the consumer, which decides what it means
        last = _End(error)
    _offer(items, last, listening)


def _offer(items: queue.Queue[T | _End], item: T | _End, listening: threading.Event) -> bool:
    """Queue `item` while the consumer listens; False once it has stopped listening."""
    while listening.is_set():
        try:
            items.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
