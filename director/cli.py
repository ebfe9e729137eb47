"""The ``director`` command: ``director start --config director.yaml`` runs the director service.

The director keeps its state in director.yaml's ``state_dir`` (see `foedus.director.state`): started
again with the same config after a crash or a stop, it finds its experiments again, adopts the
aggregators still running and starts again those that died. Its aggregators are not stopped when the
director stops.

Exit codes: 0 when stopped by SIGINT/SIGTERM; 1 when it could not run (port in use, state folder in
use by another director); 2 for bad input (director.yaml, its TLS files, a runner it allows that
cannot be imported here), one line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from foedus.command.arguments import add_log_level, command, command_main, program
from foedus.command.exits import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from foedus.command.process import run_service, stopped_by_signals
from foedus.command.usage import BadInputError, fail
from foedus.director.server import DirectorServer
from foedus.director.tokens import TokenStore
from foedus.pki.errors import PkiError
from foedus.pki.tls import tls_files_problem
from foedus.plans.director_config import ConfigError, DirectorConfig, load_config
from foedus.plans.runners import RunnerError, import_runner
from foedus.protos.channel import host_port
from foedus.refusals.errors import StorageError
from foedus.serving.server import ServerError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser, commands = program(
        "director",
        "The foedus director: a long-lived service that runs people's experiments "
        "(federations) on the sites whose envoys register with it, over mutual TLS.",
    )
    summary = "Serve envoys and people until stopped (SIGINT or SIGTERM)."
    start = command(
        commands,
        "start",
        summary,
        description=f"{summary} Its state is kept in director.yaml's state_dir; started again "
        "with the same config it finds its experiments again and resumes them.",
    )
    start.add_argument(
        "--config", type=Path, required=True, help="the director's configuration (director.yaml)"
    )
    add_log_level(start, "how much to log on stderr (default: info)")
    summary = "Issue a person's dashboard token (replacing their old one), or revoke it."
    token = command(
        commands,
        "dashboard-token",
        summary,
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


@command_main(build_parser)
def main(args: argparse.Namespace) -> int:
    """Run the director command line; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    if args.command == "dashboard-token":
        try:
            return _dashboard_token(args.config, args.name, revoke=args.revoke)
        except BadInputError as error:
            return _fail(str(error), EXIT_BAD_INPUT)
        except StorageError as error:
            return _fail(str(error), EXIT_FAILURE)
    return run_service(
        "director",
        lambda: _start(args.config),
        log_level=args.log_level,
        failures=(ServerError, StorageError),
        interrupted=("interrupted", EXIT_FAILURE),
        log=logger,
    )


def _start(config_path: Path) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise BadInputError("\n".join(error.problems)) from None
    _check_tls_files(config)
    _check_runners(config)
    server = DirectorServer(config)
    stop = threading.Event()
    try:
        with stopped_by_signals(stop, logger):
            try:
                port = server.start()
            except PkiError as error:
                raise BadInputError(f"{config.path}: certs_dir: {error}") from None
            print(f"director: serving on {host_port(config.listen_address, port)}", flush=True)
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
        raise BadInputError("\n".join(error.problems)) from None
    if name not in config.users and name not in config.admins:
        raise BadInputError(
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
    problem = tls_files_problem(
        certs.ca_bundle,
        certs.aggregator_cert,
        certs.aggregator_key,
        where=f"{config.path}: certs_dir",
        make=f"run 'pki setup --director {config.path}'",
    )
    if problem is not None:
        raise BadInputError(problem)


def _check_runners(config: DirectorConfig) -> None:
    """Every runner director.yaml allows can be imported here (the admin agreed to its code)."""
    problems = []
    for name in config.runners:
        try:
            import_runner(name)
        except RunnerError as error:
            problems.append(f"{config.path}: runners: {error}")
    if problems:
        raise BadInputError("\n".join(problems))


def _fail(message: str, code: int) -> int:
    return fail("director", message, code)
