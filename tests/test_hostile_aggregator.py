"""A hostile aggregator: a real gRPC server holding the real aggregator certificate, answering
with values no honest aggregator sends. The collaborator ends or waits within a bound, with one
clear line, never a traceback or a hang.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from foedus.aggregator.identity import Gatekeeper
from foedus.aggregator.records import Array
from foedus.aggregator.server import add_servicer
from foedus.aggregator.servicer import AggregatorServicer
from foedus.collaborator.answers import MAX_SLEEP_SECONDS, MIN_IDLE_SECONDS, PlannedWork
from foedus.collaborator.cli import main
from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.digits import DigitsRunner
from foedus.collaborator.loop import run_collaborator
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import server_credentials
from foedus.plans import Plan
from foedus.protos import aggregator_pb2
from foedus.protos.channel import server_options

from servers import make_federation, make_plan, plan_document

PREFIX = "collaborator: error: "
ROUNDS = 2
RUN_SECONDS = 90  # bound on one collaborator's run (the machine is shared and slow)
STALL_SECONDS = 30  # a stalled answer never comes sooner than the collaborator's deadline

Answer = Callable[[aggregator_pb2.GetTasksResponse, int], None]


def tasks(*names: str) -> Callable[[aggregator_pb2.GetTasksResponse], None]:
    """Replace the answer's tasks with `names`."""

    def set_tasks(response: aggregator_pb2.GetTasksResponse) -> None:
        del response.tasks[:]
        for name in names:
            response.tasks.add(name=name, function_name=name, task_type=name)

    return set_tasks


def first(change: Callable[[aggregator_pb2.GetTasksResponse], None]) -> Answer:
    """Apply `change` to every answer."""
    return lambda response, call: change(response)


def fields(**values: object) -> Callable[[aggregator_pb2.GetTasksResponse], None]:
    """Set fields of the answer."""

    def set_fields(response: aggregator_pb2.GetTasksResponse) -> None:
        for name, value in values.items():
            setattr(response, name, value)

    return set_fields


def both(*changes: Callable[[aggregator_pb2.GetTasksResponse], None]) -> Answer:
    """Apply every change to every answer."""

    def apply(response: aggregator_pb2.GetTasksResponse, call: int) -> None:
        for change in changes:
            change(response)

    return apply


def idle_then_back_to_round_zero(response: aggregator_pb2.GetTasksResponse, call: int) -> None:
    """First 'wait, round 3' (the plan's last round + 1), then round 0's tasks again."""
    if call == 1:
        tasks()(response)
        response.round_number = ROUNDS + 1
        response.sleep_time = 0


class HostileServicer(AggregatorServicer):
    """The real servicer over a real federation, whose `GetTasks` answers are then changed."""

    def __init__(
        self,
        plan: Plan,
        model: dict[str, Array],
        answer: Answer,
        *,
        streams_models: bool = True,
        stall: threading.Event | None = None,
    ) -> None:
        gatekeeper = Gatekeeper(
            aggregator_id=plan.federation.aggregator_id,
            federation_uuid=plan.federation.uuid,
            collaborators=frozenset(plan.collaborators),
            tls=True,
        )
        super().__init__(make_federation(plan, model), gatekeeper, plan.limits)
        self.answer = answer
        self.streams_models = streams_models
        self.stall = stall
        self.get_tasks_calls = 0

    def GetTasks(  # noqa: N802 - the RPC's name
        self, request: aggregator_pb2.GetTasksRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetTasksResponse:
        response = super().GetTasks(request, context)
        self.get_tasks_calls += 1
        if self.stall is not None:
            self.stall.wait(STALL_SECONDS)  # never answers within the collaborator's deadline
        self.answer(response, self.get_tasks_calls)
        return response

    def GetAggregatedModel(  # noqa: N802
        self, request: aggregator_pb2.GetAggregatedModelRequest, context: grpc.ServicerContext
    ) -> Iterable[bytes]:
        if not self.streams_models:  # as OpenFL's aggregator: the client asks tensor by tensor
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        return super().GetAggregatedModel(request, context)


@contextmanager
def serving(plan: Plan, servicer: HostileServicer) -> Iterator[int]:
    """A real gRPC server with the federation's aggregator certificate; yields its port."""
    certs = plan.tls.certs
    assert certs is not None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=server_options(plan.limits.max_message_bytes),
    )
    add_servicer(servicer, server)
    credentials = server_credentials(certs.aggregator_cert, certs.aggregator_key, certs.ca_bundle)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def digits_plan(certs: CertsLayout, **aggregator: object) -> Plan:
    """The test federation with the digits runner, ROUNDS rounds."""
    return make_plan(certs, federation={"rounds": ROUNDS}, aggregator=aggregator)


def digits_model(plan: Plan, fill: float | None = None) -> dict[str, Array]:
    """The runner's initial model, or one of the same shapes filled with `fill`."""
    model = DigitsRunner.initial_model(plan.runner)
    if fill is None:
        return model
    return {name: np.full_like(array, fill) for name, array in model.items()}


def other_shapes(plan: Plan) -> dict[str, Array]:
    """The runner's tensor names with one more row each: the wrong model for this runner."""
    return {
        name: np.zeros((array.shape[0] + 1, *array.shape[1:]), dtype=array.dtype)
        for name, array in digits_model(plan).items()
    }


@dataclass(frozen=True)
class Case:
    """One hostile behaviour and the words of the one line the collaborator must end with."""

    answer: Answer
    words: str
    model: str = "honest"  # honest, nan, inf, shapes
    streams_models: bool = True
    stall: bool = False


CASES = {
    "negative sleep_time": Case(
        both(tasks(), fields(sleep_time=-5)), "sleep_time -5: a wait is never negative"
    ),
    "negative round": Case(first(fields(round_number=-1)), "round_number -1"),
    "round far past the plan's": Case(
        first(fields(round_number=1000)), "round_number 1000 of a federation of 2 rounds"
    ),
    "round going backwards": Case(idle_then_back_to_round_zero, "round_number 0 after round 3"),
    "unknown task": Case(first(tasks("train", "distill")), "task 'distill' in round 0"),
    "training task in the final validation round": Case(
        both(tasks("train"), fields(round_number=ROUNDS)), f"task 'train' in round {ROUNDS}"
    ),
    "a task twice": Case(first(tasks("train", "train")), "a task listed twice"),
    "quit with tasks": Case(first(fields(quit=True)), "quit together with tasks"),
    "NaN global model, streamed": Case(
        first(lambda response: None),
        "limits.allow_non_finite is false); nothing was trained on it",
        model="nan",
    ),
    "infinite global model, tensor by tensor": Case(
        first(lambda response: None),
        "limits.allow_non_finite is false); nothing was trained on it",
        model="inf",
        streams_models=False,
    ),
    "a model of other shapes": Case(
        first(lambda response: None), "this collaborator's runner has float32", model="shapes"
    ),
    "no answer within the deadline": Case(
        first(lambda response: None), "DEADLINE_EXCEEDED", stall=True
    ),
}


def write_plan(folder: Path, certs: CertsLayout, port: int) -> Path:
    """Alice's plan for the hostile server at 127.0.0.1:port: short deadline, one retry."""
    document = plan_document(
        certs,
        federation={"rounds": ROUNDS},
        aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": port},
        connection={
            "deadline_seconds": 2,
            "max_retries": 1,
            "backoff_initial_seconds": 0,
            "backoff_max_seconds": 0,
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def run_main_bounded(argv: list[str]) -> int:
    """`foedus.collaborator.cli.main(argv)` in a thread, failing the test if it runs past RUN_SECONDS."""
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    thread.join(RUN_SECONDS)
    assert not thread.is_alive(), f"the collaborator still runs after {RUN_SECONDS} s"
    return codes[0]


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_answer_ends_the_collaborator_with_one_line(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """`collaborator start` against the hostile server exits 1 with one line naming the value."""
    case = CASES[name]
    plan = digits_plan(certs)
    model = {
        "honest": digits_model(plan),
        "nan": digits_model(plan, np.nan),
        "inf": digits_model(plan, np.inf),
        "shapes": other_shapes(plan),
    }[case.model]
    stall = threading.Event() if case.stall else None
    servicer = HostileServicer(
        plan, model, case.answer, streams_models=case.streams_models, stall=stall
    )
    try:
        with serving(plan, servicer) as port:
            argv = ["start", "-n", "alice", "--plan", str(write_plan(tmp_path, certs, port))]
            code = run_main_bounded(argv)
    finally:
        if stall is not None:
            stall.set()
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(PREFIX)]
    assert code == 1, captured.err
    assert len(lines) == 1, captured.err
    assert case.words in lines[0], lines[0]
    assert "Traceback" not in captured.err and "unexpected failure" not in captured.err
    assert servicer.federation.results() == ()  # nothing trained on it was sent


class RecordingSleep:
    """An injected sleep that records each wait and never really waits."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.mark.parametrize(
    ("asked", "waited"),
    [(2**31 - 1, MAX_SLEEP_SECONDS), (0, MIN_IDLE_SECONDS), (7, 7)],
)
def test_a_wait_is_bounded_and_a_cut_is_logged(
    certs: CertsLayout, caplog: pytest.LogCaptureFixture, asked: int, waited: float
) -> None:
    """'Wait 2**31-1 s' waits MAX_SLEEP_SECONDS (logged); 'wait 0' with nothing to do waits
    MIN_IDLE_SECONDS, not a busy loop; an ordinary wait is kept."""
    plan = digits_plan(certs)
    servicer = HostileServicer(plan, digits_model(plan), both(tasks(), fields(sleep_time=asked)))
    sleep = RecordingSleep()
    with (
        serving(plan, servicer) as port,
        AggregatorGRPCClient.from_plan(
            plan, "alice", aggregator_address="127.0.0.1", aggregator_port=port
        ) as client,
        caplog.at_level(logging.WARNING, logger="foedus.collaborator.answers"),
    ):
        started = time.monotonic()
        report = run_collaborator(
            client,
            DigitsRunner(plan.runner, collaborator="alice", collaborators=plan.collaborators),
            plan.runner,
            sleep=sleep,
            max_idle_polls=3,
            planned=PlannedWork(rounds=ROUNDS, tasks=plan.tasks),
        )
    assert time.monotonic() - started < RUN_SECONDS
    assert (report.quit, report.tasks_run) == (False, 0)
    assert sleep.waits == [waited, waited]  # the third idle answer ends the loop
    cut = [record.getMessage() for record in caplog.records]
    if asked > MAX_SLEEP_SECONDS:
        assert cut and all(f"asked to wait {asked} s; waiting 60 s" in line for line in cut)
    else:
        assert cut == []


def test_an_honest_answer_passes_the_same_checks(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hostile server left honest: alice runs round 0's tasks, so the refusals above are the
    checks' doing (she then waits for the round to close: the loop stops after idle answers)."""
    plan = digits_plan(certs)
    servicer = HostileServicer(plan, digits_model(plan), first(lambda response: None))
    with serving(plan, servicer) as port:
        client = AggregatorGRPCClient.from_plan(
            plan, "alice", aggregator_address="127.0.0.1", aggregator_port=port
        )
        with client:
            report = run_collaborator(
                client,
                DigitsRunner(plan.runner, collaborator="alice", collaborators=plan.collaborators),
                plan.runner,
                sleep=RecordingSleep(),
                max_idle_polls=1,
                planned=PlannedWork(rounds=ROUNDS, tasks=plan.tasks),
            )
    assert report.tasks_run == len(plan.tasks)
    assert len(servicer.federation.results()) == len(plan.tasks)


def test_a_non_finite_model_is_taken_when_the_plan_allows_it(certs: CertsLayout) -> None:
    """With limits.allow_non_finite the same NaN model is fetched as it is."""
    plan = make_plan(certs, federation={"rounds": ROUNDS}, limits={"allow_non_finite": True})
    servicer = HostileServicer(plan, digits_model(plan, np.nan), first(lambda response: None))
    with serving(plan, servicer) as port:
        client = AggregatorGRPCClient.from_plan(
            plan, "alice", aggregator_address="127.0.0.1", aggregator_port=port
        )
        with client:
            model = client.get_aggregated_model(list(digits_model(plan)), 0)
    assert all(np.isnan(array).all() for array in model.values())
