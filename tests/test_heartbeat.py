"""Heartbeats while a task runs: the thread on its own, and against real aggregators over mTLS."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest

from foedus.aggregator.federation import Federation
from foedus.aggregator.liveness import Liveness, Presence
from foedus.aggregator.server import SERVICE, AggregatorGRPCServer, method_handlers
from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.digits import DigitsRunner
from foedus.collaborator.heartbeat import Heartbeat
from foedus.collaborator.loop import run_collaborator
from foedus.pki.layout import CertsLayout
from foedus.pki.tls import server_credentials
from foedus.plans import Plan
from foedus.plans.runners import Model, TrainOutcome

from servers import make_federation, make_plan, running_aggregator


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout} s"
        time.sleep(0.01)


def heartbeat_threads() -> list[threading.Thread]:
    """The heartbeat threads alive now."""
    return [thread for thread in threading.enumerate() if thread.name == "heartbeat"]


def test_heartbeats_are_sent_while_inside_and_stop_after() -> None:
    """Inside `during` the heartbeat comes every interval; after it, the thread ends and none come."""
    sent: list[float] = []
    beat = Heartbeat(lambda: bool(sent.append(time.monotonic())) or True, 0.02)
    with beat.during():
        wait_until(lambda: len(sent) >= 3)
    wait_until(lambda: not heartbeat_threads())
    count = len(sent)
    time.sleep(0.1)
    assert len(sent) == count and beat.sent == count and beat.supported


def test_no_interval_means_no_heartbeat() -> None:
    """With interval None nothing is sent and no thread starts."""
    beat = Heartbeat(lambda: pytest.fail("sent a heartbeat"), None)  # type: ignore[arg-type, return-value]
    with beat.during():
        assert not heartbeat_threads()


def test_an_aggregator_without_heartbeats_is_told_once(caplog: pytest.LogCaptureFixture) -> None:
    """`send` answering False (UNIMPLEMENTED) stops heartbeats for good, said once in the log."""
    caplog.set_level(logging.INFO, logger="foedus.collaborator.heartbeat")
    calls: list[int] = []
    beat = Heartbeat(lambda: bool(calls.append(1)), 0.01)
    for _ in range(3):
        with beat.during():
            wait_until(lambda: not beat.supported)
    assert calls == [1]
    said = [r.getMessage() for r in caplog.records if "does not take heartbeats" in r.getMessage()]
    assert len(said) == 1


# -- against real aggregators --------------------------------------------------------------------


def client_for(plan: Plan, port: int, name: str = "alice") -> AggregatorGRPCClient:
    """A real client for `name` that dials the test aggregator on 127.0.0.1."""
    return AggregatorGRPCClient.from_plan(
        plan, name, aggregator_address="127.0.0.1", aggregator_port=port
    )


def test_a_heartbeat_marks_its_collaborator_online(certs: CertsLayout) -> None:
    """`client.heartbeat()` is accepted by a foedus aggregator, which then counts alice online."""
    plan = make_plan(certs)
    federation = make_federation(plan)
    with running_aggregator(plan, federation) as server, client_for(plan, server.port) as client:
        assert client.heartbeat() is True  # nothing sent before a call checked the server
        assert federation.online_count() == 0
        client.ping()
        federation.liveness = Liveness(plan.collaborators, 60)  # forget the ping
        assert client.heartbeat() is True
        assert federation.liveness.presence("alice") is Presence.ONLINE
        assert federation.online_count() == 1


@contextmanager
def aggregator_without_heartbeat(plan: Plan) -> Iterator[int]:
    """A foedus aggregator with the Heartbeat RPC taken out, as OpenFL's has none; its port."""
    aggregator = AggregatorGRPCServer(plan, make_federation(plan))
    handlers = method_handlers(aggregator.servicer)
    del handlers["Heartbeat"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    assert plan.tls.certs is not None
    port = server.add_secure_port(
        "127.0.0.1:0",
        server_credentials(
            plan.tls.certs.aggregator_cert, plan.tls.certs.aggregator_key, plan.tls.certs.ca_bundle
        ),
    )
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait()


def test_an_aggregator_answering_unimplemented_gets_no_more_heartbeats(
    certs: CertsLayout, caplog: pytest.LogCaptureFixture
) -> None:
    """Against an aggregator without Heartbeat, the client says so and the loop stops sending."""
    caplog.set_level(logging.INFO, logger="foedus.collaborator.heartbeat")
    plan = make_plan(certs)
    with aggregator_without_heartbeat(plan) as port, client_for(plan, port) as client:
        client.ping()  # the loop's first call checks who the server is
        assert client.heartbeat() is False
        beat = Heartbeat(client.heartbeat, 0.01)
        for _ in range(2):
            with beat.during():
                wait_until(lambda: not beat.supported)
        client.get_tasks()  # the other calls work as ever
    said = [r for r in caplog.records if "does not take heartbeats" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


TRAIN_SECONDS = 4.0
OFFLINE_AFTER = 2.0


class SlowRunner(DigitsRunner):
    """The digits runner, but training takes TRAIN_SECONDS; meanwhile it samples alice's presence."""

    federation: Federation
    seen: list[Presence]

    def train(self, model: Model, round_number: int) -> TrainOutcome:
        """Train as usual, after watching the aggregator's judgement of alice for a while."""
        deadline = time.monotonic() + TRAIN_SECONDS
        while time.monotonic() < deadline:
            self.seen.append(self.federation.liveness.presence("alice"))
            time.sleep(0.05)
        return super().train(model, round_number)


@pytest.mark.parametrize("heartbeats", [True, False], ids=["with", "without"])
def test_a_long_task_with_heartbeats_does_not_look_like_a_death(
    certs: CertsLayout, heartbeats: bool
) -> None:
    """Alice trains for twice offline_after_seconds: with heartbeats she stays online, without
    them she is taken for dead midway."""
    plan = make_plan(
        certs,
        federation={"rounds": 1},
        collaborators=["alice"],
        tasks=["train"],
        aggregator={"long_poll_seconds": 0.2},
        straggler={"offline_after_seconds": OFFLINE_AFTER},
        connection={"heartbeat_seconds": 0.2},
    )
    federation = Federation.from_plan(plan, DigitsRunner.initial_model(plan.runner))
    runner = SlowRunner(plan.runner, collaborator="alice", collaborators=plan.collaborators)
    runner.federation, runner.seen = federation, []
    interval = plan.connection.heartbeat_seconds if heartbeats else None
    with running_aggregator(plan, federation) as server, client_for(plan, server.port) as client:
        report = run_collaborator(
            client, runner, plan.runner, max_idle_polls=1, heartbeat_seconds=interval
        )
    assert report.tasks_run == 1 and len(runner.seen) > 10
    if heartbeats:
        assert set(runner.seen) == {Presence.ONLINE}
    else:
        assert runner.seen[0] is Presence.ONLINE and runner.seen[-1] is Presence.OFFLINE
