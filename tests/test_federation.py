"""The round state machine without sockets: straggler policies, late results, final validation,
long polls, best model, racing writes; each test against the memory store and the durable one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from foedus.aggregator.identity import Gatekeeper
from foedus.aggregator.records import Best, TaskResult
from foedus.aggregator.servicer import AggregatorServicer
from foedus.aggregator.store import FederationStore
from foedus.plans.schema import BestModelSettings, Limits, StragglerPolicy, StragglerSettings
from foedus.protos import aggregator_pb2
from foedus.refusals.errors import InvalidRequestError, PreconditionError, StorageError

from clocks import Clock
from federations import AMV, COLLABORATORS, SlowWrites, federation, report, result, store

__all__ = ["store"]  # the fixture, used by name


def test_round_advances_when_everyone_reported(store: FederationStore) -> None:
    """With wait_for_all the round closes once all three reported, and the model is their mean."""
    fed = federation(store)
    closes: list[int] = []  # on_close runs once a close is decided, before the averaging
    for name, value in (("alice", 1.0), ("bob", 2.0)):
        report(fed, name, value=value)
    assert fed.close_round_if_due(on_close=lambda: closes.append(fed.round_number)) is None
    assert closes == []
    report(fed, "carol", value=6.0, data_size=20)
    summary = fed.close_round_if_due(on_close=lambda: closes.append(fed.round_number))
    assert summary is not None and closes == [0]
    assert (summary.round_number, summary.reporters, summary.missing) == (0, COLLABORATORS, ())
    assert fed.round_number == 1
    assert fed.assignment("alice").tasks == ("train",)
    # (1*10 + 2*10 + 6*20) / 40 = 3.75, in each tensor's own dtype.
    assert fed.model()["w"].dtype == np.float32
    assert fed.model()["w"].tolist() == [[3.75, 3.75], [3.75, 3.75]]
    assert fed.model()["b"].tolist() == [3.75, 3.75]


def test_cutoff_closes_without_a_dead_collaborator(store: FederationStore) -> None:
    """Past the cut-off the round closes with those who reported; carol is left out."""
    clock = Clock()
    fed = federation(
        store,
        straggler=StragglerSettings(StragglerPolicy.CUTOFF, cutoff_seconds=30, min_reports=1),
        clock=clock,
    )
    report(fed, "alice", value=2.0)
    fed.assignment("carol")  # carol takes her task and is never heard of again
    clock.now += 29
    assert fed.close_round_if_due() is None
    clock.now += 2
    report(fed, "bob", value=4.0)  # after the cut-off, before the close: accepted
    summary = fed.close_round_if_due()
    assert summary is not None
    assert (summary.reporters, summary.missing) == (("alice", "bob"), ("carol",))
    assert summary.seconds == pytest.approx(31)
    assert fed.model()["b"].tolist() == [3.0, 3.0]


def test_cutoff_waits_for_min_reports(store: FederationStore) -> None:
    """Past the cut-off, the round still waits until min_reports collaborators have reported."""
    clock = Clock()
    fed = federation(
        store,
        straggler=StragglerSettings(StragglerPolicy.CUTOFF, cutoff_seconds=5, min_reports=2),
        clock=clock,
    )
    report(fed, "alice")
    clock.now += 600
    assert fed.close_round_if_due() is None
    report(fed, "bob")
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == ("alice", "bob")


def test_percentage_closes_at_its_share(store: FederationStore) -> None:
    """With percentage 0.5 of three, the round closes at the second report (ceil 1.5 = 2)."""
    fed = federation(store, straggler=StragglerSettings(StragglerPolicy.PERCENTAGE, percentage=0.5))
    report(fed, "bob")
    assert fed.close_round_if_due() is None
    report(fed, "carol")
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == ("bob", "carol")


def test_each_reporters_own_metrics_are_kept_beside_the_means(store: FederationStore) -> None:
    """A round's record keeps every reporter's metrics per task as sent, beside the weighted
    means; a collaborator that had not finished the round is in neither."""
    fed = federation(
        store,
        tasks=(AMV, "train"),
        straggler=StragglerSettings(StragglerPolicy.PERCENTAGE, percentage=0.6),
    )
    for name, size, loss in (("bob", 30, 0.25), ("alice", 10, 0.75)):
        for task in (AMV, "train"):
            metrics = {"loss": loss} if task == "train" else {"accuracy": loss / 2, "loss": loss}
            assert fed.submit(result(name, 0, task, data_size=size, metrics=metrics))
    assert fed.submit(result("carol", 0, AMV, metrics={"accuracy": 1.0}))  # train still to do
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == ("alice", "bob")
    assert summary.metrics == {
        AMV: {"accuracy": 0.1875, "loss": 0.375},  # (0.375 * 10 + 0.125 * 30) / 40
        "train": {"loss": 0.375},
    }
    assert summary.record.sites == {
        "alice": {AMV: {"accuracy": 0.375, "loss": 0.75}, "train": {"loss": 0.75}},
        "bob": {AMV: {"accuracy": 0.125, "loss": 0.25}, "train": {"loss": 0.25}},
    }
    assert list(summary.record.sites) == ["alice", "bob"]  # sorted, whatever the arrival order


def test_late_result_for_a_closed_round_is_refused(store: FederationStore) -> None:
    """A result for a round that closed is refused with FAILED_PRECONDITION naming both rounds."""
    fed = federation(store, straggler=StragglerSettings(StragglerPolicy.PERCENTAGE, percentage=0.6))
    report(fed, "alice")
    report(fed, "bob")
    assert fed.close_round_if_due() is not None
    before = fed.model()
    with pytest.raises(PreconditionError, match="round 0 is closed; the federation is in round 1"):
        fed.submit(result("carol", 0, value=1e6))
    assert fed.results() == ()
    assert fed.model()["w"].tobytes() == before["w"].tobytes()


def tensors(result: TaskResult) -> list[tuple[str, bytes]]:
    """Each tensor's name and bytes, by name: what a store must give back as it was sent."""
    return sorted((tensor.name, tensor.array.tobytes()) for tensor in result.tensors)


def test_duplicate_is_counted_once_even_after_the_close(store: FederationStore) -> None:
    """A resend of an accepted result answers False and counts once, also once its round closed."""
    fed = federation(store)
    first = result("alice", 0, value=1.0)
    assert fed.submit(first) is True
    assert fed.submit(result("alice", 0, value=99.0)) is False
    assert [tensors(r) for r in fed.results()] == [tensors(first)]
    report(fed, "bob", value=1.0)
    report(fed, "carol", value=1.0)
    summary = fed.close_round_if_due()
    assert summary is not None and fed.model()["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # Its first answer was lost while the round closed: the resend is answered OK, not counted.
    assert fed.submit(first) is False
    assert fed.results() == ()


def test_train_results_must_carry_every_model_tensor(store: FederationStore) -> None:
    """`train` results without a tensor of the model are refused and nothing is stored."""
    fed = federation(store)
    partial = result("alice", 0)
    partial = TaskResult("alice", 0, "train", 10, partial.tensors[:1])
    with pytest.raises(InvalidRequestError, match="lack 1 tensor"):
        fed.submit(partial)
    assert fed.results() == ()


def test_final_validation_round_then_quit(store: FederationStore) -> None:
    """After the last training round one round validates the final model; then everyone is told to quit."""
    fed = federation(store, tasks=(AMV, "train"), rounds=1)
    for name in COLLABORATORS:
        report(fed, name, value=2.0, metrics={"accuracy": 0.5, "loss": 1.0})
    training = fed.close_round_if_due()
    assert training is not None and not training.final_validation and not training.finished
    assert training.metrics == {
        AMV: {"accuracy": 0.5, "loss": 1.0},
        "train": {"accuracy": 0.5, "loss": 1.0},
    }
    assert fed.assignment("alice").tasks == (AMV,)
    with pytest.raises(PreconditionError, match="final validation round"):
        fed.submit(result("alice", 1, "train"))
    for name, accuracy, size in (("alice", 0.9, 1), ("bob", 0.8, 1), ("carol", 0.5, 2)):
        fed.submit(result(name, 1, AMV, metrics={"accuracy": accuracy}, data_size=size))
    final = fed.close_round_if_due()
    assert final is not None and final.final_validation and final.finished
    assert final.metrics[AMV]["accuracy"] == pytest.approx(0.675)
    assert final.round_model["w"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert fed.finished
    assert not fed.everyone_told_to_quit()
    for name in COLLABORATORS:
        assert fed.assignment(name).quit
    assert fed.everyone_told_to_quit()
    assert fed.submit(result("alice", 1, AMV)) is False  # a resend: answered OK
    with pytest.raises(PreconditionError, match="round 2: the federation has finished"):
        fed.submit(result("alice", 2, AMV))


def test_long_poll_wakes_when_the_round_closes(store: FederationStore) -> None:
    """A collaborator waiting for work learns of the next round within milliseconds of the close."""
    fed = federation(store)
    report(fed, "alice")
    answers: list[tuple[int, tuple[str, ...], float]] = []

    def wait() -> None:
        answer = fed.wait_for_assignment("alice", timeout=10)
        answers.append((answer.round_number, answer.tasks, time.monotonic()))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    assert not answers  # still waiting: alice has nothing to do in round 0
    report(fed, "bob")
    report(fed, "carol")
    assert fed.close_round_if_due() is not None
    closed = time.monotonic()
    waiter.join(5)
    assert not waiter.is_alive()
    ((round_number, tasks, woke),) = answers
    assert (round_number, tasks) == (1, ("train",))
    assert woke - closed < 0.5


def test_long_poll_times_out_when_nothing_happens(store: FederationStore) -> None:
    """Without a close the long poll returns after its timeout, telling the collaborator to wait."""
    fed = federation(store)
    report(fed, "alice")
    started = time.monotonic()
    answer = fed.wait_for_assignment("alice", timeout=0.2)
    elapsed = time.monotonic() - started
    assert (answer.tasks, answer.quit, answer.sleep_seconds) == ((), False, 1)
    assert 0.15 <= elapsed < 2


class FakeContext:
    """Just enough of a gRPC servicer context for GetTasks: a peer name and a deadline."""

    def __init__(self, name: str, remaining: float | None = 30.0) -> None:
        self.name = name
        self.remaining = remaining

    def auth_context(self) -> dict[str, list[bytes]]:
        """The TLS peer's common name, as gRPC gives it."""
        return {"x509_common_name": [self.name.encode()]}

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline."""
        return self.remaining


def get_tasks(servicer: AggregatorServicer, context: FakeContext) -> tuple[float, int]:
    """Call GetTasks as `context`'s collaborator; how long it took and the sleep it was told."""
    header = aggregator_pb2.MessageHeader(
        sender=context.name, receiver="aggregator", federation_uuid="fed"
    )
    started = time.monotonic()
    reply = servicer.GetTasks(aggregator_pb2.GetTasksRequest(header=header), context)  # type: ignore[arg-type]
    return time.monotonic() - started, reply.sleep_time


def test_long_polls_are_capped_and_kept_within_the_deadline(store: FederationStore) -> None:
    """Past the cap of waiting GetTasks calls, or near the caller's deadline, the answer comes at once."""
    fed = federation(store)
    for name in COLLABORATORS:
        report(fed, name)  # everyone is done; nobody closes the round, so GetTasks would wait
    servicer = AggregatorServicer(
        fed,
        Gatekeeper("aggregator", "fed", frozenset(COLLABORATORS)),
        Limits(),
        long_poll_seconds=5,
        max_long_polls=1,
    )
    waiting = threading.Thread(target=get_tasks, args=(servicer, FakeContext("alice")))
    waiting.start()
    time.sleep(0.05)
    elapsed, sleep = get_tasks(servicer, FakeContext("bob"))  # the one slot is alice's
    assert elapsed < 0.5 and sleep == 1
    servicer.stop_long_polls()  # alice's wait ends now, not after 5 s
    waiting.join(1)
    assert not waiting.is_alive()
    servicer = AggregatorServicer(
        fed,
        Gatekeeper("aggregator", "fed", frozenset(COLLABORATORS)),
        Limits(),
        long_poll_seconds=5,
        max_long_polls=1,
    )
    elapsed, sleep = get_tasks(servicer, FakeContext("carol", remaining=0.4))
    assert elapsed < 0.3 and sleep == 1
    elapsed, sleep = get_tasks(servicer, FakeContext("carol", remaining=0.8))
    assert 0.2 < elapsed < 0.6 and sleep == 1


def test_best_model_is_tracked_with_its_training_rounds(store: FederationStore) -> None:
    """The federation keeps the best aggregated accuracy; the validated model is the round's, labelled by its training rounds."""
    fed = federation(store, tasks=(AMV, "train"), rounds=2)
    fed.best_model = BestModelSettings()
    for round_number, accuracy in ((0, 0.25), (1, 0.125), (2, 0.5)):
        for name in COLLABORATORS:
            report(fed, name, value=round_number + 1.0, metrics={"accuracy": accuracy})
        summary = fed.close_round_if_due()
        assert summary is not None and summary.round_number == round_number
        if round_number == 1:  # worse than round 0's: no new best model
            assert summary.best == Best(0.25, 0) and summary.best_model is None
    assert summary.best == Best(0.5, 2) and fed.best == Best(0.5, 2)
    assert summary.best_model is summary.round_model  # validated before this round's training
    assert summary.best_model["w"].tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_the_same_result_uploaded_twice_at_once_is_stored_once(
    store: FederationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two uploads of one result racing each other: one is stored, the other waits and is answered as a resend."""
    writes = SlowWrites(store, monkeypatch, delay=0.2)
    fed = federation(store, rounds=1)
    answers: list[bool] = []
    uploads = [
        threading.Thread(target=lambda: answers.append(fed.submit(result("alice", 0))))
        for _ in range(2)
    ]
    for upload in uploads:
        upload.start()
    for upload in uploads:
        upload.join(5)
    assert sorted(answers) == [False, True]
    assert writes.staged == 1 and len(fed.accepted()) == 1


def test_a_failed_write_accepts_nothing(
    store: FederationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the store cannot write, the result is not accepted and is still owed."""
    SlowWrites(store, monkeypatch, fail=True)
    fed = federation(store, rounds=1)
    with pytest.raises(StorageError, match="disk full"):
        fed.submit(result("alice", 0))
    assert fed.accepted() == ()
    assert fed.assignment("alice").tasks == ("train",)


@pytest.mark.parametrize("fail", [False, True], ids=["written", "write-failed"])
def test_a_result_whose_round_closed_while_it_was_written_is_refused(
    store: FederationStore, monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    """A result still being written when its round closes is refused as closed, and what was written is discarded."""
    writes = SlowWrites(store, monkeypatch)
    fed = federation(
        store, rounds=2, straggler=StragglerSettings(StragglerPolicy.PERCENTAGE, percentage=0.6)
    )
    report(fed, "alice")
    report(fed, "bob")  # two of three: due, but not closed yet
    writes.gate.clear()
    writes.staging.clear()
    writes.fail = fail
    refusals: list[BaseException] = []

    def late() -> None:
        try:
            fed.submit(result("carol", 0))
        except BaseException as error:
            refusals.append(error)

    carol = threading.Thread(target=late)
    carol.start()
    assert writes.staging.wait(5)
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == ("alice", "bob")
    writes.gate.set()
    carol.join(5)
    (refusal,) = refusals
    assert isinstance(refusal, PreconditionError)
    assert "round 0 is closed" in str(refusal)
    assert len(writes.discarded) == (0 if fail else 1)
    assert fed.accepted() == ()
