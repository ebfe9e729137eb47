"""Test helpers: plans for tests and a real aggregator server on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from foedus.aggregator.federation import Federation
from foedus.aggregator.records import Array, RoundSummary
from foedus.aggregator.server import AggregatorGRPCServer
from foedus.pki.layout import CertsLayout
from foedus.plans import Plan, parse_plan

FEDERATION_UUID = "test-federation-0001"
AGGREGATOR_ID = "aggregator_test"
COLLABORATORS = ("alice", "bob", "carol")
TASKS = ("aggregated_model_validation", "train", "locally_tuned_model_validation")


def plan_document(certs: CertsLayout | None, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A plan as parsed YAML: a test federation on 127.0.0.1, port 0, sections overridable."""
    document: dict[str, Any] = {
        "federation": {
            "name": "test",
            "uuid": FEDERATION_UUID,
            "aggregator_id": AGGREGATOR_ID,
            "rounds": 2,
        },
        "aggregator": {
            "host": "localhost",
            "port": 0,
            "listen_address": "127.0.0.1",
            "grace_seconds": 1,
        },
        "tls": {"insecure": True} if certs is None else {"certs_dir": str(certs.root)},
        "collaborators": list(COLLABORATORS),
        "tasks": list(TASKS),
        "runner": {"name": "digits", "seed": 0},
        "connection": {
            "deadline_seconds": 10,
            "max_retries": 3,
            "max_wait_seconds": 20,
            "backoff_initial_seconds": 0.05,
            "backoff_max_seconds": 0.5,
        },
    }
    for key, value in sections.items():
        base = document.get(key)
        document[key] = {**base, **value} if isinstance(base, dict) else value
    return document


def make_plan(certs: CertsLayout | None, **sections: Mapping[str, Any]) -> Plan:
    """A checked `Plan` for tests (see `plan_document`)."""
    return parse_plan(plan_document(certs, **sections), Path("test-plan.yaml"))


def small_model() -> dict[str, Array]:
    """A small model with a few dtypes, so exact encodings are exercised."""
    return {
        "dense/weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 10,
        "dense/bias": np.zeros(4, dtype=np.float32),
        "embedding": np.linspace(-1, 1, 6, dtype=np.float64).reshape(2, 3),
        "steps": np.array(7, dtype=np.int64),
    }


def make_federation(plan: Plan, model: Mapping[str, Array] | None = None) -> Federation:
    """A federation of the plan's collaborators and tasks around `model` (a small one by default)."""
    return Federation(
        collaborators=plan.collaborators,
        tasks=plan.tasks,
        rounds=plan.federation.rounds,
        model=small_model() if model is None else model,
    )


@contextmanager
def running_aggregator(
    plan: Plan, federation: Federation | None = None
) -> Iterator[AggregatorGRPCServer]:
    """A real aggregator server for `plan`, started on an ephemeral port, stopped afterwards."""
    server = AggregatorGRPCServer(plan, federation or make_federation(plan))
    server.start()
    try:
        yield server
    finally:
        server.stop(0)


@contextmanager
def closing_rounds(
    federation: Federation, closed: list[RoundSummary] | None = None
) -> Iterator[None]:
    """Close the federation's rounds as they become due, as the aggregator's runtime does
    (each round's summary appended to `closed`, if given)."""
    stop = threading.Event()

    def close() -> None:
        while not stop.is_set() and not federation.finished:
            federation.wait_for_submission(0.05)
            summary = federation.close_round_if_due()
            if summary is not None and closed is not None:
                closed.append(summary)

    thread = threading.Thread(target=close, name="close-rounds", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
