"""What leaves a site is the site's decision: a leaky runner at sites of a real director.

A director (its gRPC server, dashboard, real `aggregator start` processes) and two real envoy
processes whose collaborators run `leaky_runner`: it prints a patient record and fails with it
and a site path in its exception. alice shares the defaults: nothing of the record reaches
anything the director, the dashboard or `experiment` can read (every file of the director's
state folder included), while her own collaborator.log has it all. bob shares `logs: all` and
`errors: line`: the record does reach the director (so the search can find it), but his paths
still do not. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from test_dashboard import get_json, token
from test_envoy_with_director import submit, wait_until
from test_experiment_cli import client_config, run

from foedus.director.launcher import LocalLauncher
from foedus.envoy.site import MAX_RESTARTS
from foedus.envoy.state import EnvoyState, SiteExperiment
from foedus.lifecycle.states import CollaboratorState
from foedus.pki.layout import CertsLayout
from foedus.protos import director_pb2 as pb

from directors import ADMIN, Director, running_director
from envoys import EnvoyProcess, stop_envoys, write_envoy_config
from federation_processes import free_port
from leaky_runner import NAME, RECORD, SITE_FILE
from test_director_end_to_end import kill_recorded_aggregators

TESTS = Path(__file__).resolve().parent
SECRETS = (b"Jane Doe", b"1961-02-03", b"MRN 12345")  # bare "12345" may be a pid or a time
CATEGORY = "the collaborator exited with code 1: the task runner failed (ValueError)"
GIVEN_UP = "it died 4 times in a row; "  # why the envoy gave the collaborator up, before how
ALIVE = (pb.COLLABORATOR_STARTED, pb.COLLABORATOR_RUNNING)
pytestmark = pytest.mark.slow


@pytest.fixture
def service(
    tmp_path: Path, director_certs: CertsLayout, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Director, dict[str, EnvoyProcess]]]:
    """A director with its dashboard; alice's envoy sharing the defaults, bob's sharing more."""
    # The runner's folder on PYTHONPATH, for the aggregators, envoys and collaborators started.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    shares = {"alice": None, "bob": {"logs": "all", "errors": "line"}}
    with running_director(
        tmp_path / "director",
        director_certs,
        launcher=LocalLauncher(),
        aggregator={"listen_address": "127.0.0.1", "ports": [free_port()] * 2},
        dashboard={"address": "127.0.0.1:0"},
        health_check_seconds=0.5,
        runners=[NAME],  # the director imports it, for the initial model
    ) as director:
        envoys = {}
        for name, share in shares.items():
            keys = {"share_with_director": share} if share else {}
            config = write_envoy_config(
                tmp_path / "sites" / name, director_certs, director.port, runners=[NAME], **keys
            )
            envoy = EnvoyProcess(name, config, tmp_path / "sites" / name / "envoy.log")
            envoy.start()
            envoys[name] = envoy
        try:
            ada = director.stub("ada")
            wait_until(
                "both envoys online",
                lambda: (
                    sum(e.online for e in ada.ListEnvoys(pb.ListEnvoysRequest(), timeout=20).envoys)
                    == 2
                    or None
                ),
            )
            yield director, envoys
        finally:
            stop_envoys(list(envoys.values()), tmp_path / "sites")
    kill_recorded_aggregators(tmp_path / "director" / "state")


def run_leaky(director: Director, site: str, state_dir: Path) -> str:
    """Submit the leaky runner's experiment for `site` alone; its id once the envoy gave up on
    the collaborator and the director has its last report."""
    ada = director.stub("ada")
    experiment_id = submit(
        ada,
        collaborators=[site],
        runner={"name": NAME, "settings": {}},  # type: ignore[arg-type]
    )

    def given_up() -> SiteExperiment | None:
        state = EnvoyState.open(state_dir, exclusive=False)
        try:
            found = state.find(experiment_id)
        finally:
            state.close()
        # Not EXITED: its last death is written (restarts used up) just before the GAVE_UP.
        return found if found is not None and found.state is CollaboratorState.GAVE_UP else None

    # The site's own state (its `envoy list`, its API) keeps the whole reason.
    ended = wait_until(f"{site}'s envoy to give up its collaborator", given_up)
    assert ended.restarts == MAX_RESTARTS, ended
    reason = ended.reason
    assert reason.startswith(GIVEN_UP + CATEGORY), reason
    assert RECORD in reason and SITE_FILE in reason, reason

    def reported() -> pb.SiteStatus | None:
        request = pb.ExperimentRequest(experiment_id=experiment_id)
        sites = ada.GetExperiment(request, timeout=20).sites
        ended = [s for s in sites if s.site == site and s.state not in ALIVE]
        return ended[0] if ended and ended[0].exit_code == 1 else None

    wait_until(f"the director to hear that {site}'s collaborator exited", reported)
    return experiment_id


def cancel(director: Director, experiment_id: str) -> None:
    """Cancel the experiment (its aggregator waits for the site without end) unless it ended."""
    request = pb.ExperimentRequest(experiment_id=experiment_id)
    with contextlib.suppress(grpc.RpcError):  # already ended
        director.stub("ada").CancelExperiment(request, timeout=20)


def everything_readable(director: Director, folder: Path, experiment_id: str, site: str) -> bytes:
    """All the director, its dashboard and `experiment` give about the experiment, and every
    file of the director's state folder (SQLite and its WAL included)."""
    config = client_config(folder, director, "ada")
    texts = [
        run(config, "status", experiment_id)[1],
        run(config, "--json", "status", experiment_id)[1],
        run(config, "list")[1],
        run(config, "logs", experiment_id, "--site", site)[1],
        run(config, "logs", experiment_id)[1],
    ]
    secret = token(director, ADMIN)
    for path in ("/api/experiments", f"/api/experiments/{experiment_id}", "/api/envoys"):
        status, body = get_json(director, path, secret)
        assert status == 200, (path, body)
        texts.append(repr(body))
    data = "\n".join(texts).encode()
    state = folder / "director" / "state"
    files = [path for path in sorted(state.rglob("*")) if path.is_file()]
    assert any(path.name.endswith(".sqlite") for path in files), files
    return data + b"".join(path.read_bytes() for path in files)


def test_a_site_sharing_the_defaults_keeps_its_runner_output_and_errors(
    tmp_path: Path,
    service: tuple[Director, dict[str, EnvoyProcess]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """alice (defaults): the record is in her collaborator.log and nowhere the director reaches;
    the director still learns how her collaborator ended (a category) and foedus's own lines.
    bob (logs: all, errors: line): the record reaches the director; his site paths do not."""
    director, _ = service
    caplog.set_level(logging.INFO)  # the director's own log (it runs in this process)
    config = client_config(tmp_path, director, "ada")
    alice_state = tmp_path / "sites" / "alice" / "state"
    alice = run_leaky(director, "alice", alice_state)
    try:
        own = (alice_state / "experiments" / alice / "collaborator.log").read_bytes()
        assert all(secret in own for secret in SECRETS), own  # the site keeps everything
        assert SITE_FILE.encode() in own
        readable = everything_readable(director, tmp_path, alice, "alice") + caplog.text.encode()
        assert f"experiment {alice}" in caplog.text  # the director's log is there
        for secret in (*SECRETS, SITE_FILE.encode(), b"/srv/hospital"):
            assert secret not in readable, secret
        code, shown = run(config, "status", alice)
        assert code == 0 and CATEGORY in shown, shown
        _, body = get_json(director, f"/api/experiments/{alice}", token(director, ADMIN))
        assert [site["reason"] for site in body["sites"]] == [GIVEN_UP + CATEGORY], body
        code, log = run(config, "logs", alice, "--site", "alice")
        assert code == 0, log
        assert "shares only foedus's own log lines" in log.splitlines()[0], log
        assert (
            log.count("ERROR foedus.collaborator.cli: failure: the task runner failed (ValueError)")
            == 1 + MAX_RESTARTS
        )
        with ThreadPoolExecutor(1) as pool:  # --follow, by offsets of the shared log, to the end
            followed = pool.submit(run, config, "logs", alice, "--site", "alice", "--follow")
            cancel(director, alice)
            assert followed.result(timeout=120) == (0, log)
    finally:
        cancel(director, alice)

    bob = run_leaky(director, "bob", tmp_path / "sites" / "bob" / "state")
    try:
        code, shown = run(config, "status", bob)
        assert code == 0 and "Jane Doe" in shown and "<site path>" in shown, shown
        code, shown = run(config, "--json", "status", bob)
        assert code == 0 and "Jane Doe" in shown, shown
        _, body = get_json(director, f"/api/experiments/{bob}", token(director, ADMIN))
        assert RECORD in body["sites"][0]["reason"], body
        code, log = run(config, "logs", bob, "--site", "bob")
        assert code == 0 and log.count(RECORD) >= 2 * (1 + MAX_RESTARTS), log  # print and error
        assert SITE_FILE not in log and "/srv/hospital" not in log, log
        readable = everything_readable(director, tmp_path, bob, "bob")
        assert b"Jane Doe" in readable  # in the director's state: the search can find it
        assert b"/srv/hospital" not in readable
    finally:
        cancel(director, bob)
