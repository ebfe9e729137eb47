"""A long-running command's process: its log on stderr, SIGINT and SIGTERM as a request to stop."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from foedus.command.exits import EXIT_FAILURE
from foedus.command.text import PrintableFormatter
from foedus.command.usage import BadInputError, bad_input, fail, unexpected

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")  # --log-level's choices


def stderr_log_handler() -> logging.Handler:
    """A handler writing `LOG_FORMAT` lines to stderr, without terminal controls."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter(LOG_FORMAT))
    return handler


@contextmanager
def logging_to_stderr(level: str) -> Iterator[None]:
    """Log to stderr at `level` while inside, without disturbing handlers installed by others."""
    handler = stderr_log_handler()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


@contextmanager
def stopped_by_signals(stop: threading.Event, log: logging.Logger) -> Iterator[list[int]]:
    """SIGINT and SIGTERM set `stop` while inside (main thread only; elsewhere nothing changes).

    Yields the list the numbers of the signals received are appended to, first one first; each
    is logged on `log` (the command's logger, so the line names it).
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(number: int, frame: FrameType | None) -> None:
        log.warning("%s received: stopping", signal.Signals(number).name)
        received.append(number)
        stop.set()

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_service(
    program: str,
    start: Callable[[], int],
    *,
    log_level: str,
    failures: tuple[type[Exception], ...],
    interrupted: tuple[str, int],
    log: logging.Logger,
) -> int:
    """Run a service's `start`, logging to stderr at `log_level`; returns its exit status.

    What stops it becomes a status: `BadInputError`, each of its lines as it is (2); one of
    `failures` (port in use, state unusable), one line (1); Ctrl-C before its signal handlers
    are set, `interrupted`'s line and status; anything else, one line naming the error (1), its
    traceback logged on `log` at debug level.
    """
    with logging_to_stderr(log_level):
        try:
            return start()
        except BadInputError as error:
            return bad_input(error)
        except failures as error:
            return fail(program, str(error), EXIT_FAILURE)
        except KeyboardInterrupt:
            message, code = interrupted
            return fail(program, message, code)
        except Exception as error:
            log.debug("unexpected failure", exc_info=True)
            return fail(program, unexpected(error), EXIT_FAILURE)
