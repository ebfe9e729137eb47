"""The ``director`` command: ``director start --config director.yaml`` runs the director service.

The director keeps its state in director.yaml's ``state_dir`` (see `director.state`): started again
with the same config after a crash or a stop, it finds its experiments again, adopts the
aggregators still running and starts again those that died. Its aggregators are not stopped when
the director stops.

Exit codes: 0 when stopped by SIGINT/SIGTERM; 1 when it could not run (port in use, state folder in
use by another director); 2 for bad input (director.yaml, its TLS files), one line per problem,
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn

from director.config import ConfigError, DirectorConfig, load_config
from director.errors import StorageError
from director.server import DirectorServer, ServerError
from director.tokens import TokenStore
from pki.errors import KeyFileError, MissingTLSFileError, PkiError
from pki.tls import check_tls_files

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
LOG_LEVELS = ("debug", "info", "warning", "error")

logger = logging.getLogger(__name__)


class _UsageError(Exception):
    """Bad command-line input, reported in one line like every other error."""


class _BadInputError(Exception):
    """Input that cannot be used; each line of the message is printed as it is."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser = _Parser(
        prog="director",
        description="The foedus director: a long-lived service that runs people's experiments "
        "(federations) on the sites whose envoys register with it, over mutual TLS.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    summary = "Serve envoys and people until stopped (SIGINT or SIGTERM)."
    start = commands.add_parser(
        "start",
        help=summary,
        description=f"{summary} Its state is kept in director.yaml's state_dir; started again "
        "with the same config it finds its experiments again and resumes them.",
    )
    start.add_argument(
        "--config", type=Path, required=True, help="the director's configuration (director.yaml)"
    )
    start.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="how much to log on stderr (default: info)",
    )
    summary = "Issue a person's dashboard token (replacing their old one), or revoke it."
    token = commands.add_parser(
        "dashboard-token",
        help=summary,
        description=f"{summary} The token is printed once and kept only as a SHA-256 digest in "
        "state_dir; the person pastes it on the dashboard's login page. NAME must be one of "
        "director.yaml's users or admins. Works while the director runs.",
    )
    token.add_argument(
        "--config", type=Path, required=True, help="the director's configuration (director.yaml)"
    )
    token.add_argument("name", metavar="NAME", help="the person (their certificate's name)")
    token.add_argument(
        "--revoke", action="store_true", help="remove NAME's token instead of issuing one"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the director command line; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as error:
        return _fail(str(error), EXIT_BAD_INPUT)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    if args.command == "dashboard-token":
        try:
            return _dashboard_token(args.config, args.name, revoke=args.revoke)
        except _BadInputError as error:
            return _fail(str(error), EXIT_BAD_INPUT)
        except StorageError as error:
            return _fail(str(error), EXIT_FAILURE)
    with _logging(args.log_level):
        try:
            return _start(args.config)
        except _BadInputError as error:
            for line in str(error).splitlines():
                print(line, file=sys.stderr)
            return EXIT_BAD_INPUT
        except (ServerError, StorageError) as error:
            return _fail(str(error), EXIT_FAILURE)
        except KeyboardInterrupt:
            return _fail("interrupted", EXIT_FAILURE)
        except Exception as error:
            logger.debug("unexpected failure", exc_info=True)
            return _fail(f"unexpected failure: {type(error).__name__}: {error}", EXIT_FAILURE)


def _start(config_path: Path) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise _BadInputError("\n".join(error.problems)) from None
    _check_tls_files(config)
    server = DirectorServer(config)
    stop = threading.Event()
    try:
        with _stopped_by_signals(stop):
            try:
                port = server.start()
            except PkiError as error:
                raise _BadInputError(f"{config.path}: certs_dir: {error}") from None
            print(f"director: serving on {config.listen_address}:{port}", flush=True)
            if server.dashboard is not None:
                # The certificate's name: the one a browser can check.
                url = f"https://{config.host}:{server.dashboard.port}/"
                print(f"director: dashboard on {url}", flush=True)
            if server.metrics is not None:
                print(
                    "director: metrics on "
                    f"http://{server.metrics.address.with_port(server.metrics.port)}/metrics",
                    flush=True,
                )
            stop.wait()
    finally:
        server.stop()
    return EXIT_OK


def _dashboard_token(config_path: Path, name: str, *, revoke: bool) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise _BadInputError("\n".join(error.problems)) from None
    if name not in config.users and name not in config.admins:
        raise _BadInputError(
            f"{config.path}: users, admins: {name!r} is in neither; a dashboard token is for a "
            "person the director knows"
        )
    tokens = TokenStore(config.state_dir)
    if revoke:
        found = tokens.revoke(name)
        print(f"director: {name}'s dashboard token " + ("revoked" if found else "was not issued"))
        return EXIT_OK
    print(tokens.issue(name))
    return EXIT_OK


def _check_tls_files(config: DirectorConfig) -> None:
    """Every TLS file the director serves with is there and readable, its key private."""
    certs = config.certs
    files = (
        ("CA bundle", certs.ca_bundle),
        ("certificate", certs.aggregator_cert),
        ("private key", certs.aggregator_key),
    )
    try:
        check_tls_files(files, certs.aggregator_key)
    except MissingTLSFileError as error:
        hint = f" (run 'pki setup --director {config.path}')" if error.absent else ""
        raise _BadInputError(f"{config.path}: certs_dir: {error}{hint}") from None
    except KeyFileError as error:
        raise _BadInputError(str(error)) from None


@contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` while inside (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(number: int, frame: FrameType | None) -> None:
        logger.warning("%s received: stopping", signal.Signals(number).name)
        stop.set()

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def _logging(level: str) -> Iterator[None]:
    """Log to stderr at `level` while inside, without disturbing handlers installed by others."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def _fail(message: str, code: int) -> int:
    one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"director: error: {one_line}", file=sys.stderr)
    return code
