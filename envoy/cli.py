"""The ``envoy`` command: run a site's envoy, and let the site's operator review experiments."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from foedus.collaborator.client import LEAVE_SECONDS
from foedus.command.arguments import add_log_level, command, command_main, program
from foedus.command.exits import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from foedus.command.process import stderr_log_handler
from foedus.command.table import table_lines
from foedus.command.text import printable
from foedus.command.usage import UsageError, fail, fail_each
from foedus.envoy.client import DirectorClient
from foedus.envoy.config import ConfigError, EnvoyConfig, load_config
from foedus.envoy.errors import EnvoyError
from foedus.envoy.leave import Leaving
from foedus.envoy.progress import ProgressBook
from foedus.envoy.runtime import EnvoyLoop, foedus_version
from foedus.envoy.site import Site, review
from foedus.envoy.state import DATABASE, EnvoyState
from foedus.pki.errors import MissingTLSFileError, PkiError
from foedus.pki.tls import check_tls_files
from foedus.plans.reader import NAME_PATTERN
from foedus.protos.channel import host_port

logger = logging.getLogger(__name__)


EPILOG = f"""\
exit status:
  {EXIT_OK}  stopped (SIGTERM or SIGINT), or the review was recorded
  {EXIT_FAILURE}  the state folder cannot be used, or the experiment cannot be reviewed now
  {EXIT_BAD_INPUT}  bad command line, envoy.yaml or certificates (nothing was started)
The envoy never exits because the director is away: it retries with a capped backoff. Stopping
it leaves its collaborators running; started again with the same command, it finds them.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser, commands = program(
        "envoy",
        "A foedus envoy: the long-lived agent of one site. It registers with a "
        "director over mutual TLS, heartbeats, and runs `collaborator start` for each experiment "
        "naming this site, within what the site agreed to in envoy.yaml.",
        epilog=EPILOG,
    )
    start = command(
        commands,
        "start",
        "Run the envoy until stopped.",
        description="Check envoy.yaml and this site's certificate, find the collaborators of "
        "an earlier run again, then work for the director until SIGTERM or SIGINT; with "
        "envoy.yaml's site_api on, serve the site's HTTP API (token in STATE_DIR/site_api.token); "
        "with metrics.redis_url, write each collaborator's state to Redis. What of the "
        "collaborators' logs, errors and site paths the director gets is envoy.yaml's "
        "share_with_director (by default: foedus's own log lines, failures as a category, "
        "no paths); whether the aggregator gets their metrics, share_with_aggregator (by "
        "default: yes).",
        epilog=EPILOG,
    )
    start.add_argument(
        "-n",
        "--name",
        required=True,
        help="this site's name: its certificate's common name, its collaborators' name",
    )
    _config_argument(start)
    add_log_level(start, "what to log (default: info)")
    for verb, what in (("approve", "Let"), ("reject", "Refuse")):
        review = command(
            commands,
            verb,
            f"{what} an experiment waiting for this site's review (review: manual).",
            description=f"{what} an experiment waiting for this site's review; the running "
            "envoy picks the decision up from its state folder and tells the director.",
            epilog=EPILOG,
        )
        review.add_argument("experiment_id", metavar="ID", help="the experiment's id")
        _config_argument(review)
        review.add_argument("--reason", default="", help="kept with the decision, sent on")
    listing = command(
        commands,
        "list",
        "This envoy's experiments and their collaborators' states.",
        description="This envoy's experiments, in the order received, with their states.",
    )
    _config_argument(listing)
    return parser


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the envoy's envoy.yaml")


@command_main(build_parser)
def main(args: argparse.Namespace) -> int:
    """Run the envoy command line; returns the exit status (see `--help`)."""
    try:
        config = load_config(args.config)
    except ConfigError as error:
        return fail_each("envoy", error.problems, EXIT_BAD_INPUT)
    try:
        if args.command == "start":
            logging.basicConfig(level=args.log_level.upper(), handlers=[stderr_log_handler()])
            return _start(args.name, config)
        if args.command == "list":
            return _list(config)
        return _review(config, args.experiment_id, args.command == "approve", args.reason)
    except UsageError as error:
        return _fail(str(error), EXIT_BAD_INPUT)
    except EnvoyError as error:
        return _fail(str(error), EXIT_FAILURE)


def _start(name: str, config: EnvoyConfig) -> int:
    if not NAME_PATTERN.match(name):
        raise UsageError(f"-n {name!r}: expected a name matching {NAME_PATTERN.pattern}")
    _check_identity(name, config)
    state = EnvoyState.open(config.state_dir, exclusive=True)
    token = ""
    if config.site_api.enabled:
        from foedus.envoy.site_api import TOKEN_FILE, TokenError, ensure_token  # noqa: PLC0415

        try:
            token = ensure_token(config.state_dir / TOKEN_FILE)
        except TokenError as error:
            state.close()
            raise UsageError(str(error)) from None
    stop = threading.Event()

    def stop_on(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping; the collaborators keep running", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop_on)
    try:
        with DirectorClient(name, config) as client:
            share = config.share_with_director
            logger.info(
                "envoy %s: director %s, state in %s, runners %s, review %s; shares with the "
                "director: logs %s, errors %s, paths %s; with the aggregator: metrics %s",
                name,
                config.director_target,
                config.state_dir,
                ", ".join(config.runners),
                "manual" if config.manual_review else "auto",
                share.logs,
                share.errors,
                "yes" if share.paths else "no",
                "yes" if config.share_with_aggregator.metrics else "no",
            )
            leaving = Leaving()
            site = Site(name, config, state, leave=leaving)
            loop = EnvoyLoop(
                site, client, shard=config.shard, connection=config.connection, stop=stop
            )
            with contextlib.ExitStack() as services:
                _serve(site, loop, config, token, services)
                loop.run()
            leaving.wait(LEAVE_SECONDS)  # an aggregator being told the site left is told
    finally:
        state.close()
    return EXIT_OK


def _serve(
    site: Site, loop: EnvoyLoop, config: EnvoyConfig, token: str, services: contextlib.ExitStack
) -> None:
    """Start the site API and the Redis reporter if envoy.yaml asks; `services` stops them.

    Each is imported only then: FastAPI and the Redis client take 0.3 s of every envoy's start.
    """
    progress = ProgressBook()
    if config.metrics.redis_url:
        from foedus.envoy.redis_metrics import RedisReporter  # noqa: PLC0415

        try:
            reporter = RedisReporter(site, config.metrics.redis_url, progress)
        except ValueError as error:
            raise UsageError(f"{config.path}: metrics.redis_url: {error}") from None
        reporter.start()
        services.callback(reporter.stop)
        logger.info("metrics to Redis at %s", reporter.redacted_url)
    if config.site_api.enabled:
        from foedus.envoy.site_api import (  # noqa: PLC0415
            TOKEN_FILE,
            SiteApiContext,
            SiteApiServer,
            create_app,
        )

        context = SiteApiContext(site, token, foedus_version(), loop.director_state, progress)
        server = SiteApiServer(create_app(context), config.site_api.host, config.site_api.port)
        port = server.start()
        services.callback(server.stop)
        logger.info(
            "site API on http://%s/api (docs at /api/docs); its bearer token is in %s",
            host_port(config.site_api.host, port),
            config.state_dir / TOKEN_FILE,
        )


def _check_identity(name: str, config: EnvoyConfig) -> None:
    """The CA bundle, this site's certificate and key are there, private and valid."""
    certs = config.certs
    try:
        files = (
            ("CA bundle", certs.ca_bundle),
            (f"certificate of {name!r}", certs.collaborator_cert(name)),
            (f"private key of {name!r}", certs.collaborator_key(name)),
        )
        check_tls_files(files, certs.collaborator_key(name))
        DirectorClient(name, config).check_identity()
    except MissingTLSFileError as error:
        hint = " (make it with pki request collaborator / pki certify)" if error.absent else ""
        raise UsageError(f"{config.path}: certs_dir: {error}{hint}") from None
    except PkiError as error:
        raise UsageError(f"{config.path}: certs_dir: {error}") from None


def _existing_state(config: EnvoyConfig) -> EnvoyState:
    if not (config.state_dir / DATABASE).is_file():
        raise EnvoyError(
            f"{config.path}: state_dir: no envoy state in {config.state_dir} (has the envoy run?)"
        )
    return EnvoyState.open(config.state_dir, exclusive=False)


def _review(config: EnvoyConfig, experiment_id: str, approve: bool, reason: str) -> int:
    state = _existing_state(config)
    try:
        experiment = review(state, experiment_id, approve=approve, reason=reason)
    finally:
        state.close()
    print(  # the name and owner are the director's: printed without terminal controls
        f"experiment {experiment_id} ({printable(experiment.name)!r} by "
        f"{printable(experiment.owner)}): "
        f"{'approved; the envoy starts its collaborator' if approve else 'rejected'}"
    )
    return EXIT_OK


def _list(config: EnvoyConfig) -> int:
    state = _existing_state(config)
    try:
        experiments = state.experiments()
    finally:
        state.close()
    rows = []
    for e in experiments:
        detail = f"exit {e.exit_code}" if e.state.exited else ""
        detail = "; ".join(part for part in (detail, e.reason, "done" if e.done else "") if part)
        rows.append((e.experiment_id, e.name, e.owner, e.state.value, detail))
    for line in table_lines(("EXPERIMENT", "NAME", "OWNER", "STATE", "DETAIL"), rows):
        print(line)
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    return fail("envoy", message, code)
