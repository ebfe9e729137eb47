"""A command whose stdout's reader goes away (`experiment status ID | head -1`) ends quietly.

Python ignores SIGPIPE, so a write to a closed pipe raises `BrokenPipeError` where a Unix tool
would just end; every command's `main` is wrapped by `quiet_when_stdout_closes`, and a `main`
that catches `OSError` or `Exception` itself hands a `BrokenPipeError` to `stdout_closed`.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from collections.abc import Callable
from typing import ParamSpec

from foedus.command.exits import EXIT_SIGPIPE

P = ParamSpec("P")


def stdout_closed() -> int:
    """Send what is still buffered for stdout to /dev/null, so the exit is silent; returns 141."""
    try:
        descriptor = sys.stdout.fileno()
        mode = os.fstat(descriptor).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return EXIT_SIGPIPE  # only a pipe or a socket loses its reader (not a test's file)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, descriptor)
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # a stdout with no file (a test's), or already closed
        pass
    return EXIT_SIGPIPE


def quiet_when_stdout_closes(main: Callable[P, int]) -> Callable[P, int]:
    """`main`, returning 141 without a word when stdout's reader has gone, even at the last flush."""

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            try:
                return main(*args, **kwargs)
            finally:  # --help's SystemExit too: flushed here, not at exit, where it cannot be caught
                sys.stdout.flush()
        except BrokenPipeError:
            return stdout_closed()

    return run
