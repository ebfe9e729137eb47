"""The collaborator loop with the digits runner against a real aggregator over real mutual TLS."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from foedus.aggregator.federation import Federation
from foedus.aggregator.records import TaskResult
from foedus.collaborator.answers import PlannedWork
from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor, Tasks
from foedus.collaborator.digits import SHAPES, DigitsRunner
from foedus.collaborator.errors import RequestRejectedError
from foedus.collaborator.loop import CollaboratorError, CollaboratorReport, run_collaborator
from foedus.pki.layout import CertsLayout
from foedus.plans import Plan
from foedus.plans.runners import Array, Model, TrainOutcome, Validation

from servers import TASKS, closing_rounds, make_federation, make_plan, running_aggregator


class Sleeps:
    """An injectable sleep that only records the delays it is asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def digits_plan(certs: CertsLayout, **sections: object) -> Plan:
    """A TLS test plan running the digits runner; GetTasks long-polls briefly when it does."""
    return make_plan(certs, aggregator={"long_poll_seconds": 0.2}, **sections)  # type: ignore[arg-type]


def digits_federation(plan: Plan) -> Federation:
    """A federation around the runner's initial model, as the aggregator makes it from the plan."""
    return make_federation(plan, DigitsRunner.initial_model(plan.runner))


def runner_for(plan: Plan, name: str = "alice") -> DigitsRunner:
    """The digits runner of `name`, one of the plan's collaborators."""
    return DigitsRunner(plan.runner, collaborator=name, collaborators=plan.collaborators)


def client_for(plan: Plan, port: int, name: str = "alice") -> AggregatorGRPCClient:
    """A real client for `name` that dials the test aggregator on 127.0.0.1."""
    return AggregatorGRPCClient.from_plan(
        plan, name, aggregator_address="127.0.0.1", aggregator_port=port
    )


def tensors_of(result: TaskResult) -> dict[str, tuple[frozenset[str], Array]]:
    """A result's tensors by name: their tags and arrays."""
    return {tensor.name: (tensor.tags, tensor.array) for tensor in result.tensors}


def assert_metrics(result: TaskResult, tags: set[str], expected: dict[str, float]) -> None:
    """The result holds exactly these metrics, scalar float32 with these tags, of these values."""
    tensors = tensors_of(result)
    assert set(tensors) == set(expected), result.task_name
    for name, value in expected.items():
        tensor_tags, array = tensors[name]
        assert tags <= tensor_tags, (result.task_name, name, tensor_tags)
        assert array.dtype == np.float32 and array.shape == (), (result.task_name, name)
        assert float(array) == np.float32(value), (result.task_name, name)


def test_alice_sends_her_three_tasks_of_round_zero(certs: CertsLayout) -> None:
    """Alice validates the global model, trains and validates her own; each result has its tags and size."""
    plan = digits_plan(certs)
    federation = digits_federation(plan)
    runner = runner_for(plan)
    initial = DigitsRunner.initial_model(plan.runner)
    sleeps = Sleeps()
    with running_aggregator(plan, federation) as server, client_for(plan, server.port) as client:
        report = run_collaborator(client, runner, plan.runner, sleep=sleeps, max_idle_polls=2)
    assert report == CollaboratorReport(quit=False, tasks_run=3, rounds=[0], missed_rounds=[])
    assert len(sleeps.delays) == 1  # one idle answer was waited out, the second ended the loop

    results = {result.task_name: result for result in federation.results()}
    assert sorted(results) == sorted(TASKS)
    assert {(r.collaborator, r.round_number) for r in results.values()} == {("alice", 0)}

    # A fresh runner of alice's (same seed, same shard) repeats her work exactly.
    check = runner_for(plan)
    agg = results["aggregated_model_validation"]
    assert agg.data_size == len(check.shard.test)
    assert_metrics(agg, {"metric", "validate_agg"}, check.validate(initial).metrics)

    train = results["train"]
    outcome = check.train(initial, 0)
    assert train.data_size == outcome.data_size == len(check.shard.train)
    trained = tensors_of(train)
    assert set(trained) == {*SHAPES, "loss"}
    for name in SHAPES:
        tags, array = trained[name]
        assert "trained" in tags and "metric" not in tags, name
        assert array.dtype == np.float32 and array.tobytes() == outcome.model[name].tobytes()
    assert_metrics(
        dataclasses.replace(train, tensors=tuple(t for t in train.tensors if t.name == "loss")),
        {"metric"},
        outcome.metrics,
    )

    local = results["locally_tuned_model_validation"]
    assert local.data_size == len(check.shard.test)
    # Validated on the model alice trained this round, not on the global one.
    assert_metrics(local, {"metric", "validate_local"}, check.validate(outcome.model).metrics)
    assert check.validate(outcome.model).metrics != check.validate(initial).metrics


def test_a_dp_site_sends_its_update_clipped_and_validates_it_as_trained(
    certs: CertsLayout,
) -> None:
    """With differential privacy's `clip`, alice's train result is the global model plus her
    update cut to that L2 norm; her own validation is of the model as she trained it."""
    plan = digits_plan(certs)
    federation = digits_federation(plan)
    initial = DigitsRunner.initial_model(plan.runner)
    clip = 0.01  # far below a digits round's update (about 0.4)
    with running_aggregator(plan, federation) as server, client_for(plan, server.port) as client:
        run_collaborator(
            client, runner_for(plan), plan.runner, sleep=Sleeps(), max_idle_polls=2, clip=clip
        )
    results = {result.task_name: result for result in federation.results()}
    outcome = runner_for(plan).train(initial, 0)
    update = {name: outcome.model[name].astype(np.float64) - initial[name] for name in SHAPES}
    norm = np.sqrt(sum(float(np.sum(values**2)) for values in update.values()))
    assert norm > 10 * clip
    sent = tensors_of(results["train"])
    moved = []
    for name in SHAPES:
        array = sent[name][1]
        assert array.dtype == outcome.model[name].dtype
        wanted = (initial[name] + clip / norm * update[name]).astype(array.dtype)
        np.testing.assert_allclose(array, wanted, rtol=1e-6, atol=1e-7)
        moved.append((array.astype(np.float64) - initial[name]).reshape(-1))
    assert np.linalg.norm(np.concatenate(moved)) == pytest.approx(clip, rel=1e-4)
    local = results["locally_tuned_model_validation"]
    assert_metrics(
        local, {"metric", "validate_local"}, runner_for(plan).validate(outcome.model).metrics
    )


class ProcessEndedError(Exception):
    """Stands for the end of a collaborator's process (kill -9) in the middle of a task."""


class DiesAtLocalValidation(DigitsRunner):
    """The digits runner, whose process ends as it starts validating its own trained model."""

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Train as the digits runner does, and remember having trained."""
        self.trained = True
        return super().train(model, round_number)

    def validate(self, model: Model) -> Validation:
        """End at the validation after training (locally_tuned_model_validation)."""
        if getattr(self, "trained", False):
            raise ProcessEndedError
        return super().validate(model)


def test_a_site_restarted_after_sending_its_training_validates_that_very_model(
    certs: CertsLayout,
) -> None:
    """Alice ends after sending round 0's train result; started again, she is asked only for
    locally_tuned_model_validation, trains round 0 again and validates the model she sent."""
    plan = digits_plan(certs)
    federation = digits_federation(plan)
    planned = PlannedWork(rounds=plan.federation.rounds, tasks=plan.tasks)
    initial = DigitsRunner.initial_model(plan.runner)
    with running_aggregator(plan, federation) as server, client_for(plan, server.port) as client:
        first = DiesAtLocalValidation(
            plan.runner, collaborator="alice", collaborators=plan.collaborators
        )
        with pytest.raises(ProcessEndedError):
            run_collaborator(client, first, plan.runner, sleep=Sleeps(), planned=planned)
        report = run_collaborator(
            client, runner_for(plan), plan.runner, sleep=Sleeps(), max_idle_polls=2, planned=planned
        )
    assert report.tasks_run == 1
    results = {result.task_name: result for result in federation.results()}
    assert sorted(results) == sorted(TASKS)
    check = runner_for(plan)
    sent = check.train(initial, 0).model
    assert all(
        tensors_of(results["train"])[name][1].tobytes() == sent[name].tobytes() for name in SHAPES
    )
    local = results["locally_tuned_model_validation"]
    assert_metrics(local, {"metric", "validate_local"}, check.validate(sent).metrics)


def test_the_loop_ends_when_the_aggregator_says_quit(certs: CertsLayout) -> None:
    """Alice alone works one round and the final validation round, then returns on quit."""
    plan = digits_plan(certs, federation={"rounds": 1}, collaborators=["alice"])
    federation = digits_federation(plan)
    with (
        running_aggregator(plan, federation) as server,
        closing_rounds(federation),
        client_for(plan, server.port) as client,
    ):
        # The bound only matters if quit never comes; each idle poll waits 0.2 s at the aggregator.
        report = run_collaborator(
            client, runner_for(plan), plan.runner, sleep=Sleeps(), max_idle_polls=25
        )
    assert report == CollaboratorReport(quit=True, tasks_run=4, rounds=[0, 1], missed_rounds=[])
    assert federation.finished and federation.told_to_quit() == ("alice",)
    # FedAvg of one collaborator is her trained model, which a fresh runner of hers repeats.
    trained = runner_for(plan).train(DigitsRunner.initial_model(plan.runner), 0).model
    final = federation.model()
    for name, array in trained.items():
        np.testing.assert_allclose(final[name], array, rtol=1e-6, err_msg=name)


def test_the_model_is_fetched_once_per_round(certs: CertsLayout) -> None:
    """Three tasks of one round fetch the model once, at the round the aggregator names."""
    plan = digits_plan(certs)

    fetched: list[tuple[tuple[str, ...], int]] = []

    class CountingClient(AggregatorGRPCClient):
        def get_aggregated_model(self, names: Sequence[str], round_number: int) -> dict[str, Array]:
            fetched.append((tuple(sorted(names)), round_number))
            return super().get_aggregated_model(names, round_number)

    with running_aggregator(plan, digits_federation(plan)) as server:
        client = CountingClient.from_plan(
            plan, "bob", aggregator_address="127.0.0.1", aggregator_port=server.port
        )
        with client:
            report = run_collaborator(
                client, runner_for(plan, "bob"), plan.runner, sleep=Sleeps(), max_idle_polls=1
            )
    assert report.tasks_run == 3
    assert fetched == [(tuple(sorted(SHAPES)), 0)]


def test_an_unknown_task_is_an_error_naming_it(certs: CertsLayout) -> None:
    """A task the collaborator does not know stops the loop with a CollaboratorError naming it."""
    plan = digits_plan(certs)
    # The plan loader refuses unknown tasks, so the aggregator's federation is given one directly.
    odd = dataclasses.replace(plan, tasks=("train", "distill"))
    federation = digits_federation(odd)
    with (
        running_aggregator(plan, federation) as server,
        client_for(plan, server.port) as client,
        pytest.raises(CollaboratorError, match="task 'distill' of round 0"),
    ):
        run_collaborator(client, runner_for(plan), plan.runner, sleep=Sleeps(), max_idle_polls=1)
    assert [result.task_name for result in federation.results()] == ["train"]


def test_a_refusal_propagates(certs: CertsLayout) -> None:
    """An aggregator that does not list alice refuses her; the loop raises PERMISSION_DENIED at once."""
    plan = digits_plan(certs)
    without_alice = make_plan(certs, collaborators=["bob", "carol"])
    with (
        running_aggregator(without_alice, digits_federation(without_alice)) as server,
        client_for(plan, server.port) as client,
        pytest.raises(RequestRejectedError) as raised,
    ):
        run_collaborator(client, runner_for(plan), plan.runner, sleep=Sleeps(), max_idle_polls=1)
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.rpc == "GetTasks"


def test_max_idle_polls_must_be_positive(certs: CertsLayout) -> None:
    """`max_idle_polls=0` is refused before any call, rather than meaning something surprising."""
    plan = digits_plan(certs)
    client = client_for(plan, 1)
    with pytest.raises(ValueError, match="max_idle_polls must be >= 1"):
        run_collaborator(client, runner_for(plan), plan.runner, max_idle_polls=0)


class _BobDoneError(Exception):
    """Ends bob's loop once his round is over."""


def test_a_round_that_closes_without_alice_is_skipped(certs: CertsLayout) -> None:
    """When the round closes under alice (straggler policy), her refused fetch skips it and she goes on."""
    plan = digits_plan(
        certs,
        federation={"rounds": 2},
        collaborators=["alice", "bob"],
        straggler={"policy": "percentage", "percentage": 0.5},
    )
    # One report of two closes a round.
    federation = Federation.from_plan(plan, DigitsRunner.initial_model(plan.runner))

    class BobClient(AggregatorGRPCClient):
        def get_tasks(self) -> Tasks:
            tasks = super().get_tasks()
            if tasks.round_number > 0:
                raise _BobDoneError
            return tasks

    class AliceClient(AggregatorGRPCClient):
        calls = 0

        def get_tasks(self) -> Tasks:
            tasks = super().get_tasks()
            AliceClient.calls += 1
            if AliceClient.calls == 1:  # alice has round 0's tasks; bob finishes round 0 first
                with (
                    BobClient.from_plan(
                        plan, "bob", aggregator_address="127.0.0.1", aggregator_port=server.port
                    ) as bob,
                    pytest.raises(_BobDoneError),
                ):
                    run_collaborator(bob, runner_for(plan, "bob"), plan.runner, sleep=Sleeps())
            return tasks

    with running_aggregator(plan, federation) as server, closing_rounds(federation):
        alice = AliceClient.from_plan(
            plan, "alice", aggregator_address="127.0.0.1", aggregator_port=server.port
        )
        with alice:
            report = run_collaborator(
                alice, runner_for(plan), plan.runner, sleep=Sleeps(), max_idle_polls=25
            )
    # Round 0 closed with bob alone; alice works round 1 and the final validation round 2.
    assert report == CollaboratorReport(quit=True, tasks_run=4, rounds=[0, 1, 2], missed_rounds=[0])
    assert federation.finished


class ScriptedAggregator:
    """Stands in for the client where a real aggregator cannot yet be made to behave so: a round
    closes under the collaborator (a straggler policy), then the federation finishes."""

    def __init__(self, model: dict[str, Array], answers: Sequence[Tasks], closed: set[int]) -> None:
        self.model = model
        self.answers = list(answers)
        self.closed = closed  # rounds whose results are refused as not in progress
        self.sent: list[tuple[int, str]] = []

    def heartbeat(self) -> bool:
        """Taken, as a foedus aggregator takes it."""
        return True

    def get_tasks(self) -> Tasks:
        return self.answers.pop(0)

    def get_aggregated_model(self, names: Sequence[str], round_number: int) -> dict[str, Array]:
        return {name: self.model[name] for name in names}

    def send_local_task_results(
        self, round_number: int, task_name: str, data_size: int, tensors: Sequence[OutgoingTensor]
    ) -> None:
        if round_number in self.closed:
            raise RequestRejectedError(
                "SendLocalTaskResults",
                grpc.StatusCode.FAILED_PRECONDITION,
                f"round {round_number} is not the round in progress ({round_number + 1})",
            )
        self.sent.append((round_number, task_name))


def test_a_round_closed_without_us_is_skipped(certs: CertsLayout) -> None:
    """A result refused as not in progress (FAILED_PRECONDITION) skips that round; the loop goes on to quit."""
    plan = digits_plan(certs)
    answers = [
        Tasks(round_number=0, tasks=TASKS, sleep_seconds=0, quit=False),
        Tasks(round_number=1, tasks=TASKS, sleep_seconds=0, quit=False),
        Tasks(round_number=2, tasks=(), sleep_seconds=0, quit=True),
    ]
    aggregator = ScriptedAggregator(DigitsRunner.initial_model(plan.runner), answers, closed={0})
    report = run_collaborator(aggregator, runner_for(plan), plan.runner, sleep=Sleeps())  # type: ignore[arg-type]
    assert report == CollaboratorReport(quit=True, tasks_run=3, rounds=[0, 1], missed_rounds=[0])
    assert aggregator.sent == [(1, task) for task in TASKS]


def test_a_closed_round_offered_again_is_an_error(certs: CertsLayout) -> None:
    """An aggregator that refuses a round as closed and then offers it again stops the loop."""
    plan = digits_plan(certs)
    answers = [Tasks(round_number=0, tasks=TASKS, sleep_seconds=0, quit=False)] * 2
    aggregator = ScriptedAggregator(DigitsRunner.initial_model(plan.runner), answers, closed={0})
    with pytest.raises(CollaboratorError, match="tasks of round 0 after refusing"):
        run_collaborator(aggregator, runner_for(plan), plan.runner, sleep=Sleeps())  # type: ignore[arg-type]
