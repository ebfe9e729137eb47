"""Calls waiting in gRPC's backlog of a busy aggregator are answered, never cancelled by gRPC.

The aggregator runs in a process of its own (`backlog_server.py`) whose Python the test holds
still, so the calls sent meanwhile wait where they would on a loaded machine: received by gRPC,
not yet taken by the server's thread. gRPC's defaults cancel such calls past 1,000 of them, and
any that waited 30 s, as a bare CANCELLED; a collaborator's loop ends on that status, and under
`wait_for_all` its round never closes (make bench's 2,000 collaborators did exactly that).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from foedus.pki.layout import CertsLayout
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc

from servers import AGGREGATOR_ID, COLLABORATORS, FEDERATION_UUID, plan_document

HERE = Path(__file__).resolve().parent
START_SECONDS = 60.0
ANSWER_SECONDS = 120.0


class HeldServer:
    """`backlog_server.py` as a process: its port, and a way to hold its Python still."""

    def __init__(self, plan: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "backlog_server.py"), str(plan)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.expect("port ").split()[1])

    def expect(self, start: str) -> str:
        """Its next stdout line, which must start with `start` (a bounded wait: see `stop`)."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith(start), f"backlog_server.py said {line!r}, expected {start!r}"
        return line

    def hold(self, seconds: float) -> None:
        """Have it hold the GIL for `seconds`; returns once it has started to."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"hold {seconds}\n")
        self.process.stdin.flush()
        self.expect("holding")

    def stop(self) -> None:
        """End it (its stdin closed), killed if it does not end in time."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=30)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


@pytest.fixture
def held_server(certs: CertsLayout, tmp_path: Path) -> Iterator[HeldServer]:
    """An aggregator process whose collaborators may each have 500 calls at once."""
    document = plan_document(certs, limits={"max_calls_per_collaborator": 500})
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump(document), encoding="utf-8")
    server = HeldServer(plan)
    try:
        yield server
    finally:
        server.stop()


def channels(certs: CertsLayout, port: int) -> dict[str, grpc.Channel]:
    """A channel per collaborator, each with its own certificate."""
    opened = {}
    for name in COLLABORATORS:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certs.ca_bundle.read_bytes(),
            private_key=certs.collaborator_key(name).read_bytes(),
            certificate_chain=certs.collaborator_cert(name).read_bytes(),
        )
        opened[name] = grpc.secure_channel(f"127.0.0.1:{port}", credentials)
    return opened


def ping(channel: grpc.Channel, name: str) -> grpc.Future:
    """A Ping from `name`, under way."""
    header = aggregator_pb2.MessageHeader(
        sender=name, receiver=AGGREGATOR_ID, federation_uuid=FEDERATION_UUID
    )
    stub = aggregator_pb2_grpc.AggregatorStub(channel)
    future: grpc.Future = stub.Ping.future(
        aggregator_pb2.PingRequest(header=header), timeout=ANSWER_SECONDS
    )
    return future


def statuses(
    certs: CertsLayout, server: HeldServer, *, calls_each: int, hold_seconds: float
) -> dict[str, int]:
    """How the calls sent while the server is held were answered: a count per status."""
    opened = channels(certs, server.port)
    try:
        for name, channel in opened.items():  # every connection made before the hold
            ping(channel, name).result(timeout=START_SECONDS)
        server.hold(hold_seconds)
        futures = [
            ping(channel, name) for name, channel in opened.items() for _ in range(calls_each)
        ]
        server.expect("held")
        counts: dict[str, int] = {}
        for future in futures:
            exception = future.exception(timeout=ANSWER_SECONDS)
            code = grpc.StatusCode.OK if exception is None else future.code()
            counts[code.name] = counts.get(code.name, 0) + 1
        return counts
    finally:
        for channel in opened.values():
            channel.close()


def test_more_calls_than_grpcs_default_backlog_are_all_answered(
    certs: CertsLayout, held_server: HeldServer
) -> None:
    """1,500 calls waiting at once (gRPC's default cancels past 1,000) are all answered OK."""
    counts = statuses(certs, held_server, calls_each=500, hold_seconds=5)
    assert counts == {"OK": 1500}


@pytest.mark.slow
def test_calls_waiting_longer_than_grpcs_default_are_answered(
    certs: CertsLayout, held_server: HeldServer
) -> None:
    """Calls that waited 32 s in the backlog (gRPC's default cancels them at 30 s) are answered OK."""
    counts = statuses(certs, held_server, calls_each=2, hold_seconds=32)
    assert counts == {"OK": 6}
