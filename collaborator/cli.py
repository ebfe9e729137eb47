"""The ``collaborator`` command: check the plan, the certificates and the runner, then do the work.

A collaborator that ends on an error once its client is made (the runner raised, a refusal it
cannot get past, a bad answer, settings the runner refused) tells the aggregator it leaves
(`AggregatorGRPCClient.leave`), so no round waits for it, then exits as it would anyway. The
reason it sends is a fixed category and the exception's class name (`leave_reason`), never the
exception's message, a path or anything the runner printed: a site's data stays at the site.
Best effort: a failure to send it is logged and changes nothing. Nothing is sent on exit 0, on a
signal (SIGINT, SIGTERM: a stop, to be started again), nor to a server that is not our
aggregator; but for one exit 0: a site that trains with DP-SGD and whose next round would pass
its privacy cap says so in one line, tells the aggregator it leaves (a fixed reason, even under
--no-leave: an envoy does not start again a collaborator that exited 0, nor leaves for it) and
exits 0 (`foedus.collaborator.private`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from foedus.collaborator.answers import PlannedWork
from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.compressed import (
    RESIDUALS_FOLDER,
    ResidualsError,
    UploadEncoder,
    residual_store,
)
from foedus.collaborator.errors import (
    AggregatorIdentityError,
    AggregatorUnavailableError,
    ClientConfigurationError,
    ClientError,
    RequestRejectedError,
    ResponseValidationError,
)
from foedus.collaborator.loop import CollaboratorError, run_collaborator
from foedus.collaborator.private import (
    BUDGET_SPENT_REASON,
    BudgetSpentError,
    PrivateRounds,
    site_secret,
)
from foedus.collaborator.secure import SecureRounds, SiteIdentity
from foedus.collaborator.secure_state import RoundFileError, RoundFiles
from foedus.command.arguments import add_log_level, command, command_main, program
from foedus.command.exits import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from foedus.command.process import stderr_log_handler
from foedus.command.usage import UsageError, fail, fail_each, unexpected
from foedus.compression.codes import Code
from foedus.pki.errors import PkiError
from foedus.pki.tls import tls_files_problem
from foedus.plans import Plan, PlanError, load_plan
from foedus.plans.runners import PrivateTraining, RunnerError, TaskRunner, load_runner
from foedus.plans.site_settings import SiteSettingsError, plan_with_site_settings
from foedus.privacy.budget import training_rounds
from foedus.privacy.ledger import LEDGER_FILE, SiteLedger
from foedus.privacy.noise import new_secret
from foedus.privacy.secret import SECRET_FILE, privacy_secret
from foedus.privacy.shares import NoiseShares
from foedus.refusals.errors import StorageError
from foedus.secure import ProtocolViolation

logger = logging.getLogger(__name__)


EPILOG = f"""\
exit status:
  {EXIT_OK}    the aggregator said the federation is finished, or this site's privacy budget
       is spent (DP-SGD: its next round would pass its max_epsilon; it told the aggregator
       it leaves)
  {EXIT_FAILURE}    the aggregator stayed unreachable, refused a request, is not the one the plan
       names (aggregator.common_name, aggregator.fingerprint), sent a value no honest
       aggregator sends, broke the secure aggregation protocol, or the work failed
  {EXIT_BAD_INPUT}    bad command line, plan, certificates or runner settings (nothing was sent)
  {EXIT_SIGINT}  interrupted (SIGINT, Ctrl-C)
  {EXIT_SIGTERM}  terminated (SIGTERM)
A task interrupted by a signal is not sent; started again, the collaborator asks the
aggregator which tasks of the round it still owes. On exit 1 or 2 after it reached the
aggregator, it tells the aggregator it leaves (a fixed reason, no data of the site), so no
round waits for it; started again, it rejoins.
"""


class _TerminatedError(BaseException):
    """SIGTERM arrived; a BaseException, like KeyboardInterrupt, so no `except Exception` stops it."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser, commands = program(
        "collaborator",
        "A foedus collaborator: trains and validates the federation's model on this "
        "party's data, as the aggregator asks, over mutual TLS.",
        epilog=EPILOG,
    )
    start = command(
        commands,
        "start",
        "Work for the aggregator until the federation is finished.",
        description="Check the plan, this collaborator's certificate and key and the task "
        "runner, then ask the aggregator for tasks, run them and send the results until it says "
        "the federation is finished.",
        epilog=EPILOG,
    )
    start.add_argument(
        "-n", "--name", required=True, help="this collaborator's name, as listed in the plan"
    )
    start.add_argument("--plan", type=Path, required=True, help="the federation plan (YAML)")
    start.add_argument(
        "--site-settings",
        type=Path,
        metavar="FILE",
        help="this site's own runner settings (YAML mapping: data path, batch size, device, ...), "
        "each replacing the plan's runner.settings key of the same name",
    )
    start.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where this site keeps its secrets of each secure aggregation round (plan: "
        "secure_aggregation.enabled): one file per round, mode 0600, written before anything "
        "made from them is sent, read again by a restarted collaborator, erased once the round "
        "is over (default: the plan's folder/collaborator-state/NAME); with differential "
        f"privacy too, {SECRET_FILE}, this site's noise secret (mode 0600, made once, kept), "
        f"and, when its runner trains with DP-SGD (dp_sgd), {LEDGER_FILE}, its privacy "
        "ledger (mode 0600, kept for good); with a lossy compression.upload code (bfloat16, "
        f"int8, topk), {RESIDUALS_FOLDER}/, what the code left out of its updates (error "
        "feedback: a file per round, mode 0600, written before the upload, the newest two kept)",
    )
    start.add_argument(
        "--keep-metrics",
        action="store_true",
        help="keep this site's metrics (train loss, validation accuracy and loss) at the site: "
        "its results carry none, its validations a sample count of 1; it still logs them. Only "
        "in a federation that aggregates securely (plan: secure_aggregation.enabled), where the "
        "aggregator averages the metrics of the sites that send them",
    )
    start.add_argument(
        "--no-leave",
        action="store_true",
        help="on a failure, do not tell the aggregator this collaborator leaves (Leave): a site's "
        "envoy, which starts it again, says when the site gives it up; without this, an "
        "aggregator whose every collaborator left would end before the restarted one calls",
    )
    add_log_level(start, "what to log (default: info)")
    return parser


@command_main(build_parser)
def main(args: argparse.Namespace) -> int:
    """Run the collaborator command line; returns the exit status (see `--help`)."""
    logging.basicConfig(level=args.log_level.upper(), handlers=[stderr_log_handler()])
    with _sigterm_raises():
        try:
            return _start(
                args.name,
                args.plan,
                args.site_settings,
                args.state_dir,
                keep_metrics=args.keep_metrics,
                leave=not args.no_leave,
            )
        except PlanError as error:
            return fail_each("collaborator", error.problems, EXIT_BAD_INPUT)
        except UsageError as error:
            return _fail(str(error), EXIT_BAD_INPUT)
        except ClientConfigurationError as error:
            return _fail(str(error), EXIT_BAD_INPUT)
        except (ClientError, RunnerError, ProtocolViolation, StorageError) as error:
            # AggregatorUnavailableError among them; RequestRejectedError reads "the aggregator
            # refused RPC with STATUS: details".
            return _failed(error, str(error))
        except KeyboardInterrupt:
            return _fail(
                "interrupted (SIGINT); a task in progress, if any, was not sent", EXIT_SIGINT
            )
        except _TerminatedError:
            return _fail(
                "terminated (SIGTERM); a task in progress, if any, was not sent", EXIT_SIGTERM
            )
        except Exception as error:
            logger.debug("unexpected failure", exc_info=True)
            return _failed(
                error,
                f"{unexpected(error)} (--log-level debug shows the traceback)",
            )


def _start(
    name: str,
    plan_path: Path,
    site_settings: Path | None,
    state_dir: Path | None,
    *,
    keep_metrics: bool = False,
    leave: bool = True,
) -> int:
    """Every start-up check, then the loop; checks raise `UsageError` with one line.

    `leave`: tell the aggregator this collaborator leaves when it fails (not under an envoy).
    """
    plan = load_plan(plan_path)  # PlanError: main prints one line per problem
    if site_settings is not None:
        try:
            plan = plan_with_site_settings(plan, site_settings)
        except SiteSettingsError as error:
            raise UsageError(str(error)) from None
    if name not in plan.collaborators:
        raise UsageError(
            f"{plan_path}: collaborators: {name!r} is not listed "
            f"(listed: {', '.join(plan.collaborators)})"
        )
    if keep_metrics and not plan.secure_aggregation.enabled:
        raise UsageError(
            f"{plan.path}: secure_aggregation.enabled: not true, and --keep-metrics needs it (a "
            "plain federation's aggregator refuses a validation without metrics)"
        )
    _check_tls_files(plan, name)
    identity = _secure_identity(plan, name)
    folder = state_dir or plan.path.parent / "collaborator-state" / name
    files = RoundFiles(folder, plan.federation.uuid, name)
    if identity is not None:
        try:
            files.prepare()
        except RoundFileError as error:
            raise UsageError(f"--state-dir: {error}") from None
    upload = _upload_encoder(plan, folder)
    runner = _make_runner(plan, name)
    # DP-SGD first: it checks its ledger against a secret it did not just make.
    private = _private_rounds(plan, name, runner, files)
    shares = _noise_shares(plan, files.folder) if identity is not None else None
    with AggregatorGRPCClient.from_plan(plan, name) as client:
        secure = None
        if identity is not None:
            secure = SecureRounds(client, plan, name, identity, files, noise_shares=shares)
            logger.info(
                "secure aggregation: this site's round secrets are kept in %s", files.folder
            )
        if shares is not None:
            logger.info(
                "differential privacy: this site clips its update to L2 norm %g and adds its "
                "share of the noise, std %.4g (noise multiplier %g x clip / sqrt(%d), the "
                "fewest sites the aggregator can unmask), before it masks it",
                shares.settings.clip,
                shares.std,
                shares.settings.noise_multiplier,
                shares.quorum,
            )
        logger.info(
            "collaborator %s of federation %s: working for the aggregator at %s",
            name,
            plan.federation.uuid,
            client.target,
        )
        if keep_metrics:
            logger.info("this site keeps its metrics: its results carry none (--keep-metrics)")
        if private is not None:
            logger.info("%s", private.settings_line())
            logger.info("%s", private.budget_line())
        # With differential privacy, the rounds its budget allows (as the aggregator counts).
        planned = PlannedWork(rounds=training_rounds(plan), tasks=plan.tasks)
        privacy = plan.differential_privacy
        try:
            # Returns when the aggregator says quit.
            run_collaborator(
                client,
                runner,
                plan.runner,
                planned=planned,
                heartbeat_seconds=plan.connection.heartbeat_seconds,
                secure=secure,
                keep_metrics=keep_metrics,
                # Under adaptive clipping the site does not know the round's clip: it sends its
                # update as trained, and the aggregator clips it.
                clip=privacy.clip
                if privacy.enabled and privacy.adaptive_clipping is None
                else None,
                private=private,
                upload=upload,
            )
        except BudgetSpentError as spent:
            logger.warning("%s", spent)
            _leave(client, spent)  # even under --no-leave: exit 0, nobody starts it again
            return EXIT_OK
        except Exception as error:  # signals are BaseExceptions: no Leave for a stop
            if leave:
                _leave(client, error)
            raise
    return EXIT_OK


def leave_reason(error: Exception) -> str:
    """What a collaborator that ends on `error` tells the aggregator: a fixed category and the
    exception's class name, never its message (it may hold the site's data or paths)."""
    kind = type(error).__name__
    if isinstance(error, BudgetSpentError):
        return BUDGET_SPENT_REASON
    if isinstance(error, StorageError):
        return f"the site cannot keep its state ({kind})"
    if isinstance(error, ProtocolViolation):
        return "a secure aggregation protocol violation (ProtocolViolation)"
    if isinstance(error, RunnerError):
        return "the runner refused its settings"
    if isinstance(error, RequestRejectedError):
        return f"the aggregator refused {error.rpc} ({error.code.name})"
    if isinstance(error, AggregatorUnavailableError):
        return "the aggregator stayed unreachable"
    if isinstance(error, ResponseValidationError):
        return f"a bad answer from the aggregator ({kind})"
    if isinstance(error, CollaboratorError):
        return f"the runner's work does not fit the federation ({kind})"
    if isinstance(error, ClientError):
        return f"the collaborator cannot go on ({kind})"
    return f"the task runner failed ({kind})"


def _leave(client: AggregatorGRPCClient, error: Exception) -> None:
    """Tell the aggregator this collaborator gives up, best effort (never to a stranger)."""
    if isinstance(error, AggregatorIdentityError):
        return  # not our aggregator: it is told nothing
    reason = leave_reason(error)
    try:
        client.leave(reason)
    except ClientError as failure:
        logger.warning("could not tell the aggregator this collaborator leaves: %s", failure)
    else:
        logger.info("told the aggregator this collaborator leaves: %s", reason)


def _check_tls_files(plan: Plan, name: str) -> None:
    """The CA bundle, certificate and key exist, and the key is private, or say how to fix it."""
    certs = plan.tls.certs
    if certs is None:
        logger.warning(
            "INSECURE: talking to the aggregator without TLS, as %s says (tls.insecure: true)",
            plan.path,
        )
        return
    try:
        cert, key = certs.collaborator_cert(name), certs.collaborator_key(name)
    except PkiError as error:
        raise UsageError(f"{plan.path}: tls.certs_dir: {error}") from None
    problem = tls_files_problem(
        certs.ca_bundle,
        cert,
        key,
        named=f"{{}} of {name!r}",
        where=f"{plan.path}: tls.certs_dir",
        make=f"run 'pki setup --plan {plan.path}'",
    )
    if problem is not None:
        raise UsageError(problem)


def _secure_identity(plan: Plan, name: str) -> SiteIdentity | None:
    """What this site signs its secure aggregation keys with (None: the plan does not aggregate
    securely); `UsageError` when it cannot be read."""
    if not plan.secure_aggregation.enabled:
        return None
    certs = plan.tls.certs
    if certs is None:
        raise UsageError(
            f"{plan.path}: secure_aggregation.enabled needs the federation's certificates (each "
            f"site signs its keys with its own): tls.insecure cannot be used with it"
        )
    try:
        return SiteIdentity.from_files(
            certs.collaborator_cert(name), certs.collaborator_key(name), certs.ca_bundle
        )
    except PkiError as error:
        raise UsageError(f"{plan.path}: tls.certs_dir: {error}") from None


def _upload_encoder(plan: Plan, folder: Path) -> UploadEncoder | None:
    """What codes this site's updates in the plan's `compression.upload` code (None: `none`),
    its residuals kept in `folder`/residuals for a lossy code; `UsageError` naming a residuals
    file that cannot be trusted, or a folder where they cannot be kept."""
    settings = plan.compression.upload
    if settings.code is Code.NONE:
        return None
    try:
        store = residual_store(folder, settings)
    except ResidualsError as error:
        raise UsageError(f"--state-dir: {error}") from None
    if store is not None:
        logger.info(
            "compression: this site sends its updates in %s, with error feedback kept in %s",
            settings.code,
            store.folder,
        )
    return UploadEncoder(settings, store)


def _noise_shares(plan: Plan, folder: Path) -> NoiseShares | None:
    """This site's noise shares under secure aggregation with differential privacy, drawn from
    the secret in its state `folder` (made there once); None without differential privacy."""
    if not plan.differential_privacy.enabled:
        return None
    try:
        secret = privacy_secret(
            folder / SECRET_FILE,
            remedy="move it away, and a new one is made: noise this site has not sent yet",
        )
    except StorageError as error:
        raise UsageError(f"--state-dir: {error}") from None
    return NoiseShares.of(plan, secret)


def _make_runner(plan: Plan, name: str) -> TaskRunner:
    """This collaborator's task runner, as the plan names it."""
    try:
        factory = load_runner(plan.runner)
        return factory(plan.runner, collaborator=name, collaborators=plan.collaborators)
    except RunnerError as error:
        raise UsageError(_runner_problem(plan, error)) from None


def _runner_problem(plan: Plan, error: RunnerError) -> str:
    """The runner's line, prefixed with the plan's path unless it names the site's file (a key
    of the site's file is named with that file, `RunnerSettings.key_path`)."""
    message, site = str(error), plan.runner.site_file
    if site is None or not message.startswith(f"{site}: "):
        message = f"{plan.path}: {message}"
    return message


def _private_rounds(
    plan: Plan, name: str, runner: TaskRunner, files: RoundFiles
) -> PrivateRounds | None:
    """This site's DP-SGD budget when its runner trains privately (`private_training`), else
    None; `UsageError` with one line for what stops it at start.

    The secret and the ledger are kept in the state folder, the secret only once the runner
    trains privately (a site without DP-SGD gets no file).
    """
    method = getattr(runner, "private_training", None)
    if method is None:
        return None
    path = files.folder / SECRET_FILE
    made, existed = new_secret(), path.exists()
    try:
        secret = site_secret(path, made).key if existed else made
        training = method(secret, training_rounds(plan))
    except StorageError as error:
        raise UsageError(f"--state-dir: {error}") from None
    except RunnerError as error:
        raise UsageError(_runner_problem(plan, error)) from None
    if training is None:
        return None
    problem = (
        training.problem()
        if isinstance(training, PrivateTraining)
        else f"returned {type(training).__name__}, not PrivateTraining or None"
    )
    if problem is not None:
        raise UsageError(
            f"{plan.path}: runner.name: {plan.runner.name!r}: its private_training: {problem}"
        )
    try:
        files.prepare()
        ledger = SiteLedger(files.folder / LEDGER_FILE, plan.federation.uuid, name)
        if not existed and ledger.rounds:
            raise UsageError(
                f"--state-dir: {path}: missing, while {ledger.path} holds rounds released with "
                "it: a new secret would release those rounds again, differently; put the "
                "secret back"
            )
        if site_secret(path, made).key != secret:
            raise UsageError(f"--state-dir: {path}: made by another process while this one started")
    except (RoundFileError, StorageError) as error:
        raise UsageError(f"--state-dir: {error}") from None
    return PrivateRounds(training, ledger)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises `_TerminatedError` in the main thread (as SIGINT raises KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise _TerminatedError

    previous: Callable[[int, FrameType | None], object] | int | None = signal.signal(
        signal.SIGTERM, terminate
    )
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)


def _failed(error: Exception, message: str) -> int:
    """Exit 1 on `error`: its category alone (`leave_reason`) on a log line of foedus's own, which
    a site shares with the director by default (foedus.envoy.disclosure), then `message`, which may
    hold
    the site's data, on the error line, which leaves the site only if it shares every line."""
    logger.error("failure: %s", leave_reason(error))
    return _fail(message, EXIT_FAILURE)


def _fail(message: str, code: int) -> int:
    return fail("collaborator", message, code)
