"""How a foedus command answers a person: usage errors and failures, each in one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from foedus.command.exits import EXIT_BAD_INPUT, EXIT_OK
from foedus.command.text import printable


class UsageError(Exception):
    """Bad command-line input or a start-up check that failed; one line, exit 2."""


class BadInputError(Exception):
    """Input that cannot be used; each line of the message is printed as it is."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised as `UsageError` for `main` to report in one line."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage and exiting."""
        raise UsageError(f"{message} (see '{self.prog} --help')")


def fail(program: str, message: str, code: int) -> int:
    """Print `message` as one line `PROGRAM: error: ...` on stderr; returns `code`."""
    lines = printable(message).splitlines()  # it may quote others' names and reasons
    one_line = "; ".join(line.strip() for line in lines if line.strip())
    print(f"{program}: error: {one_line}", file=sys.stderr)
    return code


def fail_each(program: str, problems: Sequence[str], code: int) -> int:
    """Print each of `problems` (a config's, each naming its field) as its own error line."""
    for problem in problems:
        fail(program, problem, code)
    return code


def unexpected(error: BaseException) -> str:
    """The line for a failure no check foresaw: the error's class and message, no traceback."""
    return f"unexpected failure: {type(error).__name__}: {error}"


def bad_input(error: BadInputError) -> int:
    """Print each line of `error` as it is on stderr (each names its file and field); returns 2."""
    for line in str(error).splitlines():
        print(line, file=sys.stderr)
    return EXIT_BAD_INPUT


def parse_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace | int:
    """The arguments, or the exit status when there is nothing to run.

    A usage error is printed in one line (exit 2); --help and --version are printed by argparse,
    which "exits": its status is returned instead, so `main(argv)` returns in every case.
    """
    try:
        return parser.parse_args(argv)
    except UsageError as error:
        return fail(parser.prog, str(error), EXIT_BAD_INPUT)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
