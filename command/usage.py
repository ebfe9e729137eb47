"""How a foedus command answers a person: usage errors and failures, each in one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from command.exits import EXIT_BAD_INPUT, EXIT_OK
from command.text import printable


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
