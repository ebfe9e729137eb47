"""The ``aggregator`` command: ``aggregator start --plan PLAN`` runs one federation to its end.

The aggregator keeps its state in ``aggregator.output_dir`` (see `foedus.aggregator.state`): started
again with the same plan after a crash or a stop, it resumes where it stopped. That folder
belongs to one federation uuid; ``--reset`` wipes its state and outputs and starts over.
``aggregator status --plan PLAN`` reads that state (`foedus.aggregator.inspection`), while the
aggregator runs or after it stopped.

Exit codes (`EPILOG`): 0 when the federation finished; 128 + the signal's number when SIGINT or
SIGTERM stopped it before that (the server stops accepting calls and gives those in flight
`aggregator.grace_seconds`; started again, it resumes), as a shell reports a process a signal
ended, so a supervisor tells "finished" from "stopped"; 1 when it could not run (port in use,
output not writable or used by another aggregator, a runner that crashed), or when no round
could close any more because too many collaborators had left (one line names the round and
each that left, with its reason); 2 for bad input (the plan, its TLS files, its runner or
initial model, an output folder of another federation, a malformed ``FOEDUS_FAILPOINTS``),
reported one line per problem, never as a traceback.

The runner is imported only when the plan has no ``aggregator.initial_model`` (it makes the model
of round 0), and its own ``check_settings`` then refuses a bad ``runner.settings`` key before
anything is opened or served, in the line a collaborator would print. With a model file, nothing
of the runner's is imported: importing a module runs its code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from foedus.aggregator import failpoints
from foedus.aggregator.allocator import tune_allocator
from foedus.aggregator.file_limit import files_needed, raise_open_file_limit
from foedus.aggregator.inspection import read_status
from foedus.aggregator.records import Array
from foedus.aggregator.runtime import serve
from foedus.aggregator.schema import NotAStateError
from foedus.aggregator.state import DurableState, ForeignStateError
from foedus.aggregator.storage import OutputFolder, read_model
from foedus.command.arguments import add_log_level, command, command_main, program
from foedus.command.exits import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from foedus.command.process import run_service, stopped_by_signals
from foedus.command.usage import BadInputError, fail
from foedus.pki.binding import binding_problem
from foedus.pki.errors import PkiError
from foedus.pki.files import read_certificate
from foedus.pki.tls import tls_files_problem
from foedus.plans import Plan, PlanError, load_plan
from foedus.plans.runners import RunnerError, RunnerFactory, check_runner_settings, load_runner
from foedus.privacy.accountant import budget_problem
from foedus.privacy.noise import not_noisable
from foedus.protos.dtypes import is_float, wire_dtype
from foedus.refusals.errors import ModelFileError, StorageError
from foedus.serving.server import ServerError

HELP_WIDTH = 78

logger = logging.getLogger(__name__)


EPILOG = f"""\
exit status of start (status: see 'aggregator status --help'):
  {EXIT_OK}    the federation finished (every round ran)
  {EXIT_FAILURE}    the aggregator could not run (port in use, output folder unusable, ...),
       or no round could close any more: too many collaborators had left
  {EXIT_BAD_INPUT}    bad command line, plan, certificates, runner, model or output folder
  {EXIT_SIGINT}  stopped by SIGINT (Ctrl-C) before the federation finished
  {EXIT_SIGTERM}  stopped by SIGTERM before the federation finished
A stopped aggregator started again with the same plan resumes where it stopped.
"""

STATUS_EPILOG = f"""\
exit status:
  {EXIT_OK}    the status was printed
  {EXIT_FAILURE}    the state could not be read now
  {EXIT_BAD_INPUT}    bad command line or plan, or no state of this plan's federation there
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser, commands = program(
        "aggregator",
        _wrapped(
            "The foedus aggregator: serves a federation's rounds to its collaborators "
            "over mutual TLS and averages their training."
        ),
        epilog=EPILOG,
    )
    summary = "Serve the federation a plan describes until every round has run."
    start = command(
        commands,
        "start",
        summary,
        description=_wrapped(
            f"{summary} Every accepted result and closed round is saved in "
            "aggregator.output_dir/state/ before it is acknowledged, so starting again with the "
            "same plan after a crash or a stop resumes where it stopped."
        ),
        epilog=EPILOG,
    )
    start.add_argument("--plan", type=Path, required=True, help="the federation plan (YAML)")
    start.add_argument(
        "--reset",
        action="store_true",
        help="delete the saved state and outputs in aggregator.output_dir (state/, "
        "last_model.pbuf, best_model.pbuf, metrics.jsonl) and start the federation over from "
        "its first round; without it, a folder of another federation is refused",
    )
    add_log_level(start, "how much to log on stderr (default: info)")
    summary = "Print where the federation stands, from its saved state."
    status = command(
        commands,
        "status",
        summary,
        description=_wrapped(
            f"{summary} Reads aggregator.output_dir/state/ read-only, without any "
            "RPC, while the aggregator runs or after it stopped: the round, who reported, who is "
            "online or offline and since when, the last closed round's metrics, and whether the "
            "federation finished."
        ),
        epilog=STATUS_EPILOG,
    )
    status.add_argument("--plan", type=Path, required=True, help="the federation plan (YAML)")
    status.add_argument("--json", action="store_true", help="print one JSON object, for scripts")
    return parser


def _wrapped(text: str) -> str:
    """`text` wrapped for a terminal: the help keeps the epilogs' tables as written, so it
    does not wrap the descriptions itself."""
    return textwrap.fill(text, width=HELP_WIDTH)


@command_main(build_parser)
def main(args: argparse.Namespace) -> int:
    """Run the aggregator command line; returns the exit code (see `EPILOG`)."""
    if args.command == "status":
        return _status(args.plan, as_json=args.json)
    tune_allocator()  # before any thread starts (see aggregator.allocator)
    return run_service(
        "aggregator",
        lambda: _start(args.plan, reset=args.reset),
        log_level=args.log_level,
        failures=(ServerError, StorageError),
        interrupted=("interrupted (SIGINT) before the federation finished", EXIT_SIGINT),
        log=logger,
    )


def _start(plan_path: Path, *, reset: bool) -> int:
    try:
        plan = load_plan(plan_path)
    except PlanError as error:
        raise BadInputError("\n".join(error.problems)) from None
    raise_open_file_limit(files_needed(len(plan.collaborators)))
    try:
        failpoints.configure()
    except failpoints.FailpointError as error:
        raise BadInputError(str(error)) from None
    budget = budget_problem(plan.differential_privacy)
    if budget is not None:
        raise BadInputError(f"{plan.path}: {budget}")
    _check_tls_files(plan)
    if plan.secure_aggregation.enabled and not plan.tls.enabled:
        raise BadInputError(
            f"{plan.path}: secure_aggregation.enabled: needs tls.certs_dir: each site signs its "
            "keys with its certificate and checks the others' against the federation's CA "
            "(tls.insecure is true)"
        )
    runner = _checked_runner(plan)
    try:
        output = OutputFolder(plan.aggregator.output_dir)
    except StorageError as error:
        raise BadInputError(f"{plan.path}: aggregator.output_dir: {error}") from None
    try:
        state = DurableState.open(
            output.root,
            plan.federation.uuid,
            lambda: _initial_model(plan, runner),  # only for a new state
            max_tensor_bytes=plan.limits.max_tensor_bytes,
            reset=reset,
        )
    except ForeignStateError as error:
        raise BadInputError(
            f"{plan.path}: aggregator.output_dir: {error}; to start over run 'aggregator start "
            f"--plan {plan.path} --reset', or set aggregator.output_dir to a new folder"
        ) from None
    if not state.recovered.fresh:  # a new state's model was checked before it was saved
        model = state.recovered.progress.model
        problem = _secure_model_problem(
            plan, model, "saved global model"
        ) or _private_model_problem(plan, model, "saved global model")
        if problem is not None:
            state.close()
            raise BadInputError(problem)
    stop = threading.Event()
    with state, stopped_by_signals(stop, logger) as received:
        try:
            outcome = serve(plan, state, output, stop, out=sys.stdout)
        except PkiError as error:  # read by the server when it starts, before anything is served
            raise BadInputError(f"{plan.path}: tls.certs_dir: {error}") from None
    logger.info("aggregator exits after %d closed rounds", outcome.rounds_closed)
    if outcome.stranded is not None:
        return _fail(outcome.stranded, EXIT_FAILURE)
    if outcome.finished or not received:
        return EXIT_OK
    return 128 + received[0]


def _status(plan_path: Path, *, as_json: bool) -> int:
    """Print the federation's status from its state; no RPC, nothing written."""
    try:
        plan = load_plan(plan_path)
    except PlanError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        status = read_status(plan)
    except NotAStateError as error:
        return _fail(str(error), EXIT_BAD_INPUT)
    except StorageError as error:
        return _fail(str(error), EXIT_FAILURE)
    if as_json:
        print(json.dumps(status.to_json(), indent=2, sort_keys=True))
    else:
        print("\n".join(status.lines()))
    return EXIT_OK


def _check_tls_files(plan: Plan) -> None:
    """Every TLS file the aggregator needs is there and readable, its key private."""
    certs = plan.tls.certs
    if certs is None:
        return
    problem = tls_files_problem(
        certs.ca_bundle,
        certs.aggregator_cert,
        certs.aggregator_key,
        named="aggregator {}",
        where=f"{plan.path}: tls.certs_dir",
        make=f"run 'pki setup --plan {plan.path}'",
    )
    if problem is not None:
        raise BadInputError(problem)
    _warn_if_collaborators_refuse(plan, certs.aggregator_cert)


def _warn_if_collaborators_refuse(plan: Plan, path: Path) -> None:
    """Say at start when foedus collaborators will refuse this certificate (OpenFL's do not check)."""
    try:
        problem = binding_problem(read_certificate(path), plan.aggregator.common_name)
    except PkiError:
        return  # the server reads it again when it starts, and says what is wrong
    if problem is not None:
        logger.warning(
            "%s: %s (aggregator.common_name), so foedus collaborators will refuse this "
            "aggregator; reissue it with 'pki setup --plan %s' or 'pki certify --role aggregator'",
            path,
            problem,
            plan.path,
        )


def _checked_runner(plan: Plan) -> RunnerFactory | None:
    """The runner, its check passed on `runner.settings`; None (nothing imported) with a model file.

    The runner is imported only when the plan has no `aggregator.initial_model`, for the model of
    round 0: a plan bringing its model makes this host run none of the runner's code.
    """
    if plan.aggregator.initial_model is not None:
        return None
    try:
        runner = load_runner(plan.runner)
        check_runner_settings(runner, plan.runner)
    except RunnerError as error:
        raise BadInputError(f"{plan.path}: {error}") from None
    return runner


def _initial_model(plan: Plan, runner: RunnerFactory | None) -> dict[str, Array]:
    """The model of round 0: the plan's `aggregator.initial_model` file, else the runner's."""
    model = _plans_model(plan, runner)
    problem = _secure_model_problem(plan, model, "initial model") or _private_model_problem(
        plan, model, "initial model"
    )
    if problem is not None:
        raise BadInputError(problem)
    return model


def _plans_model(plan: Plan, runner: RunnerFactory | None) -> dict[str, Array]:
    """The model file's tensors, or the runner's initial model once checked."""
    if plan.aggregator.initial_model is not None:
        try:
            return read_model(plan.aggregator.initial_model, plan.limits.max_tensor_bytes)
        except ModelFileError as error:
            raise BadInputError(f"{plan.path}: aggregator.initial_model: {error}") from None
    assert runner is not None  # `_checked_runner` loads it whenever the plan names no file
    try:
        model = runner.initial_model(plan.runner)
    except RunnerError as error:
        raise BadInputError(f"{plan.path}: {error}") from None
    problem = _model_problem(model)
    if problem:
        raise BadInputError(
            f"{plan.path}: runner.name: {plan.runner.name!r} gave an unusable initial model: "
            f"{problem}"
        )
    return {name: np.asarray(array) for name, array in model.items()}


def _model_problem(model: object) -> str | None:
    """What makes `model` unusable as a global model, or None."""
    if not isinstance(model, Mapping) or not model:
        return "expected a non-empty mapping of names to numpy arrays"
    for name, array in model.items():
        if not isinstance(name, str) or not name:
            return f"tensor name {name!r} is not a non-empty string"
        dtype = np.asarray(array).dtype
        if wire_dtype(dtype) is None:
            return f"tensor {name!r} has dtype {dtype}, which cannot be sent"
    return None


def _secure_model_problem(plan: Plan, model: Mapping[str, Array], what: str) -> str | None:
    """Why secure aggregation cannot sum `model`'s updates (a tensor that is not a number), or None.

    A masked update is a vector of a ring's integers: each float or integer tensor's delta is
    encoded there in fixed point; a boolean (or any other kind) has no delta to encode.
    """
    if not plan.secure_aggregation.enabled:
        return None
    for name in sorted(model):
        dtype = model[name].dtype
        if not is_float(dtype) and dtype.kind not in "iu":
            return (
                f"{plan.path}: secure_aggregation.enabled: tensor {name!r} of the {what} is "
                f"{dtype}, neither floating point nor integer, so it cannot be summed masked; "
                "make it a number, or turn secure aggregation off"
            )
    return None


def _private_model_problem(plan: Plan, model: Mapping[str, Array], what: str) -> str | None:
    """Why differential privacy cannot noise `model` (a tensor that is not floating point), or None."""
    if not plan.differential_privacy.enabled:
        return None
    problem = not_noisable(model)
    if problem is None:
        return None
    return (
        f"{plan.path}: differential_privacy.enabled: {problem} in the {what}: Gaussian noise "
        "needs floating-point tensors (an integer would round it away); make it a float, or "
        "turn differential privacy off"
    )


def _fail(message: str, code: int) -> int:
    return fail("aggregator", message, code)
