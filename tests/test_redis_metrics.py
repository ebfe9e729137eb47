"""The envoy's metrics in a real `redis-server` (FLorist's scheme: SET <uuid> <json>, PUBLISH).

The server is started by the test on a free port of 127.0.0.1 in a temporary folder, without
persistence, and stopped after; a machine without `redis-server` skips these tests with the
reason, except under CI (the environment variable), where they must run (`.ci/run` installs
Debian's package). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from test_site_api import FEDERATION_SECONDS, PATIENT, ROUNDS, detail, wait_until

from foedus.envoy.config import load_config
from foedus.envoy.progress import ProgressBook
from foedus.envoy.redis_metrics import RedisReporter
from foedus.envoy.site import Site
from foedus.envoy.site_api import TOKEN_FILE
from foedus.envoy.state import EnvoyState
from foedus.lifecycle.states import CollaboratorState
from foedus.pki.layout import CertsLayout
from foedus.retry.backoff import Backoff

from envoys import EnvoyProcess, RecordingDirector, stop_collaborators, write_envoy_config
from federation_processes import FederationProcesses, free_port, write_plan
from servers import plan_document

S = CollaboratorState


class RedisServer:
    """One `redis-server` on 127.0.0.1:`port`, its files and log in `folder`."""

    def __init__(self, executable: str, folder: Path) -> None:
        self.executable = executable
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port, empty) and wait until it answers PING."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.executable,
                    *("--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--dir", str(self.folder), "--save", "", "--appendonly", "no"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = self.client()
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                assert self.process.poll() is None, (self.folder / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not answer PING in 30 s"
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL it: gone at once, with every key."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        """A client of it."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server of this test's own."""
    executable = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if executable is None:
        message = "redis-server is not installed (Debian's package redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(executable, tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Subscriber:
    """Every message PUBLISHed on any channel, each with the key's value read right after."""

    server: RedisServer
    messages: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __enter__(self) -> Subscriber:
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the subscriber did not subscribe in 30 s"
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=30)

    def _listen(self) -> None:
        client = self.server.client()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.psubscribe("*")
            pubsub.get_message(timeout=5)  # the psubscribe confirmation
            self.ready.set()
            while not self.stop.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message is None:
                    continue
                channel = message["channel"].decode()
                value = client.get(channel)
                snapshot = json.loads(value) if isinstance(value, bytes) else None
                self.messages.append((channel, message["data"].decode(), snapshot))
        except redis.ConnectionError:
            pass  # the server was killed: the test goes on without it
        finally:
            pubsub.close()
            client.close()


# -- in process ---------------------------------------------------------------------------------


def test_each_change_is_set_then_published_once(
    redis_server: RedisServer, certs: CertsLayout, tmp_path: Path
) -> None:
    """A new collaborator and each change of it: SET its JSON, PUBLISH update; nothing new, nothing sent."""
    config = load_config(write_envoy_config(tmp_path, certs, free_port()))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    site = Site("alice", config, state)
    reporter = RedisReporter(site, redis_server.url, ProgressBook())
    try:
        with Subscriber(redis_server) as subscriber:
            assert reporter.send_changes() == 0  # nothing yet: a PING
            own = site.start_own(yaml.safe_dump(plan_document(certs)), {}).experiment_id
            assert reporter.send_changes() == 1
            assert reporter.send_changes() == 0
            state.transition(own, S.STARTED, pid=None)
            state.transition(own, S.EXITED, exit_code=3, reason="ended badly")
            assert reporter.send_changes() == 1
            wait_until("two updates", lambda: len(subscriber.messages) >= 2)
        assert [(c, d) for c, d, _ in subscriber.messages] == [(own, "update"), (own, "update")]
        stored = json.loads(redis_server.client().get(own) or b"null")
        assert (stored["uuid"], stored["state"], stored["exit_code"]) == (own, "exited", 3)
        assert stored["rounds"] == {} and stored["ended_at"] is None
    finally:
        reporter.stop()
        state.close()


def test_redis_away_fails_the_send_and_the_thread_keeps_trying(
    redis_server: RedisServer, certs: CertsLayout, tmp_path: Path
) -> None:
    """Redis gone: a send raises, the thread logs and retries; back (empty), every key is sent again."""
    config = load_config(write_envoy_config(tmp_path, certs, free_port()))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    site = Site("alice", config, state)
    reporter = RedisReporter(
        site, redis_server.url, ProgressBook(), interval=0.1, backoff=Backoff(0.1, 0.3)
    )
    try:
        own = site.start_own(yaml.safe_dump(plan_document(certs)), {}).experiment_id
        reporter.start()
        client = redis_server.client()
        wait_until("the first SET", lambda: client.get(own))
        redis_server.kill()
        wait_until("a failure noticed", lambda: reporter.backoff.failures > 0)
        redis_server.start()  # empty: it lost the key
        client = redis_server.client()
        stored = wait_until("the key sent again", lambda: client.get(own))
        assert json.loads(stored)["state"] == "site_approved"
    finally:
        reporter.stop()
        state.close()


# -- a real envoy, real federations -------------------------------------------------------------


@dataclass
class Alice:
    """alice's envoy process, reporting to the test's Redis, and a client of its site API."""

    envoy: EnvoyProcess
    api: httpx.Client
    folder: Path


@pytest.fixture
def alice(redis_server: RedisServer, certs: CertsLayout, tmp_path: Path) -> Iterator[Alice]:
    """`envoy start` with the site API and metrics.redis_url on, a recording director serving."""
    director = RecordingDirector(certs, free_port())
    director.start()
    api_port = free_port()
    config = write_envoy_config(
        tmp_path / "alice",
        certs,
        director.port,
        site_api={"enabled": True, "port": api_port},
        metrics={"redis_url": redis_server.url},
    )
    envoy = EnvoyProcess("alice", config, tmp_path / "alice" / "envoy.log")
    state_dir = tmp_path / "alice" / "state"
    envoy.start()
    try:
        token_file = state_dir / TOKEN_FILE
        wait_until("the token file", lambda: token_file.exists() or None)
        token = token_file.read_text(encoding="ascii").strip()
        with httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ) as api:
            wait_until("connect", lambda: api.get("/api/connect").status_code == 200)
            yield Alice(envoy, api, tmp_path)
        assert envoy.terminate() == 0
    finally:
        if envoy.alive():
            envoy.terminate()
        stop_collaborators(state_dir)
        director.stop()


def test_a_federation_reports_every_round_set_then_published(
    alice: Alice, redis_server: RedisServer, certs: CertsLayout
) -> None:
    """alice POSTed for a real federation: each change SET then PUBLISHed, every round in the key.

    carol starts only once alice's first round is in Redis: round 0 cannot close without her, so
    alice waits there and the mid-run state is seen whatever the machine's speed (a federation
    that runs faster than the reporter's one-second poll would otherwise show only its end).
    """
    plan = write_plan(alice.folder / "federation", certs, ROUNDS, connection=PATIENT)
    federation = FederationProcesses(plan, alice.folder / "federation")
    try:
        with Subscriber(redis_server) as subscriber:
            federation.start("aggregator")
            answer = alice.api.post("/api/collaborators", json={"plan_path": str(plan)})
            own = answer.json()["uuid"]
            federation.start("bob")
            wait_until(
                "alice's round 0 in Redis, before carol starts",
                lambda: any(
                    s and s["round"] == 0 and s["state"] == "started"
                    for _, _, s in subscriber.messages
                ),
                timeout=FEDERATION_SECONDS,
            )
            federation.start("carol")
            codes = federation.wait_all(FEDERATION_SECONDS)
            assert codes == {"aggregator": 0, "bob": 0, "carol": 0}, federation.output()
            wait_until(
                "the exit in Redis",
                lambda: any(s and s["state"] == "exited" for _, _, s in subscriber.messages),
            )
    finally:
        federation.stop_all()
    assert {(channel, data) for channel, data, _ in subscriber.messages} == {(own, "update")}
    snapshots = [s for _, _, s in subscriber.messages if s is not None]
    assert [s["uuid"] for s in snapshots] == [own] * len(snapshots)
    assert any(s["state"] == "started" and s["round"] == 0 for s in snapshots)
    final = snapshots[-1]
    assert (final["state"], final["exit_code"]) == ("exited", 0)
    assert list(final["rounds"]) == [str(n) for n in range(ROUNDS + 1)]
    assert "loss" in final["rounds"]["0"]["train"]
    assert final["started_at"] <= final["ended_at"]


def test_redis_killed_mid_run_the_collaborator_finishes_and_is_written_when_back(
    alice: Alice, redis_server: RedisServer, certs: CertsLayout
) -> None:
    """Redis killed while alice runs: she finishes; her final state is in Redis once it is back."""
    plan = write_plan(alice.folder / "federation", certs, ROUNDS, connection=PATIENT)
    federation = FederationProcesses(plan, alice.folder / "federation")
    try:
        federation.start("aggregator")
        own = alice.api.post("/api/collaborators", json={"plan_path": str(plan)}).json()["uuid"]
        client = redis_server.client()
        wait_until(
            "alice started, in Redis",
            lambda: (v := client.get(own)) and json.loads(v)["state"] == "started",
        )
        redis_server.kill()
        for name in ("bob", "carol"):
            federation.start(name)
        codes = federation.wait_all(FEDERATION_SECONDS)
        assert codes == {"aggregator": 0, "bob": 0, "carol": 0}, federation.output()
    finally:
        federation.stop_all()
    ended = wait_until(
        "alice to exit", lambda: (d := detail(alice.api, own))["state"] == "exited" and d
    )
    assert ended["exit_code"] == 0
    wait_until("the failure logged", lambda: "training goes on" in alice.envoy.text())
    redis_server.start()
    client = redis_server.client()
    stored = wait_until(
        "alice's final state in Redis", lambda: (v := client.get(own)) and json.loads(v)
    )
    assert (stored["state"], stored["exit_code"]) == ("exited", 0)
    assert list(stored["rounds"]) == [str(n) for n in range(ROUNDS + 1)]
