"""The director's dashboard and metrics over real HTTPS and HTTP: who sees what, and what they see."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from foedus.director import cli
from foedus.director.dashboard import metric_series
from foedus.director.folders import OUTPUT
from foedus.director.launcher import LOG_FILE
from foedus.director.server import DirectorServer
from foedus.director.tokens import TOKENS_FILE, TokenStore
from foedus.history.rows import METRICS
from foedus.pki.layout import CertsLayout
from foedus.plans.director_config import ConfigError, load_config
from foedus.plans.schema import Address
from foedus.privacy.accountant import epsilon_after
from foedus.privacy.site_budget import SiteBudget
from foedus.protos import director_pb2 as pb
from foedus.serving.server import ServerError

from directors import (
    ADMIN,
    ENVOYS,
    OUTSIDER,
    Director,
    RecordingLauncher,
    eventually,
    running_director,
    submitted_plan,
    write_config,
)

TIMEOUT = 20
WAIT_SECONDS = 30


@pytest.fixture
def director(tmp_path: Path, director_certs: CertsLayout) -> Iterator[Director]:
    """A director with its dashboard and metrics on loopback, one running place, envoys registered."""
    with running_director(
        tmp_path,
        director_certs,
        dashboard={"address": "127.0.0.1:0"},
        metrics_address="127.0.0.1:0",
        max_running_experiments=1,
        # The envoys register once and never beat: online for 20 minutes, not 2 s, however slow
        # the machine is between their registration and a test's look.
        health_check_seconds=600,
    ) as running:
        for name in ENVOYS:
            running.stub(name, role="envoy").RegisterEnvoy(
                pb.RegisterEnvoyRequest(
                    shard=pb.ShardInfo(
                        description=f"{name}'s digits", train_samples=100, valid_samples=20
                    )
                ),
                timeout=TIMEOUT,
            )
        yield running


def token(director: Director, name: str) -> str:
    """A dashboard token for `name`, issued as `director dashboard-token` does."""
    return TokenStore(director.server.config.state_dir).issue(name)


def request(
    director: Director,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request to the dashboard, checking its certificate against our CA as 'localhost'."""
    context = ssl.create_default_context(cafile=str(director.certs.ca_bundle))
    assert director.server.dashboard is not None
    connection = http.client.HTTPSConnection(
        "localhost", director.server.dashboard.port, context=context, timeout=TIMEOUT
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def get_json(director: Director, path: str, secret: str) -> tuple[int, Any]:
    """GET an API path with a bearer token; the status and the decoded body."""
    status, _, body = request(director, "GET", path, headers={"Authorization": f"Bearer {secret}"})
    return status, json.loads(body)


def submit(director: Director, name: str, **plan: Any) -> str:
    """Submit plans/local.yaml (changed by `plan`) as `name`; the experiment's id."""
    text = yaml.safe_dump(submitted_plan(**plan))
    return (
        director.stub(name)
        .SubmitExperiment(iter([pb.SubmitChunk(plan_yaml=text)]), timeout=TIMEOUT)
        .experiment_id
    )


def test_nothing_is_shown_without_a_valid_token(director: Director) -> None:
    """No token, an unknown one, a malformed header: the API says 401, the pages send to /login."""
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic YTpi"}):
        status, _, body = request(director, "GET", "/api/experiments", headers=headers)
        assert status == 401, headers
        assert "error" in json.loads(body)
    for path in ("/", "/experiments/anything"):
        status, headers, _ = request(director, "GET", path)
        assert (status, headers["location"]) == (303, "/login"), path
    status, _, body = request(director, "GET", "/login")
    assert status == 200 and b"Dashboard token" in body


def test_only_people_the_director_knows_get_in(director: Director) -> None:
    """A token for an envoy's name, or for a person no longer in director.yaml: 403 and why."""
    for name in (ENVOYS[0], OUTSIDER):
        status, body = get_json(director, "/api/experiments", token(director, name))
        assert status == 403, name
        assert repr(name) in body["error"]


def test_a_user_sees_only_their_own_experiments_an_admin_all(director: Director) -> None:
    """ada sees hers and is refused bea's; root sees both; an unknown id is 404."""
    mine = submit(director, "ada")
    theirs = submit(director, "bea")
    ada, root = token(director, "ada"), token(director, ADMIN)

    def listed(secret: str) -> list[str]:
        status, body = get_json(director, "/api/experiments", secret)
        assert status == 200
        return [e["id"] for e in body["experiments"]]

    assert listed(ada) == [mine]
    assert listed(root) == [theirs, mine]  # newest first
    status, body = get_json(director, f"/api/experiments/{theirs}", ada)
    assert status == 403 and "belongs to another user" in body["error"]
    assert get_json(director, f"/api/experiments/{theirs}", root)[0] == 200
    status, body = get_json(director, "/api/experiments/no-such-id", root)
    assert status == 400 and "experiment_id: 'no-such-id' is not an id" in body["error"]
    unknown = "00000000-0000-4000-8000-000000000000"
    status, body = get_json(director, f"/api/experiments/{unknown}", root)
    assert status == 404 and unknown in body["error"]
    status, body = get_json(director, f"/api/experiments/{'x' * 20_000}", root)
    assert status == 400 and len(body["error"]) < 200


def test_logging_in_sets_a_secure_cookie_that_opens_the_pages(director: Director) -> None:
    """POST /api/session: a bad body 400, an unknown token 401, a good one an HttpOnly, Secure,
    SameSite=Strict cookie with which the pages and the API answer."""
    post = {"Content-Type": "application/json"}
    for body, expected in (
        (b"not json", 400),
        (b'{"token": 3}', 400),
        (b'{"token": "x"}', 401),
        (b'{"token": "' + b"x" * 5000 + b'"}', 413),
    ):
        status, _, answer = request(director, "POST", "/api/session", headers=post, body=body)
        assert status == expected, body
        assert "error" in json.loads(answer)
    secret = token(director, "bea")
    body = json.dumps({"token": secret}).encode()
    status, headers, answer = request(director, "POST", "/api/session", headers=post, body=body)
    assert (status, json.loads(answer)) == (200, {"name": "bea", "role": "user"})
    cookie = headers["set-cookie"]
    assert all(part in cookie for part in ("HttpOnly", "Secure", "SameSite=strict")), cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    status, headers, page = request(director, "GET", "/", headers=session)
    assert status == 200 and b"Experiments" in page
    assert "default-src 'self'" in headers["content-security-policy"]
    status, _, me = request(director, "GET", "/api/me", headers=session)
    assert (status, json.loads(me)) == (200, {"name": "bea", "role": "user"})


def test_a_revoked_token_no_longer_opens_anything(director: Director) -> None:
    """Issuing a new token replaces the old; revoking removes it at once."""
    store = TokenStore(director.server.config.state_dir)
    old = store.issue("ada")
    new = store.issue("ada")
    assert get_json(director, "/api/me", old)[0] == 401
    assert get_json(director, "/api/me", new) == (200, {"name": "ada", "role": "user"})
    assert store.revoke("ada")
    assert get_json(director, "/api/me", new)[0] == 401
    assert (director.server.config.state_dir / TOKENS_FILE).stat().st_mode & 0o777 == 0o600


def test_an_experiment_shows_progress_charts_sites_and_its_log(director: Director) -> None:
    """The running experiment's rounds, one chart per metric from metrics.jsonl with the mean's
    line and each site's, its sites online and its log's last lines."""
    experiment_id = submit(director, "ada", federation={"rounds": 5})
    eventually(
        lambda: director.server.state.experiment(experiment_id).state.value == "waiting",
        "the experiment to take its running place",
    )
    output = director.server.service.folders.folder(experiment_id) / OUTPUT
    output.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "round": number,
            "final_validation": False,
            "metrics": {
                "aggregated_model_validation": {"accuracy": 0.1 * number},
                "train": {"loss": 1.0 / (number + 1)},
            },
            "sites": {
                "bob": {"train": {"loss": 2.0 / (number + 1)}},
                "alice": {
                    "aggregated_model_validation": {"accuracy": 0.2 * number},
                    "train": {"loss": 0.5 / (number + 1)},
                },
            },
        }
        for number in range(2)
    ]
    rows[1]["sites"]["mallory"] = {"train": {"loss": "high", "flag": True}, "x": 3}  # skipped
    (output / METRICS).write_text(
        "".join(json.dumps(row) + "\n" for row in rows) + '{"round": 2, "metr', encoding="utf-8"
    )
    log = director.server.service.folders.folder(experiment_id) / LOG_FILE
    log.write_text("".join(f"line {n}\n" for n in range(100)), encoding="utf-8")
    status, body = get_json(director, f"/api/experiments/{experiment_id}", token(director, "ada"))
    assert status == 200
    assert (body["state"], body["rounds_completed"], body["rounds"]) == ("waiting", 2, 5)
    assert [(s["site"], s["online"]) for s in body["sites"]] == [(n, True) for n in ENVOYS]
    amv = "aggregated_model_validation"
    assert body["charts"] == [
        {
            "metric": "accuracy",
            "lines": [
                {
                    "task": amv,
                    "site": None,
                    "label": "global model",
                    "points": [[0, 0.0], [1, 0.1]],
                },
                {"task": amv, "site": "alice", "label": "alice", "points": [[0, 0.0], [1, 0.2]]},
            ],
        },
        {
            "metric": "loss",
            "lines": [
                {
                    "task": "train",
                    "site": None,
                    "label": "sites' training (mean)",
                    "points": [[1, 1.0], [2, 0.5]],
                },
                {
                    "task": "train",
                    "site": "alice",
                    "label": "alice",
                    "points": [[1, 0.5], [2, 0.25]],
                },
                {"task": "train", "site": "bob", "label": "bob", "points": [[1, 2.0], [2, 1.0]]},
            ],
        },
    ]
    assert body["log_tail"] == [f"line {n}" for n in range(60, 100)]
    assert body["secure"] is False and body["secure_rounds"] == []
    assert body["privacy"] is None and body["site_budgets"] == []


def test_a_secure_experiment_shows_each_rounds_steps_and_dropouts(director: Director) -> None:
    """A plan with secure aggregation: listed and shown as secure, with each secure round's
    steps (time, who dropped out in which) and why a round closed untrained; its page has the
    table the script fills."""
    experiment_id = submit(
        director, "ada", federation={"rounds": 3}, secure_aggregation={"enabled": True}
    )
    output = director.server.service.folders.folder(experiment_id) / OUTPUT
    output.mkdir(parents=True, exist_ok=True)
    steps = [
        {"stage": "KEYS", "seconds": 0.4, "dropped": []},
        {"stage": "SHARES", "seconds": None, "dropped": ["carol"]},
    ]
    why = "round 1's SHARES stage closed with 1 site(s) (alice), fewer than the threshold of 2"
    rows = [
        {"round": 0, "secure": True, "stages": steps[:1], "untrained": ""},
        {"round": 1, "secure": True, "stages": steps, "untrained": why},
        {"round": 2, "secure": True, "stages": "KEYS", "untrained": 7},
        {"round": 3, "final_validation": True, "secure": False, "stages": [], "untrained": ""},
    ]
    (output / METRICS).write_text("".join(json.dumps(row) + "\n" for row in rows), "utf-8")
    secret = token(director, "ada")
    status, body = get_json(director, f"/api/experiments/{experiment_id}", secret)
    assert status == 200 and body["secure"] is True
    assert body["secure_rounds"] == [
        {"round": 1, "stages": steps[:1], "untrained": ""},
        {"round": 2, "stages": steps, "untrained": why},
        {"round": 3, "stages": [], "untrained": ""},  # its parts that are not steps left out
    ]
    status, listed = get_json(director, "/api/experiments", secret)
    assert [(e["id"], e["secure"]) for e in listed["experiments"]] == [(experiment_id, True)]
    headers = {"Authorization": f"Bearer {secret}"}
    status, _, page = request(director, "GET", f"/experiments/{experiment_id}", headers=headers)
    assert status == 200 and b'<table id="secure-rounds">' in page


def test_a_dp_experiment_shows_its_budget_and_is_tagged_in_the_list(director: Director) -> None:
    """A plan with differential privacy and a cap: the API gives its settings, the cap and the
    epsilon its completed rounds spent (the accountant's); the list marks it; its page has the
    budget bar the script fills. Without a cap: `max_epsilon` null, the epsilon still given."""
    privacy = {"enabled": True, "clip": 0.5, "noise_multiplier": 2.0, "max_epsilon": 8}
    experiment_id = submit(director, "ada", federation={"rounds": 20}, differential_privacy=privacy)
    output = director.server.service.folders.folder(experiment_id) / OUTPUT
    output.mkdir(parents=True, exist_ok=True)
    spent = [epsilon_after(rounds, 2.0, 1e-5) for rounds in (1, 2, 3)]
    own = SiteBudget(1.5, 1e-6, 4.0).to_metrics()  # alice's own DP-SGD, beside the federation's
    rows = [
        {"round": r, "dp": {"epsilon": spent[r], "delta": 1e-5}, "sites": {"alice": {"train": own}}}
        for r in range(3)
    ]
    (output / METRICS).write_text("".join(json.dumps(row) + "\n" for row in rows), "utf-8")
    secret = token(director, "ada")
    status, body = get_json(director, f"/api/experiments/{experiment_id}", secret)
    assert status == 200 and (body["rounds"], body["rounds_completed"]) == (9, 3)
    assert body["privacy"] == {
        "clip": 0.5,
        "noise_multiplier": 2.0,
        "delta": 1e-5,
        "max_epsilon": 8.0,
        "epsilon": spent[2],
    }
    assert body["site_budgets"] == [
        {"site": "alice", "round": 3, "epsilon": 1.5, "delta": 1e-6, "max_epsilon": 4.0}
    ]
    status, listed = get_json(director, "/api/experiments", secret)
    assert [e["privacy"]["epsilon"] for e in listed["experiments"]] == [spent[2]]
    assert [e["site_budgets"] for e in listed["experiments"]] == [body["site_budgets"]]
    headers = {"Authorization": f"Bearer {secret}"}
    status, _, page = request(director, "GET", f"/experiments/{experiment_id}", headers=headers)
    assert status == 200 and b'<section id="privacy" hidden>' in page
    assert b'<span id="budget" class="budget" hidden>' in page
    assert b'<table id="site-budgets">' in page
    uncapped = {**privacy, "max_epsilon": None}
    other = submit(director, "ada", federation={"rounds": 2}, differential_privacy=uncapped)
    status, body = get_json(director, f"/api/experiments/{other}", secret)
    assert body["privacy"]["max_epsilon"] is None and body["privacy"]["epsilon"] == 0.0


def test_a_sites_epsilon_is_charted_not_its_delta_nor_its_cap() -> None:
    """A site's DP-SGD epsilon is a chart, a line per site (no mean: the aggregator keeps none);
    its delta and its cap, the same every round, are not charts: its budget's line says them."""
    rows = [
        json.dumps({"round": r, "sites": {"alice": {"train": SiteBudget(e, 1e-5, 8).to_metrics()}}})
        for r, e in enumerate((2.0, 3.0))
    ]
    (chart,) = metric_series(rows)
    assert chart["metric"] == "dp_epsilon"
    assert [(line["site"], line["points"]) for line in chart["lines"]] == [
        ("alice", [[1, 2.0], [2, 3.0]])
    ]


def test_a_chart_of_several_tasks_names_each_sites_task() -> None:
    """Where one metric comes from several tasks, a site's lines say which task each is; rows
    without sites (an aggregator before they were kept) give the means alone."""
    tuned = "locally_tuned_model_validation"
    rows = [
        json.dumps({"round": 0, "metrics": {"aggregated_model_validation": {"accuracy": 0.5}}}),
        json.dumps(
            {
                "round": 1,
                "metrics": {
                    "aggregated_model_validation": {"accuracy": 0.5},
                    tuned: {"accuracy": 0.75},
                },
                "sites": {
                    "alice": {
                        "aggregated_model_validation": {"accuracy": 0.25},
                        tuned: {"accuracy": 1},
                    }
                },
            }
        ),
    ]
    (chart,) = metric_series(rows)
    assert [(line["site"], line["task"], line["label"]) for line in chart["lines"]] == [
        (None, "aggregated_model_validation", "global model"),
        (None, tuned, "sites' tuned models (mean)"),
        ("alice", "aggregated_model_validation", "alice, global model"),
        ("alice", tuned, "alice, tuned model"),
    ]
    assert [line["points"] for line in chart["lines"]] == [
        [[0, 0.5], [1, 0.5]],
        [[2, 0.75]],
        [[1, 0.25]],
        [[2, 1.0]],
    ]


def test_envoys_list_only_the_experiments_the_caller_may_see(director: Director) -> None:
    """/api/envoys: beside each envoy, ada sees her running experiment's id, root too, bea none."""
    mine = submit(director, "ada")  # takes the one running place

    def listed(name: str) -> dict[str, list[str]]:
        status, body = get_json(director, "/api/envoys", token(director, name))
        assert status == 200
        return {envoy["name"]: envoy["experiments"] for envoy in body["envoys"]}

    eventually(
        lambda: listed(ADMIN) == {site: [mine] for site in ENVOYS}, "ada's experiment running"
    )
    assert listed("ada") == {site: [mine] for site in ENVOYS}
    assert listed("bea") == {site: [] for site in ENVOYS}


def test_the_schema_needs_a_token_too(director: Director) -> None:
    """/openapi.json: 401 without a token, as every route; with one, the API's schema."""
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        status, _, body = request(director, "GET", "/openapi.json", headers=headers)
        assert status == 401 and "error" in json.loads(body), headers
    status, body = get_json(director, "/openapi.json", token(director, "ada"))
    assert status == 200 and "/api/envoys" in body["paths"]
    for path in ("/docs", "/redoc"):
        assert request(director, "GET", path)[0] in {303, 404}, path


def test_envoys_are_listed_with_their_shards_and_heartbeats(director: Director) -> None:
    """Every registered envoy: online, its shard, seconds since its last heartbeat."""
    status, body = get_json(director, "/api/envoys", token(director, "bea"))
    assert status == 200
    assert [
        (e["name"], e["online"], e["shard"]["description"], e["shard"]["train_samples"])
        for e in body["envoys"]
    ] == [(name, True, f"{name}'s digits", 100) for name in ENVOYS]
    assert all(0 <= e["seconds_since_heartbeat"] < WAIT_SECONDS for e in body["envoys"])


def scrape(director: Director) -> dict[str, float]:
    """The director's metrics endpoint, as a Prometheus server reads it: sample -> value."""
    assert director.server.metrics is not None
    url = f"http://127.0.0.1:{director.server.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_experiments_by_state_envoys_and_the_queue(director: Director) -> None:
    """Two experiments, one running place: one waiting, one queued; three envoys online."""
    first, second = submit(director, "ada"), submit(director, "bea")
    eventually(
        lambda: director.server.state.experiment(first).aggregator_pid is not None,
        "the first experiment's aggregator to start",
    )
    samples = scrape(director)
    assert samples['foedus_director_experiments{state="waiting"}'] == 1
    assert samples['foedus_director_experiments{state="approved"}'] == 1
    assert samples['foedus_director_experiments{state="completed"}'] == 0
    assert samples["foedus_director_queue_length"] == 1
    assert samples["foedus_director_envoys_registered"] == 3
    assert samples["foedus_director_envoys_online"] == 3
    assert samples["foedus_director_aggregators"] == 1
    assert director.server.state.experiment(second).state.value == "approved"


def test_dashboard_token_cli_issues_and_revokes(
    director: Director, capsys: pytest.CaptureFixture[str]
) -> None:
    """`director dashboard-token` prints a working token; an unknown name is refused (exit 2)."""
    config = str(director.config_path)
    assert cli.main(["dashboard-token", "--config", config, "bea"]) == 0
    secret = capsys.readouterr().out.strip()
    assert get_json(director, "/api/me", secret) == (200, {"name": "bea", "role": "user"})
    assert cli.main(["dashboard-token", "--config", config, "mallory"]) == 2
    assert "'mallory' is in neither" in capsys.readouterr().err
    assert cli.main(["dashboard-token", "--config", config, "--revoke", "bea"]) == 0
    assert get_json(director, "/api/me", secret)[0] == 401


MINIMAL = {"host": "localhost", "certs_dir": "certs", "state_dir": "state", "envoys": ["alice"]}


def test_the_dashboard_and_metrics_are_off_unless_asked_and_on_loopback_by_a_port(
    tmp_path: Path,
) -> None:
    """director.yaml: no dashboard or metrics by default; a port alone listens on 127.0.0.1."""
    path = tmp_path / "director.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    config = load_config(path)
    assert (config.dashboard_address, config.metrics_address) == (None, None)
    path.write_text(
        yaml.safe_dump({**MINIMAL, "dashboard": {"address": 8443}, "metrics_address": "0.0.0.0:9"}),
        encoding="utf-8",
    )
    config = load_config(path)
    assert config.dashboard_address == Address("127.0.0.1", 8443)
    assert config.metrics_address == Address("0.0.0.0", 9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dashboard": {"address": "host:99999"}}, "dashboard.address: expected host:port"),
        ({"dashboard": {"port": 8443}}, "dashboard.port: unknown key"),
        ({"metrics_address": "a b"}, "metrics_address: expected host:port"),
    ],
)
def test_a_bad_dashboard_or_metrics_address_is_named(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """Each bad value is one line naming the file and the key."""
    path = tmp_path / "director.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, **change}), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any(
        problem.startswith(f"{path}: ") and message in problem for problem in raised.value.problems
    ), raised.value.problems


def test_a_dashboard_port_in_use_stops_the_director_naming_the_key(
    tmp_path: Path, director_certs: CertsLayout
) -> None:
    """The dashboard's address taken by another socket: ServerError naming dashboard.address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(
            write_config(tmp_path, director_certs, dashboard={"address": f"127.0.0.1:{port}"})
        )
        server = DirectorServer(config, launcher=RecordingLauncher())
        try:
            with pytest.raises(ServerError, match=r"dashboard\.address: cannot serve on"):
                server.start()
        finally:
            server.stop(0)


def test_director_start_prints_where_its_dashboard_and_metrics_are(
    tmp_path: Path, director_certs: CertsLayout
) -> None:
    """`director start` as a process: its dashboard's URL (the certificate's name) and metrics
    address after the serving line; the URL answers a token issued before it started."""
    config = write_config(
        tmp_path, director_certs, dashboard={"address": 0}, metrics_address="127.0.0.1:0"
    )
    secret = TokenStore(tmp_path / "state").issue(ADMIN)  # before the first start, too
    process = subprocess.Popen(
        [sys.executable, "-m", "foedus.director", "start", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(3)]
        assert lines[0].startswith("director: serving on 127.0.0.1:"), lines
        assert lines[1].startswith("director: dashboard on https://localhost:"), lines
        assert lines[2].startswith("director: metrics on http://127.0.0.1:"), lines
        port = int(lines[1].rsplit(":", 1)[1].rstrip("/"))
        context = ssl.create_default_context(cafile=str(director_certs.ca_bundle))
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=20)
        connection.request("GET", "/api/me", headers={"Authorization": f"Bearer {secret}"})
        answer = connection.getresponse()
        assert (answer.status, json.loads(answer.read())) == (200, {"name": ADMIN, "role": "admin"})
        connection.close()
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
        assert process.stdout is not None
        process.stdout.close()
