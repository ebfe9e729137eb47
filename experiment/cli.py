"""The ``experiment`` command: submit experiments to a director, follow them, fetch their models.

Tables for people by default, ``--json`` for scripts (one JSON document, or one per line for
streams). Exit codes: 0 ok; 1 the director could not be reached or failed, or (``wait``) the
experiment failed, was rejected or cancelled; 2 bad input, the director's refusals included (a bad
plan, an unknown id, another's experiment), one line naming what is wrong, never a traceback. Here:
the arguments, the calls and the exit codes; the text for a person is `foedus.experiment.show`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

import grpc
from google.protobuf.message import Message

from foedus.command.arguments import command, program
from foedus.command.exits import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK
from foedus.command.output import quiet_when_stdout_closes, stdout_closed
from foedus.command.text import printable_stream
from foedus.command.usage import Parser, UsageError, fail
from foedus.durable.files import replace_file
from foedus.experiment import show
from foedus.experiment.config import (
    ENVIRONMENT,
    ClientConfig,
    ClientConfigError,
    load_client_config,
)
from foedus.pki.errors import PkiError
from foedus.pki.tls import channel_credentials
from foedus.protos import director_pb2 as pb
from foedus.protos import director_pb2_grpc

CHUNK_BYTES = 256 * 1024  # a model's pieces, within the director's 1 MiB a message
DEADLINE_SECONDS = 60.0
MESSAGE_BYTES = 64 * 1024 * 1024
# The director's refusals of the request itself: bad input, exit 2. Anything else: exit 1.
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from main so its help can be tested and documented."""
    parser, commands = program(
        "experiment",
        "Submit experiments (foedus plans) to a director, follow them, and fetch their models.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get(ENVIRONMENT),
        help=f"which director and which certificate (default: ${ENVIRONMENT})",
    )
    parser.add_argument("--json", action="store_true", help="JSON for scripts instead of tables")

    def experiment_command(name: str, summary: str, *, with_id: bool = True) -> Parser:
        sub = command(commands, name, summary)
        if with_id:
            sub.add_argument("id", help="the experiment's id")
        return sub

    submit = experiment_command(
        "submit", "Submit a plan (and an initial model) as a new experiment.", with_id=False
    )
    submit.add_argument("plan", type=Path, help="the plan (YAML), without the director's fields")
    submit.add_argument(
        "--initial-model",
        type=Path,
        help="a model file (OpenFL ModelProto) to start from; needed when the plan's runner is "
        "not in the director's director.yaml runners (its host then imports nothing of it)",
    )
    submit.add_argument("--name", default="", help="a name for it (default: federation.name)")
    experiment_command("list", "Your experiments (an admin's: all).", with_id=False)
    experiment_command("status", "One experiment, with its sites.")
    experiment_command("wait", "Wait for the experiment's end; exit 0 if completed, else 1.")
    metrics = experiment_command("metrics", "The experiment's metric rows, one per round.")
    metrics.add_argument("--follow", action="store_true", help="go on until the experiment ends")
    metrics.add_argument(
        "--sites", action="store_true", help="each site's own metrics under each round's line"
    )
    logs = experiment_command("logs", "The aggregator's log, or a site's collaborator log.")
    logs.add_argument("--site", default="", help="a site's log instead of the aggregator's")
    logs.add_argument("--follow", action="store_true", help="go on until the experiment ends")
    download = experiment_command("download", "Save the experiment's best or last model to a file.")
    download.add_argument("--model", choices=("best", "last"), required=True)
    download.add_argument("-o", "--output", type=Path, required=True, help="the file to write")
    experiment_command("cancel", "Stop an experiment that has not ended.")
    experiment_command(
        "remove", "Forget an experiment that has ended, and its files at the director."
    )
    for name, summary in (
        ("approve", "Let a submitted experiment run (admins)."),
        ("reject", "Refuse a submitted experiment (admins)."),
    ):
        review = experiment_command(name, summary)
        review.add_argument("--reason", default="", help="kept with the decision")
    experiment_command(
        "envoys", "The registered sites: online or not, last seen, shard.", with_id=False
    )
    return parser


@quiet_when_stdout_closes
def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the experiment command line; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    # Names, reasons, descriptions and logs are others' text: printed without terminal controls.
    out = printable_stream(out or sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        if args.config is None:
            raise UsageError(f"no config: give --config FILE or set {ENVIRONMENT}")
        try:
            config = load_client_config(args.config)
        except ClientConfigError as error:
            raise UsageError("; ".join(error.problems)) from None
        stub = _stub(config)
        handler: Callable[[director_pb2_grpc.DirectorStub, argparse.Namespace, TextIO], int]
        handler = HANDLERS[args.command]
        return handler(stub, args, out)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    except (UsageError, PkiError) as error:
        return _fail(str(error), EXIT_BAD_INPUT)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        exit_code = EXIT_BAD_INPUT if code in REFUSALS else EXIT_FAILURE
        return _fail(f"{code.name}: {details}", exit_code)
    except BrokenPipeError:
        return stdout_closed()
    except OSError as error:
        return _fail(
            f"{getattr(error, 'filename', '') or ''}: {error.strerror or error}", EXIT_FAILURE
        )
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_FAILURE)


def _stub(config: ClientConfig) -> director_pb2_grpc.DirectorStub:
    credentials = channel_credentials(
        config.certs.ca_bundle,
        config.certs.user_cert(config.name),
        config.certs.user_key(config.name),
    )
    channel = grpc.secure_channel(
        config.target,
        credentials,
        options=[
            ("grpc.max_send_message_length", MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MESSAGE_BYTES),
        ],
    )
    return director_pb2_grpc.DirectorStub(channel)


# -- commands ----------------------------------------------------------------------------------


def _submit(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    try:
        plan = args.plan.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{args.plan}: cannot read: {error}") from None
    model: Path | None = args.initial_model
    if model is not None and not model.is_file():
        raise UsageError(f"{model}: --initial-model: file not found")

    def chunks() -> Iterator[pb.SubmitChunk]:
        if model is None:
            yield pb.SubmitChunk(plan_yaml=plan, name=args.name)
            return
        yield pb.SubmitChunk(
            plan_yaml=plan,
            name=args.name,
            has_initial_model=True,
            initial_model_size=model.stat().st_size,
        )
        with model.open("rb") as file:
            while data := file.read(CHUNK_BYTES):
                yield pb.SubmitChunk(initial_model_data=data)

    experiment = stub.SubmitExperiment(chunks())
    if args.json:
        _print_json(out, experiment)
    else:
        print(show.submitted_line(experiment), file=out)
    return EXIT_OK


def _list(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    answer = stub.ListExperiments(pb.ListExperimentsRequest(), timeout=DEADLINE_SECONDS)
    if args.json:
        print(json.dumps([show.as_dict(e) for e in answer.experiments], indent=2), file=out)
        return EXIT_OK
    _print_lines(out, show.experiments_table(answer.experiments))
    return EXIT_OK


def _status(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    e = stub.GetExperiment(pb.ExperimentRequest(experiment_id=args.id), timeout=DEADLINE_SECONDS)
    if args.json:
        _print_json(out, e)
        return EXIT_OK
    _print_lines(out, show.status_lines(e))
    return EXIT_OK


def _wait(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    last: pb.Experiment | None = None
    for last in stub.WatchExperiment(pb.ExperimentRequest(experiment_id=args.id)):
        if args.json:
            _print_json(out, last, compact=True)
        elif out.isatty() or last.state in show.FINAL:
            print(show.progress_line(last), file=out, flush=True)
    return EXIT_OK if last is not None and last.state == pb.EXPERIMENT_COMPLETED else EXIT_FAILURE


def _metrics(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    request = pb.MetricStreamRequest(experiment_id=args.id, follow=args.follow)
    rounds = 0
    if not args.json:
        experiment = pb.ExperimentRequest(experiment_id=args.id)
        rounds = stub.GetExperiment(experiment, timeout=DEADLINE_SECONDS).rounds
    for row in stub.GetMetricStream(request):
        if args.json:
            print(row.json, file=out, flush=True)
            continue
        print("\n".join(show.row_lines(row.json, rounds, sites=args.sites)), file=out, flush=True)
    return EXIT_OK


def _logs(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    request = pb.LogRequestFromUser(experiment_id=args.id, site=args.site, follow=args.follow)
    for chunk in stub.GetLogs(request):
        out.write(chunk.data.decode("utf-8", "replace"))
        out.flush()
    return EXIT_OK


class _DownloadCutShortError(Exception):
    """A download that ended before the size it announced."""


def _download(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    kind = pb.MODEL_KIND_BEST if args.model == "best" else pb.MODEL_KIND_LAST
    target: Path = args.output
    written = 0

    def receive(file: BinaryIO) -> None:
        nonlocal written
        size = None
        for chunk in stub.DownloadModel(pb.DownloadModelRequest(experiment_id=args.id, kind=kind)):
            if size is None:
                size = chunk.total_size
            file.write(chunk.data)
            written += len(chunk.data)
        if size is None or written != size:
            raise _DownloadCutShortError(
                f"the download ended after {written} of {size} bytes; try again"
            )

    try:
        replace_file(target, receive)  # the old file stays until the whole model is on disk
    except _DownloadCutShortError as error:
        return _fail(str(error), EXIT_FAILURE)
    if args.json:
        print(
            json.dumps(
                {
                    "experiment_id": args.id,
                    "model": args.model,
                    "path": str(target),
                    "bytes": written,
                }
            ),
            file=out,
        )
    else:
        print(f"{args.model} model of {args.id}: {target} ({written} bytes)", file=out)
    return EXIT_OK


def _cancel(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    e = stub.CancelExperiment(pb.ExperimentRequest(experiment_id=args.id), timeout=DEADLINE_SECONDS)
    return _print_state(out, args, e)


def _remove(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    stub.RemoveExperiment(pb.ExperimentRequest(experiment_id=args.id), timeout=DEADLINE_SECONDS)
    print(json.dumps({"removed": args.id}) if args.json else f"{args.id} removed", file=out)
    return EXIT_OK


def _approve(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    request = pb.ReviewRequest(experiment_id=args.id, reason=args.reason)
    return _print_state(out, args, stub.ApproveExperiment(request, timeout=DEADLINE_SECONDS))


def _reject(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    request = pb.ReviewRequest(experiment_id=args.id, reason=args.reason)
    return _print_state(out, args, stub.RejectExperiment(request, timeout=DEADLINE_SECONDS))


def _envoys(stub: director_pb2_grpc.DirectorStub, args: argparse.Namespace, out: TextIO) -> int:
    answer = stub.ListEnvoys(pb.ListEnvoysRequest(), timeout=DEADLINE_SECONDS)
    if args.json:
        _print_json(out, answer)
        return EXIT_OK
    _print_lines(out, show.envoys_table(answer.envoys))
    return EXIT_OK


HANDLERS: dict[str, Callable[[director_pb2_grpc.DirectorStub, argparse.Namespace, TextIO], int]] = {
    "submit": _submit,
    "list": _list,
    "status": _status,
    "wait": _wait,
    "metrics": _metrics,
    "logs": _logs,
    "download": _download,
    "cancel": _cancel,
    "remove": _remove,
    "approve": _approve,
    "reject": _reject,
    "envoys": _envoys,
}


# -- output ------------------------------------------------------------------------------------


def _print_state(out: TextIO, args: argparse.Namespace, e: pb.Experiment) -> int:
    if args.json:
        _print_json(out, e)
    else:
        print(show.state_line(e), file=out)
    return EXIT_OK


def _print_json(out: TextIO, message: Message, *, compact: bool = False) -> None:
    print(show.json_text(message, compact=compact), file=out, flush=True)


def _print_lines(out: TextIO, lines: Sequence[str]) -> None:
    for line in lines:
        print(line, file=out)


def _fail(message: str, code: int) -> int:
    return fail("experiment", message, code)
