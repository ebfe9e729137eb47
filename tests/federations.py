"""Test helpers: a federation of alice, bob and carol, the results they send, and the stores it
keeps them in (the `store` fixture runs a test against the memory store and the durable one)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Accepted, Array, ResultTensor, TaskResult
from foedus.aggregator.state import DurableState
from foedus.aggregator.store import FederationStore, MemoryStore
from foedus.plans.schema import BestModelSettings
from foedus.refusals.errors import StorageError

from clocks import Clock

UUID = "durable-0001"
COLLABORATORS = ("alice", "bob", "carol")
AMV = "aggregated_model_validation"
TASKS = (AMV, "train")


def model() -> dict[str, Array]:
    """A two-tensor model of two dtypes."""
    return {"w": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float64)}


def open_state(folder: Path, uuid: str = UUID, **options: Any) -> DurableState:
    """The durable state in `folder`, created around `model()` if new."""
    return DurableState.open(folder, uuid, model, max_tensor_bytes=2**20, **options)


@pytest.fixture(params=["memory", "durable"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FederationStore]:
    """A new store around `model()`: in memory, or durable in tmp_path/out (closed after)."""
    if request.param == "memory":
        yield MemoryStore(model(), federation_uuid=UUID)
        return
    opened = open_state(tmp_path / "out")
    try:
        yield opened
    finally:
        opened.close()


def federation(
    store: FederationStore | None = None,
    *,
    tasks: tuple[str, ...] = ("train",),
    rounds: int = 3,
    clock: Clock | None = None,
    **options: Any,
) -> Federation:
    """A federation of alice, bob and carol around `model()`, resuming where `store` stands."""
    return Federation(
        collaborators=COLLABORATORS,
        tasks=tasks,
        rounds=rounds,
        model=model(),
        clock=clock or Clock(),
        store=store,
        progress=None if store is None else store.recovered.progress,
        **options,
    )


def federation_of(store: FederationStore, **options: Any) -> Federation:
    """A federation resuming where `store` stands that validates and trains, tracking the best."""
    settings: dict[str, Any] = {"tasks": TASKS, "best_model": BestModelSettings(), **options}
    return federation(store, **settings)


def result(
    collaborator: str,
    round_number: int,
    task: str = "train",
    *,
    value: float = 1.0,
    data_size: int = 10,
    metrics: dict[str, float] | None = None,
) -> TaskResult:
    """Results of `task`: for train every model tensor filled with `value`; plus metrics."""
    tensors: list[ResultTensor] = []
    if task == "train":
        tensors = [
            ResultTensor(name, frozenset({"trained"}), np.full_like(array, value))
            for name, array in model().items()
        ]
    for name, number in (metrics or {}).items():
        tensors.append(ResultTensor(name, frozenset({"metric"}), np.array(number, np.float32)))
    return TaskResult(collaborator, round_number, task, data_size, tuple(tensors))


def scores(value: float) -> dict[str, float]:
    """The metrics of a collaborator that trained to `value`: accuracy value / 10, loss 1."""
    return {"accuracy": value / 10, "loss": 1.0}


def report(fed: Federation, collaborator: str, **fields: Any) -> None:
    """Fetch `collaborator`'s assignment and submit results for each of its tasks."""
    assignment = fed.assignment(collaborator)
    for task in assignment.tasks:
        assert fed.submit(result(collaborator, assignment.round_number, task, **fields))


class SlowWrites:
    """Makes a store's `stage` take a while, wait for a gate, or fail, as disks sometimes do;
    notes what it discards."""

    def __init__(
        self,
        store: FederationStore,
        monkeypatch: pytest.MonkeyPatch,
        *,
        delay: float = 0.0,
        fail: bool = False,
    ) -> None:
        self.delay = delay
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.staging = threading.Event()
        self.staged = 0
        self.discarded: list[Accepted] = []
        stage, discard = store.stage, store.discard

        def slow_stage(result: TaskResult) -> Accepted:
            self.staged += 1
            self.staging.set()
            time.sleep(self.delay)
            self.gate.wait(5)
            if self.fail:
                raise StorageError("disk full")
            return stage(result)

        def noted_discard(accepted: Accepted) -> None:
            self.discarded.append(accepted)
            discard(accepted)

        monkeypatch.setattr(store, "stage", slow_stage)
        monkeypatch.setattr(store, "discard", noted_discard)
