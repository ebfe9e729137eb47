"""The contract of `FederationStore`, run against the memory store and the durable one: what a
new store holds, accepted results read back, a round's close, the best model, departures,
presence, and refusals that keep nothing. (What only a durable store does, surviving a
restart or a crash, is tests/test_durable_state.py's.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from foedus.aggregator.fedavg import ArraySource
from foedus.aggregator.liveness import Departure, Presence, Seen
from foedus.aggregator.records import (
    AveragedModel,
    ResultTensor,
    RoundCommit,
    RoundRecord,
    TaskResult,
)
from foedus.aggregator.state import DurableState
from foedus.aggregator.state_files import DATABASE
from foedus.aggregator.store import FederationStore, SavedPresence
from foedus.plans.schema import BestModelSettings, Limits, StragglerPolicy, StragglerSettings
from foedus.refusals.errors import InvalidRequestError, PreconditionError

from federations import (
    AMV,
    COLLABORATORS,
    TASKS,
    UUID,
    federation,
    federation_of,
    model,
    report,
    result,
    scores,
    store,
)

__all__ = ["store"]  # the fixture, used by name

TWO_OF_THREE = StragglerSettings(StragglerPolicy.PERCENTAGE, percentage=0.6)


def kept(store: FederationStore) -> object:
    """What a refusal must leave as it was: the store's standing, and a durable store's files
    with their modification times."""
    files: dict[str, int] = {}
    if isinstance(store, DurableState):
        files = {
            str(path.relative_to(store.root)): path.stat().st_mtime_ns
            for path in store.root.rglob("*")
            if path.is_file() and DATABASE not in path.name
        }
    return store.standing(), files


def record(round_number: int, reporters: tuple[str, ...], *, trained: bool) -> RoundRecord:
    """A round's record as the federation makes it."""
    return RoundRecord(
        round_number=round_number,
        final_validation=False,
        reporters=reporters,
        missing=tuple(sorted(set(COLLABORATORS) - set(reporters))),
        metrics={"train": {"loss": 0.5}},
        seconds=1.5,
        trained=trained,
        sites={name: {"train": {"loss": 0.5}} for name in reporters},
    )


def test_a_new_store_stands_at_round_zero_of_its_model(store: FederationStore) -> None:
    """Opened new: fresh, round 0 of the model it was made with, nothing accepted, closed or left."""
    recovered = store.recovered
    assert recovered.fresh and recovered.records == () and recovered.last_model_rounds is None
    progress = recovered.progress
    assert (progress.round_number, progress.accepted, progress.closing) == (0, (), None)
    assert progress.best is None and progress.departures == ()
    for name, array in model().items():
        assert progress.model[name].dtype == array.dtype
        np.testing.assert_array_equal(progress.model[name], array)
    standing = store.standing()
    assert (standing.uuid, standing.round_number, standing.closing) == (UUID, 0, False)
    assert (standing.results, standing.presence, standing.departures) == ((), (), ())
    assert standing.last_round is None and standing.running
    assert store.best_model() is None


def test_a_recorded_result_loads_back_as_it_was_sent(store: FederationStore) -> None:
    """Staged and recorded, a result loads back byte for byte, dtypes and tags kept, and counts
    in the round; one staged and discarded does not."""
    sent = result("alice", 0, value=2.5, data_size=7, metrics={"loss": 0.25})
    accepted = store.stage(sent)
    store.record(accepted)
    assert (accepted.collaborator, accepted.round_number, accepted.task_name) == (
        "alice",
        0,
        "train",
    )
    loaded = store.load(accepted)
    assert (loaded.collaborator, loaded.round_number, loaded.data_size) == ("alice", 0, 7)
    by_name = {tensor.name: tensor for tensor in loaded.tensors}
    assert sorted(by_name) == sorted(tensor.name for tensor in sent.tensors)
    for tensor in sent.tensors:
        assert by_name[tensor.name].array.dtype == tensor.array.dtype
        assert by_name[tensor.name].array.tobytes() == tensor.array.tobytes()
        assert tensor.tags <= by_name[tensor.name].tags
    store.discard(store.stage(result("bob", 0)))
    assert store.standing().results == (("alice", "train"),)


def test_a_result_without_tensors_loads_back_empty(store: FederationStore) -> None:
    """A store keeps whatever result it is given, even one of no tensors (which the federation
    refuses at the door), and loads it back as it was: kept by one store, kept by every one."""
    accepted = store.stage(TaskResult("alice", 0, AMV, 10, ()))
    store.record(accepted)
    loaded = store.load(accepted)
    assert (loaded.collaborator, loaded.task_name, loaded.data_size, loaded.tensors) == (
        "alice",
        AMV,
        10,
        (),
    )
    assert store.standing().results == (("alice", AMV),)


@pytest.mark.parametrize(
    "tensors",
    [(), (ResultTensor("w", frozenset({"trained"}), np.zeros((2, 2), np.float32)),)],
    ids=["no-tensors", "no-metric"],
)
def test_a_validation_result_without_a_metric_is_refused(
    store: FederationStore, tensors: tuple[ResultTensor, ...]
) -> None:
    """A validation result must report a metric: without one it is refused naming the task, and
    nothing is kept; the round then closes as if it had never been sent."""
    fed = federation_of(store)
    before = kept(store)
    with pytest.raises(InvalidRequestError, match=f"{AMV} results hold no metric"):
        fed.submit(TaskResult("alice", 0, AMV, 10, tensors))
    assert kept(store) == before
    for name in COLLABORATORS:
        report(fed, name, metrics=scores(5.0))
    summary = fed.close_round_if_due()
    assert summary is not None and summary.reporters == COLLABORATORS


def test_a_close_is_decided_then_committed(store: FederationStore) -> None:
    """`decide_close` makes the round closing; `commit_round` moves to the next with the averaged
    model, handed back as kept, keeps the record and forgets the round's results."""
    accepted = store.stage(result("alice", 0, value=3.0))
    store.record(accepted)
    store.decide_close(0, ("alice",))
    assert store.standing().closing
    source = ArraySource({t.name: t.array for t in store.load(accepted).tensors})
    closed = record(0, ("alice",), trained=True)
    kept_model = store.commit_round(
        RoundCommit(closed, AveragedModel(model(), {"alice": (10, source)}), None, False)
    )
    assert kept_model is not None
    for name, array in model().items():
        assert kept_model[name].dtype == array.dtype
        np.testing.assert_array_equal(kept_model[name], np.full_like(array, 3.0))
    standing = store.standing()
    assert (standing.round_number, standing.closing, standing.results) == (1, False, ())
    assert standing.last_round == closed
    assert store.commit_round(RoundCommit(record(1, (), trained=False), None, None, False)) is None
    assert store.standing().round_number == 2


@pytest.mark.parametrize("task", [AMV, "train"])
def test_the_best_model_is_the_one_the_commit_names(store: FederationStore, task: str) -> None:
    """Measured before training (aggregated_model_validation) the best model is the round's,
    measured by training the new one; a worse round keeps the best model as it was."""
    fed = federation_of(store, best_model=BestModelSettings(task=task))
    before: dict[str, np.ndarray] = {}
    for accuracy, value in ((0.25, 2.0), (0.5, 4.0), (0.375, 6.0)):
        for name in COLLABORATORS:
            report(fed, name, value=value, metrics={"accuracy": accuracy})
        summary = fed.close_round_if_due()
        assert summary is not None
        if accuracy == 0.375:
            assert summary.best_model is None
        else:
            wanted = summary.round_model if task == AMV else summary.model
            assert summary.best_model is wanted
            before = {name: np.array(array) for name, array in wanted.items()}
        best = store.best_model()
        assert best is not None and sorted(best) == sorted(before)
        for name, array in before.items():
            np.testing.assert_array_equal(best[name], array)
    assert fed.best is not None and fed.best.value == 0.5


def test_departures_are_kept_until_the_collaborator_rejoins(store: FederationStore) -> None:
    """A departure is in the standing once recorded, with its reason and time; a rejoin removes it."""
    store.record_leave(Departure("carol", "gone fishing", 1234.5))
    store.record_leave(Departure("bob", "", 1240.0))
    assert store.standing().departures == (
        Departure("bob", "", 1240.0),
        Departure("carol", "gone fishing", 1234.5),
    )
    store.record_rejoin("carol")
    assert store.standing().departures == (Departure("bob", "", 1240.0),)


def test_presence_is_kept_as_last_saved(store: FederationStore) -> None:
    """Saved presence is read back as saved, and the next save replaces it whole."""
    store.save_presence(
        (Seen("alice", Presence.ONLINE, 10.0, 12.0), Seen("bob", Presence.UNSEEN, 5.0, None)),
        saved=20.0,
    )
    assert sorted(store.standing().presence, key=lambda row: row.name) == [
        SavedPresence("alice", "online", 10.0, 12.0, 20.0),
        SavedPresence("bob", Presence.UNSEEN.value, 5.0, None, 20.0),
    ]
    store.save_presence((Seen("alice", Presence.OFFLINE, 30.0, 12.0),), saved=40.0)
    assert store.standing().presence == (SavedPresence("alice", "offline", 30.0, 12.0, 40.0),)


def test_duplicate_wrong_and_closed_rounds_keep_nothing(store: FederationStore) -> None:
    """A duplicate is answered OK and results for a wrong or closed round refused, all before
    anything is kept."""
    fed = federation_of(store, straggler=TWO_OF_THREE)
    assert fed.submit(result("alice", 0)) is True
    before = kept(store)
    assert fed.submit(result("alice", 0, value=5.0)) is False
    with pytest.raises(PreconditionError, match="not the round in progress"):
        fed.submit(result("bob", 1))
    assert kept(store) == before
    assert fed.submit(
        result("alice", 0, AMV, metrics=scores(1.0))
    )  # alice and bob (2 of 3) close round 0
    report(fed, "bob", metrics=scores(1.0))
    assert fed.close_round_if_due() is not None
    before = kept(store)
    with pytest.raises(PreconditionError, match="round 0 is closed"):
        fed.submit(result("carol", 0))
    assert fed.submit(result("alice", 0)) is False  # a resend into the closed round: OK, once
    assert kept(store) == before


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_values_are_refused_unless_the_plan_allows_them(
    store: FederationStore, bad: float
) -> None:
    """NaN or infinity in any tensor is refused naming it, and nothing is kept; allowed by
    limits.allow_non_finite."""
    fed = federation_of(store)
    poisoned = result("alice", 0)
    tensors = list(poisoned.tensors)
    tensors[0] = ResultTensor(tensors[0].name, tensors[0].tags, np.full((2, 2), bad, np.float32))
    poisoned = TaskResult("alice", 0, "train", 10, tuple(tensors))
    before = kept(store)
    with pytest.raises(InvalidRequestError, match=r"tensor 'w' holds NaN or infinite"):
        fed.submit(poisoned)
    metric = TaskResult(
        "bob", 0, AMV, 10, (ResultTensor("accuracy", frozenset({"metric"}), np.float32(bad)),)
    )
    with pytest.raises(InvalidRequestError, match=r"'accuracy'.*allow_non_finite"):
        fed.submit(metric)
    assert kept(store) == before
    lenient = federation(tasks=TASKS, limits=Limits(allow_non_finite=True))
    assert lenient.submit(poisoned) and lenient.submit(metric)


def test_data_size_over_the_plan_limit_is_refused(store: FederationStore) -> None:
    """A data_size above limits.max_data_size is refused naming the limit, keeping nothing; at
    the limit it is accepted."""
    fed = federation_of(store, limits=Limits(max_data_size=1000))
    before = kept(store)
    with pytest.raises(InvalidRequestError, match=r"data_size 1001 .*limits\.max_data_size"):
        fed.submit(result("alice", 0, data_size=1001))
    assert kept(store) == before
    assert fed.submit(result("alice", 0, data_size=1000))
    assert store.standing().results == (("alice", "train"),)
