"""The shape every foedus command line has: `PROG COMMAND [options]`, each command with its summary.

A command's --help shows its description, then its epilog as written (the exit-status tables):
with an epilog the description is shown as written too, so a caller wraps it where it wants it
wrapped; without one, argparse wraps it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Protocol, TypeAlias

from foedus.command.output import quiet_when_stdout_closes
from foedus.command.process import LOG_LEVELS
from foedus.command.usage import Parser, parse_arguments

Commands: TypeAlias = "argparse._SubParsersAction[Parser]"


class Main(Protocol):
    """A command's `main(argv)`: the exit status, never a `SystemExit`."""

    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def program(prog: str, description: str, *, epilog: str | None = None) -> tuple[Parser, Commands]:
    """The parser of `prog` and its commands, one of which is required (`args.command`)."""
    parser = Parser(
        prog=prog, description=description, epilog=epilog, formatter_class=_formatter(epilog)
    )
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def command(
    commands: Commands,
    name: str,
    summary: str,
    *,
    description: str | None = None,
    epilog: str | None = None,
) -> Parser:
    """A command listed with its one-line `summary`; its --help shows `description` (default: it)."""
    return commands.add_parser(
        name,
        help=summary,
        description=summary if description is None else description,
        epilog=epilog,
        formatter_class=_formatter(epilog),
    )


def add_log_level(parser: argparse.ArgumentParser, help_: str) -> None:
    """The --log-level option of a long-running command (default: info)."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help=help_)


def command_main(
    build_parser: Callable[[], argparse.ArgumentParser],
) -> Callable[[Callable[[argparse.Namespace], int]], Main]:
    """`main(argv)` running the decorated function on the parsed `argv`.

    A usage error is one line (exit 2), --help returns its status instead of exiting, and a
    closed stdout ends the command quietly (`quiet_when_stdout_closes`).
    """

    def decorate(run: Callable[[argparse.Namespace], int]) -> Main:
        @quiet_when_stdout_closes
        def main(argv: Sequence[str] | None = None) -> int:
            args = parse_arguments(build_parser(), argv)
            return args if isinstance(args, int) else run(args)

        main.__doc__ = run.__doc__
        return main

    return decorate


def _formatter(epilog: str | None) -> type[argparse.HelpFormatter]:
    """An epilog (an exit-status table) is shown as written, the description then too."""
    return argparse.HelpFormatter if epilog is None else argparse.RawDescriptionHelpFormatter
