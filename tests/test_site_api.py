"""The envoy's site API with a real HTTP client (httpx) against the real uvicorn serving it.

In-process: a `Site` on a real state folder behind a `SiteApiServer` on 127.0.0.1 (no envoy
loop runs, so nothing kept is launched). Processes: real `envoy start` with `site_api` on, a
collaborator POSTed to it working for a real `aggregator start` beside bob and carol, the envoy
killed with SIGKILL mid-federation. Every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from foedus.envoy.cli import main as envoy_main
from foedus.envoy.config import ConfigError, load_config
from foedus.envoy.progress import ProgressBook
from foedus.envoy.site import Site
from foedus.envoy.site_api import (
    TOKEN_FILE,
    SiteApiContext,
    SiteApiServer,
    TokenError,
    create_app,
    ensure_token,
)
from foedus.envoy.site_plan import write_site_settings
from foedus.envoy.state import SITE, EnvoyState
from foedus.lifecycle.orders import StartOrder, Work
from foedus.lifecycle.states import CollaboratorState
from foedus.pki.layout import CertsLayout
from foedus.plans.site_settings import load_site_settings

from directors import alias_bomb_plan
from envoys import (
    WAIT_SECONDS,
    EnvoyProcess,
    RecordingDirector,
    stop_collaborators,
    write_envoy_config,
)
from federation_processes import FederationProcesses, free_port, write_plan
from servers import plan_document

S = CollaboratorState
ROUNDS = 3
PATIENT = {"max_retries": 200, "max_wait_seconds": 90}
FEDERATION_SECONDS = 240


@dataclass
class Api:
    """An in-process site API: `client` sends the token, `url` is where it serves."""

    client: httpx.Client
    site: Site
    state: EnvoyState
    token: str
    url: str
    server: SiteApiServer


@pytest.fixture
def api(certs: CertsLayout, tmp_path: Path) -> Iterator[Api]:
    """alice's site (review: manual) behind the site API on a port of 127.0.0.1."""
    config = load_config(write_envoy_config(tmp_path, certs, free_port(), review="manual"))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    site = Site("alice", config, state)
    token = ensure_token(config.state_dir / TOKEN_FILE)
    context = SiteApiContext(site, token, "9.9.9", lambda: "connecting", ProgressBook())
    server = SiteApiServer(create_app(context), "127.0.0.1", 0)
    port = server.start()
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    try:
        yield Api(client, site, state, token, url, server)
    finally:
        client.close()
        server.stop()
        state.close()


def plan_yaml(certs: CertsLayout, **sections: Any) -> str:
    """A plan naming alice among its collaborators."""
    return yaml.safe_dump(plan_document(certs, **sections))


def error_of(response: httpx.Response, code: int) -> str:
    """The `{"error": ...}` message of a response that must have status `code`."""
    assert response.status_code == code, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return str(body["error"])


# -- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/connect"),
        ("GET", "/api/collaborators"),
        ("POST", "/api/collaborators"),
        ("GET", "/api/collaborators/x/log"),
        ("POST", "/api/experiments/x/approve"),
        ("GET", "/api/docs"),
        ("GET", "/api/openapi.json"),
        ("GET", "/not/a/path"),
    ],
)
def test_every_request_needs_the_token(api: Api, method: str, path: str) -> None:
    """No token, a wrong one, or another scheme: 401 with {"error"}, the docs page included."""
    for headers in (
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": f"Bearer {api.token}x"},
        {"Authorization": f"Basic {api.token}"},
        {"Authorization": api.token},
    ):
        with httpx.Client(base_url=api.url, timeout=30) as anonymous:
            response = anonymous.request(method, path, headers=headers, json={"plan": "x"})
        assert "bearer token" in error_of(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    assert api.state.experiments() == []


def test_with_the_token_connect_docs_and_schema_answer(api: Api) -> None:
    """The token opens connect (name, director, version), the OpenAPI page and its schema."""
    assert api.client.get("/api/connect").json() == {
        "status": "ok",
        "name": "alice",
        "director": {"target": api.site.config.director_target, "state": "connecting"},
        "version": "9.9.9",
    }
    docs = api.client.get("/api/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = api.client.get("/api/openapi.json").json()
    assert {
        "/api/connect",
        "/api/collaborators",
        "/api/collaborators/{uuid}",
        "/api/collaborators/{uuid}/log",
        "/api/collaborators/{uuid}/stop",
        "/api/experiments/{experiment_id}/approve",
        "/api/experiments/{experiment_id}/reject",
    } <= set(schema["paths"])


def test_unknown_path_with_the_token_is_404_as_error(api: Api) -> None:
    """A path that does not exist: 404, still {"error"}."""
    error_of(api.client.get("/api/nowhere"), 404)
    error_of(api.client.delete("/api/connect"), 405)


def test_token_file_is_made_private_and_kept(tmp_path: Path) -> None:
    """The token is made 0600, read again unchanged, and refused once others can read it."""
    path = tmp_path / TOKEN_FILE
    token = ensure_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 32
    assert ensure_token(path) == token
    path.chmod(0o640)
    with pytest.raises(TokenError, match=r"readable by others .*chmod 600"):
        ensure_token(path)
    path.chmod(0o600)
    path.write_text("short\n", encoding="ascii")
    with pytest.raises(TokenError, match="at least 16"):
        ensure_token(path)


def test_a_token_made_at_once_by_many_is_one_token(tmp_path: Path) -> None:
    """Envoys starting together make one token, whole, and all read it; nothing is left beside it."""
    path = tmp_path / TOKEN_FILE
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        tokens = list(pool.map(lambda _: ensure_token(path), range(8)))
    assert len(set(tokens)) == 1 and len(tokens[0]) >= 32
    assert path.read_text(encoding="ascii") == tokens[0] + "\n"
    assert [entry.name for entry in tmp_path.iterdir()] == [TOKEN_FILE]


# -- starting a collaborator --------------------------------------------------------------------


def test_bad_input_starts_nothing(api: Api, certs: CertsLayout, tmp_path: Path) -> None:
    """Every malformed request is 400 or 422 with {"error"}; no collaborator is kept or written."""
    not_allowed = plan_yaml(certs, runner={"name": "other_runner", "seed": 0})
    not_listed = plan_yaml(certs, collaborators=["bob", "carol"])
    bad_key = plan_yaml(certs, federation={"rounds": 0})
    unknown_section = yaml.safe_dump({**plan_document(certs), "extra": {}})
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe")
    cases: list[tuple[object, int, str]] = [
        ({"plan": "federation: [unclosed"}, 400, "not valid YAML"),
        ({"plan": "- a list"}, 400, "mapping of plan sections"),
        ({"plan": not_allowed}, 400, "runner 'other_runner' is not one this site agreed to"),
        ({"plan": not_listed}, 400, "'alice' is not listed"),
        ({"plan": bad_key}, 400, "federation.rounds"),
        ({"plan": unknown_section}, 400, "extra"),
        ({}, 400, "exactly one of 'plan'"),
        ({"plan": "x", "plan_path": "/x"}, 400, "exactly one of 'plan'"),
        ({"plan_path": "relative.yaml"}, 400, "absolute path"),
        ({"plan_path": str(tmp_path / "absent.yaml")}, 400, "cannot read the plan"),
        ({"plan_path": str(tmp_path / "binary.yaml")}, 400, "not UTF-8"),
        ({"plan": 42}, 422, "body.plan"),
        ({"plan": plan_yaml(certs), "surprise": 1}, 422, "body.surprise"),
        ({"plan": plan_yaml(certs), "runner_settings": ["a"]}, 422, "body.runner_settings"),
        ([1, 2], 422, "body"),
    ]
    for body, code, fragment in cases:
        message = error_of(api.client.post("/api/collaborators", json=body), code)
        assert fragment in message, (body, message)
    not_json = api.client.post(
        "/api/collaborators", content=b"{", headers={"Content-Type": "application/json"}
    )
    error_of(not_json, 422)
    huge = api.client.post("/api/collaborators", json={"plan": "#" * (3 * 1024 * 1024)})
    error_of(huge, 413)
    chunked = api.client.post(
        "/api/collaborators",
        content=iter([b'{"plan": "', b"#" * (3 * 1024 * 1024), b'"}']),
        headers={"Content-Type": "application/json"},
    )
    assert "Content-Length" in error_of(chunked, 411)
    assert api.state.experiments() == []
    assert not (api.site.config.state_dir / "experiments").exists()
    assert api.client.get("/api/collaborators").json() == {"collaborators": []}


def test_a_plan_path_that_is_no_regular_file_is_refused_unread(api: Api, tmp_path: Path) -> None:
    """A FIFO, a directory, a device, a file over 1 MiB: 400 at once, nothing read or kept; 41
    requests naming a FIFO at once are all answered, and then a plan is still accepted."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    with big.open("wb") as file:
        file.truncate(1024 * 1024 + 1)  # sparse: over the limit without writing it
    cases = [
        (fifo, "not a regular file (a FIFO)"),
        (tmp_path, "not a regular file (a directory)"),
        (Path("/dev/zero"), "not a regular file (a character device)"),
        (big, f"the plan is over {1024 * 1024} bytes"),
    ]
    for path, fragment in cases:
        message = error_of(
            api.client.post("/api/collaborators", json={"plan_path": str(path)}), 400
        )
        assert message == f"'{path}': {fragment}" + (
            "; plan_path names a plan file" if "regular" in fragment else ""
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=41) as pool:
        answers = list(
            pool.map(
                lambda _: api.client.post(
                    "/api/collaborators", json={"plan_path": str(fifo)}, timeout=20
                ),
                range(41),
            )
        )
    assert [answer.status_code for answer in answers] == [400] * 41
    assert api.client.get("/api/connect", timeout=20).status_code == 200
    assert api.state.experiments() == []


def test_a_plan_path_error_names_keys_never_the_files_values(
    api: Api, certs: CertsLayout, tmp_path: Path
) -> None:
    """A file that is no plan, named by plan_path: 400 naming keys and problems, quoting nothing
    of it; the same text sent as `plan` is quoted (cut), as its sender wrote it."""
    secret = "s3cr3t-Zq8"
    texts = [
        plan_yaml(certs, federation={"rounds": secret}),
        plan_yaml(certs, collaborators=["alice", f"{secret}!"]),
        plan_yaml(certs, tasks=["train", secret]),
        plan_yaml(certs) + f"extra: !{secret} x\n",
    ]
    for number, text in enumerate(texts):
        path = tmp_path / f"not_a_plan_{number}.yaml"
        path.write_text(text, encoding="utf-8")
        message = error_of(
            api.client.post("/api/collaborators", json={"plan_path": str(path)}), 400
        )
        assert secret not in message, message
        assert "(a value of the file, not shown)" in message or "'...'" in message, message
        quoted = error_of(api.client.post("/api/collaborators", json={"plan": text}), 400)
        assert secret in quoted, quoted
    assert api.state.experiments() == []


def test_an_alias_bomb_in_runner_settings_is_refused(api: Api, certs: CertsLayout) -> None:
    """A plan whose runner.settings unfold into 10**9 strings by aliases: 400, nothing kept."""
    message = error_of(
        api.client.post("/api/collaborators", json={"plan": alias_bomb_plan(plan_document(certs))}),
        400,
    )
    assert message.endswith(
        "not valid YAML: YAML aliases (*name) are not accepted: write the value out"
    )
    assert api.state.experiments() == []


def test_a_started_collaborator_is_kept_for_the_site_never_the_director(
    api: Api, certs: CertsLayout, tmp_path: Path
) -> None:
    """A POSTed plan (text or path) is kept approved, with the request's settings (kept apart
    from the plan, as the site's own: a privacy cap too), not reported."""
    own = {"epochs": 3, "dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "max_epsilon": 8}}
    answer = api.client.post(
        "/api/collaborators",
        json={"plan": plan_yaml(certs), "runner_settings": own, "name": "mine"},
    )
    assert answer.status_code == 201, answer.text
    own_id = answer.json()["uuid"]
    path = tmp_path / "plan.yaml"
    path.write_text(plan_yaml(certs), encoding="utf-8")
    by_path = api.client.post("/api/collaborators", json={"plan_path": str(path)})
    assert by_path.status_code == 201, by_path.text
    other = by_path.json()["uuid"]
    assert own_id != other
    experiment = api.state.experiment(own_id)
    assert (experiment.state, experiment.origin, experiment.name) == (S.SITE_APPROVED, SITE, "mine")
    assert "dp_sgd" not in yaml.safe_load(experiment.plan_yaml)["runner"].get("settings", {})
    settings = write_site_settings(api.site.config, api.site.folder(own_id))
    assert settings is not None and dict(load_site_settings(settings)) == own  # --site-settings
    assert api.state.experiment(other).name == "test"  # the plan's federation.name
    assert api.site.unreported() == [] and api.site.reports() == []
    detail = api.client.get(f"/api/collaborators/{own_id}").json()
    assert detail["uuid"] == own_id
    assert (detail["state"], detail["origin"], detail["exit_code"], detail["round"]) == (
        "site_approved",
        "site",
        None,
        None,
    )
    listed = [c["uuid"] for c in api.client.get("/api/collaborators").json()["collaborators"]]
    assert listed == [own_id, other]


# -- watching, stopping, reviewing --------------------------------------------------------------


def test_unknown_uuid_is_404(api: Api) -> None:
    """Every endpoint of one collaborator or experiment answers 404 for an id it does not know."""
    for method, path in (
        ("GET", "/api/collaborators/nope"),
        ("GET", "/api/collaborators/nope/log?tail=5"),
        ("POST", "/api/collaborators/nope/stop"),
        ("POST", "/api/experiments/nope/approve"),
        ("POST", "/api/experiments/nope/reject"),
    ):
        assert "'nope'" in error_of(api.client.request(method, path), 404)
        long = path.replace("nope", "n" * 10_000)
        assert len(error_of(api.client.request(method, long), 404)) < 200, long[:40]


def test_round_metrics_and_log_tail_come_from_the_collaborators_log(
    api: Api, certs: CertsLayout
) -> None:
    """The round and last metrics are read from the log's task lines; tail=N is its last N lines."""
    own = api.client.post("/api/collaborators", json={"plan": plan_yaml(certs)}).json()["uuid"]
    folder = api.site.folder(own)
    folder.mkdir(parents=True)
    lines = [
        "2026-12-04 10:00:00,000 INFO foedus.collaborator.cli: collaborator alice of federation x",
        "2026-12-04 10:00:01,000 INFO foedus.collaborator.loop: round 0: train on 100 samples: "
        "loss=0.5000 accuracy=0.8000",
        "2026-12-04 10:00:02,000 INFO foedus.collaborator.loop: round 1: aggregated_model_validation "
        "on 30 samples: accuracy=0.9000",
    ]
    (folder / "collaborator.log").write_text("\n".join(lines) + "\n", encoding="utf-8")
    detail = api.client.get(f"/api/collaborators/{own}").json()
    assert detail["round"] == 1
    assert detail["last_metrics"] == {"aggregated_model_validation": {"accuracy": 0.9}}
    assert detail["rounds"]["0"] == {"train": {"loss": 0.5, "accuracy": 0.8}}
    assert detail["started_at"] is not None and detail["federation_finished"] is False
    tail = api.client.get(f"/api/collaborators/{own}/log", params={"tail": 2})
    assert tail.status_code == 200 and tail.text == "\n".join(lines[1:]) + "\n"
    for bad in ("0", "-1", "10001", "x"):
        assert "query.tail" in error_of(
            api.client.get(f"/api/collaborators/{own}/log", params={"tail": bad}), 422
        )


def test_stop_of_a_finished_collaborator_is_409(api: Api, certs: CertsLayout) -> None:
    """A collaborator still to run can be stopped (202); one that has ended cannot (409)."""
    first = api.client.post("/api/collaborators", json={"plan": plan_yaml(certs)}).json()["uuid"]
    stopped = api.client.post(f"/api/collaborators/{first}/stop")
    assert stopped.status_code == 202 and stopped.json()["stopping"] is True
    assert api.state.experiment(first).stopping
    second = api.client.post("/api/collaborators", json={"plan": plan_yaml(certs)}).json()["uuid"]
    api.state.transition(second, S.STARTED, pid=None)
    api.state.transition(second, S.EXITED, exit_code=0)
    assert "already ended" in error_of(api.client.post(f"/api/collaborators/{second}/stop"), 409)
    assert not api.state.experiment(second).stopping


def test_director_experiments_are_listed_and_reviewed(api: Api, certs: CertsLayout) -> None:
    """A director's experiment waiting for review is listed, approved or rejected once (409 after)."""
    for experiment_id in ("e-1", "e-2"):
        api.site.receive(
            Work(start=(StartOrder(experiment_id, "digits", "dora", plan_yaml(certs), "alice"),))
        )
    listed = api.client.get("/api/collaborators").json()["collaborators"]
    assert [(c["uuid"], c["origin"], c["state"]) for c in listed] == [
        ("e-1", "director", "approval_pending"),
        ("e-2", "director", "approval_pending"),
    ]
    approved = api.client.post("/api/experiments/e-1/approve", json={"reason": "ethics ok"})
    assert approved.json() == {"experiment": "e-1", "state": "site_approved"}
    assert api.state.experiment("e-1").reason == "ethics ok"
    rejected = api.client.post("/api/experiments/e-2/reject")
    assert rejected.json() == {"experiment": "e-2", "state": "site_rejected"}
    assert "only one waiting for approval" in error_of(
        api.client.post("/api/experiments/e-1/reject"), 409
    )
    error_of(api.client.post("/api/experiments/e-1/approve", json={"reason": 5}), 422)
    states = [r.state for r in api.site.unreported() if r.experiment_id in ("e-1", "e-2")]
    assert states == [S.APPROVAL_PENDING, S.APPROVAL_PENDING, S.SITE_APPROVED, S.SITE_REJECTED]


def test_server_stops_and_frees_its_port(api: Api) -> None:
    """`stop` ends serving: the port refuses connections afterwards."""
    api.server.stop()
    with pytest.raises(httpx.ConnectError):
        api.client.get("/api/connect")


# -- a real envoy, a real federation ------------------------------------------------------------


@dataclass
class Envoy:
    """alice's envoy process with its site API, and a director recording what it hears."""

    director: RecordingDirector
    envoy: EnvoyProcess
    state_dir: Path
    port: int

    def client(self) -> httpx.Client:
        """A client with the token, once the envoy has made it."""
        token_file = self.state_dir / TOKEN_FILE
        wait_until("the token file", lambda: token_file.exists() or None)
        token = token_file.read_text(encoding="ascii").strip()
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    """Poll `check` until truthy (its value); fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def envoy(certs: CertsLayout, tmp_path: Path) -> Iterator[Envoy]:
    """`envoy start` for alice with its site API on, a recording director serving."""
    director = RecordingDirector(certs, free_port())
    director.start()
    port = free_port()
    config = write_envoy_config(
        tmp_path / "alice", certs, director.port, site_api={"enabled": True, "port": port}
    )
    process = EnvoyProcess("alice", config, tmp_path / "alice" / "envoy.log")
    process.start()
    state_dir = tmp_path / "alice" / "state"
    try:
        yield Envoy(director, process, state_dir, port)
    finally:
        if process.alive():
            process.terminate()
        stop_collaborators(state_dir)
        director.stop()


def detail(client: httpx.Client, own: str) -> dict[str, Any]:
    """GET one collaborator, which must answer 200."""
    response = client.get(f"/api/collaborators/{own}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_posted_collaborator_runs_a_federation_and_outlives_kill_9(
    envoy: Envoy, certs: CertsLayout, tmp_path: Path
) -> None:
    """POSTed, alice's collaborator works for a real aggregator through an envoy kill -9 to the end."""
    plan = write_plan(tmp_path / "federation", certs, ROUNDS, connection=PATIENT)
    federation = FederationProcesses(plan, tmp_path / "federation")
    try:
        federation.start("aggregator")
        with envoy.client() as client:
            wait_until("connect", lambda: client.get("/api/connect").status_code == 200)
            answer = client.post("/api/collaborators", json={"plan_path": str(plan)})
            assert answer.status_code == 201, answer.text
            own = answer.json()["uuid"]
            wait_until(
                "alice working for the aggregator",
                lambda: (
                    "working for the aggregator" in client.get(f"/api/collaborators/{own}/log").text
                ),
            )
            envoy.envoy.kill()
            envoy.envoy.start()
            wait_until("alice adopted", lambda: detail(client, own)["state"] == "running")
            for name in ("bob", "carol"):
                federation.start(name)
            codes = federation.wait_all(FEDERATION_SECONDS)
            assert codes == {"aggregator": 0, "bob": 0, "carol": 0}, federation.output()
            ended = wait_until(
                "alice to exit",
                lambda: (d := detail(client, own))["state"] == "exited" and d,
            )
            assert ended["exit_code"] == 0 and ended["federation_finished"] is True
            # Rounds 0 to ROUNDS-1 train; round ROUNDS validates the final model only.
            assert ended["round"] == ROUNDS
            assert list(ended["rounds"]) == [str(n) for n in range(ROUNDS + 1)]
            assert set(ended["rounds"]["0"]) == {
                "aggregated_model_validation",
                "train",
                "locally_tuned_model_validation",
            }
            assert "loss" in ended["rounds"]["0"]["train"]
            assert set(ended["last_metrics"]) == {"aggregated_model_validation"}
            assert ended["started_at"] <= ended["ended_at"]
            assert "already ended" in error_of(client.post(f"/api/collaborators/{own}/stop"), 409)
            listed = client.get("/api/collaborators").json()["collaborators"]
            assert [c["uuid"] for c in listed] == [own]
            assert envoy.envoy.terminate() == 0
            with pytest.raises(httpx.ConnectError):
                client.get("/api/connect")
    finally:
        federation.stop_all()
    assert all(r.experiment_id != own for _, r in envoy.director.records.reports)
    assert envoy.director.records.heartbeats
    assert all(not beat.collaborators for _, beat in envoy.director.records.heartbeats), (
        "the site's own collaborator was listed to the director"
    )


def test_stopping_a_running_collaborator(envoy: Envoy, certs: CertsLayout, tmp_path: Path) -> None:
    """A collaborator waiting for an aggregator that never comes is stopped: the site gave it up
    (with its exit code and why), then 409."""
    plan = write_plan(tmp_path / "federation", certs, ROUNDS, connection=PATIENT)
    with envoy.client() as client:
        wait_until("connect", lambda: client.get("/api/connect").status_code == 200)
        connect = client.get("/api/connect").json()
        assert connect["name"] == "alice" and connect["director"]["state"] in (
            "connected",
            "connecting",
        )
        own = client.post("/api/collaborators", json={"plan_path": str(plan)}).json()["uuid"]
        wait_until("alice started", lambda: detail(client, own)["state"] == "started")
        stopped = client.post(f"/api/collaborators/{own}/stop")
        assert stopped.status_code == 202, stopped.text
        ended = wait_until("alice stopped", lambda: (d := detail(client, own))["done"] and d)
        assert ended["state"] == "gave_up" and ended["exit_code"] != 0, ended
        assert ended["reason"].startswith("stopped by the site's operator; "), ended
        error_of(client.post(f"/api/collaborators/{own}/stop"), 409)
    assert os.path.exists(envoy.state_dir / "experiments" / own / "collaborator.log")


def test_config_site_api_and_metrics(tmp_path: Path, certs: CertsLayout) -> None:
    """site_api is off on 127.0.0.1:8780 by default; bad values are named with their key."""
    config = load_config(write_envoy_config(tmp_path, certs, free_port()))
    assert (config.site_api.enabled, config.site_api.host, config.site_api.port) == (
        False,
        "127.0.0.1",
        8780,
    )
    assert config.metrics.redis_url == ""
    path = write_envoy_config(
        tmp_path,
        certs,
        free_port(),
        site_api={"enabled": "yes", "port": 0, "hots": "x"},
        metrics={"redis_url": "http://localhost"},
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems == [
        f"{path}: site_api.enabled: expected true or false, got 'yes'",
        f"{path}: site_api.port: expected an integer 1-65535, got 0",
        f"{path}: site_api.hots: unknown key",
        f'{path}: metrics.redis_url: expected a redis:// or rediss:// URL (or "" for none), '
        "got 'http://localhost'",
    ]


def test_cli_start_refuses_an_unsafe_token_and_a_taken_port(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token others can read: exit 2 naming it; the API's port taken: exit 1 naming it."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        config = write_envoy_config(
            tmp_path, certs, free_port(), site_api={"enabled": True, "port": port}
        )
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        token = state_dir / TOKEN_FILE
        token.write_text("a" * 40, encoding="ascii")
        token.chmod(0o644)
        assert envoy_main(["start", "-n", "alice", "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"envoy: error: {token}: the site API's token is readable by others (mode 644); "
            "chmod 600 it"
        ]
        token.chmod(0o600)
        assert envoy_main(["start", "-n", "alice", "--config", str(config)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (
            f"envoy: error: site_api: cannot listen on 127.0.0.1:{port}: Address already in use"
        )
    finally:
        taken.close()
