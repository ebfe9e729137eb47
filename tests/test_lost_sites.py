"""Real processes: every experiment ends by itself when a site's collaborator ends for good.

One director (one experiment at a time) and three envoys serve every case in turn. A site is
lost in each way it can be: it refuses the runner, its collaborator dies on every start (the
envoy gives it up after its restarts in a row), its operator stops it through the site API, or
it exits 2 on a bad setting of the site's own. With `liveness: {min_sites: 2}` the experiment
completes without that site, whose status shows how it ended; with the default policy (every
site needed) it fails naming the site, and the next experiment in the queue starts. All three
sites ending at once fail their experiment: `experiment wait` exits 1 and `experiment metrics
--follow` returns. Every wait is bounded; where a race could decide a case (the others finishing
before a site is given up), the raising runner holds their training until the test lets it go.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from foedus.envoy.site_api import TOKEN_FILE
from foedus.pki.layout import CertsLayout
from foedus.protos import director_pb2 as pb

from directors import make_director_certs
from envoys import write_envoy_config
from federation_processes import free_port
from raising_runner import NAME as RAISING
from test_director_end_to_end import RUN_SECONDS, Service, running_service

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
ROUNDS = 3
DIGITS_BY_PATH = (
    "foedus.collaborator.digits:DigitsRunner"  # the digits runner, by a name carol refuses
)
# The plans' grace: the aggregator stops waiting for a silent site after 2 x 0.5 + 3 = 4 s.
MIN_2 = {"min_sites": 2, "offline_grace_seconds": 3}
WORKED = {pb.COLLABORATOR_STARTED, pb.COLLABORATOR_RUNNING, pb.COLLABORATOR_EXITED}
RUNNERS = {
    "alice": ["digits", DIGITS_BY_PATH, RAISING],
    "bob": ["digits", DIGITS_BY_PATH, RAISING],
    "carol": ["digits", RAISING],
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A director running one experiment at a time and three envoys; this folder (the raising
    runner) on everyone's PYTHONPATH; bob's site API on."""
    certs: CertsLayout = make_director_certs(tmp_path_factory.mktemp("certs"))
    with pytest.MonkeyPatch.context() as patch:
        path = os.environ.get("PYTHONPATH")
        patch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{path}" if path else str(TESTS))
        with running_service(
            tmp_path_factory.mktemp("lost-sites"),
            certs,
            site_runners=RUNNERS,
            runners=RUNNERS["alice"],  # the director's host makes the initial models
            envoy_keys={"bob": {"site_api": {"enabled": True, "port": free_port()}}},
            max_running_experiments=1,
        ) as running:
            yield running


def submit(service: Service, runner: dict[str, object], **sections: object) -> str:
    """A short experiment on the three sites with `runner`; its id."""
    return service.submit(
        federation={"rounds": ROUNDS},
        runner=runner,
        aggregator={"quit_grace_seconds": 2},
        connection={
            "heartbeat_seconds": 1,
            "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 1,
        },
        **sections,
    )


def raising(*sites: str, hold_until: Path | None = None) -> dict[str, object]:
    """The plan's runner: the raising runner, raising at `sites`, the others' training held
    until the file `hold_until` is made."""
    settings: dict[str, object] = {"raise_at": list(sites)}
    if hold_until is not None:
        settings["hold_until"] = str(hold_until)
    return {"name": RAISING, "settings": settings}


def release_when_bob_gave_up(
    experiment_id: str, hold: Path
) -> Callable[[dict[str, pb.Experiment]], None]:
    """A `follow` step: make `hold` (the others may train) once bob's status shows GAVE_UP."""

    def step(states: dict[str, pb.Experiment]) -> None:
        if site(states[experiment_id], "bob").state == pb.COLLABORATOR_GAVE_UP:
            hold.touch()

    return step


def site(experiment: pb.Experiment, name: str) -> pb.SiteStatus:
    """The status of one site of the experiment."""
    return next(s for s in experiment.sites if s.site == name)


def completed_without(final: pb.Experiment, name: str, state: int) -> None:
    """The experiment completed every round, `name` lost in `state`, the two others not lost
    (their exits may be reported after the aggregator's end)."""
    assert final.state == pb.EXPERIMENT_COMPLETED, final
    assert final.rounds_completed == ROUNDS, final
    assert site(final, name).state == state, final
    others = [s for s in final.sites if s.site != name]
    assert all(s.state in WORKED and s.exit_code == 0 for s in others), final


def test_a_site_that_refuses_is_gone_without(service: Service) -> None:
    """carol refuses the runner: with min_sites 2 the experiment completes on alice and bob."""
    experiment_id = submit(service, {"name": DIGITS_BY_PATH}, liveness=MIN_2)
    final = service.follow([experiment_id])[experiment_id]
    completed_without(final, "carol", pb.COLLABORATOR_REFUSED)
    assert "not one this site agreed to run" in site(final, "carol").reason, final


def test_a_site_whose_restarts_are_used_up_is_gone_without(service: Service) -> None:
    """bob's collaborator raises in train on every start: its envoy starts it again 3 times,
    then gives it up; with min_sites 2 the experiment completes on alice and carol (their
    training held until bob's status shows it given up)."""
    hold = service.folder / "restarts-used-up"
    experiment_id = submit(service, raising("bob", hold_until=hold), liveness=MIN_2)
    final = service.follow([experiment_id], release_when_bob_gave_up(experiment_id, hold))
    final = final[experiment_id]
    completed_without(final, "bob", pb.COLLABORATOR_GAVE_UP)
    assert site(final, "bob").exit_code != 0, final
    assert "it died 4 times in a row" in site(final, "bob").reason, final


def test_a_site_whose_restarts_are_used_up_fails_the_experiment_by_default(
    service: Service,
) -> None:
    """The same with every site needed (the default policy): once bob's envoy gives up, the
    experiment fails naming bob and why; the others' training is held until then."""
    experiment_id = submit(service, raising("bob", hold_until=service.folder / "never"))
    final = service.follow([experiment_id])[experiment_id]
    assert final.state == pb.EXPERIMENT_FAILED, final
    assert final.reason.startswith("site bob gave up: it died 4 times in a row; "), final.reason
    assert final.reason.endswith("; 2 of 3 left, 3 needed"), final.reason
    assert site(final, "bob").state == pb.COLLABORATOR_GAVE_UP, final


def test_a_site_its_operator_stops_is_gone_without(service: Service) -> None:
    """bob's operator stops bob's collaborator through the site API once the experiment runs:
    the site gives it up and its envoy tells the aggregator bob left; with min_sites 2 the
    experiment completes on alice and carol (their training held until bob's status shows it
    given up). The plan's own offline_after_seconds (600) is past this test's patience: only
    the envoy's Leave lets the rounds close without bob."""
    hold = service.folder / "stopped"
    experiment_id = submit(
        service,
        raising(hold_until=hold),
        liveness=MIN_2,
        straggler={"offline_after_seconds": 600},
    )
    release = release_when_bob_gave_up(experiment_id, hold)
    token = (service.folder / "sites" / "bob" / "state" / TOKEN_FILE).read_text("utf-8").strip()
    port = yaml.safe_load(service.envoys["bob"].config.read_text("utf-8"))["site_api"]["port"]
    stopped: list[int] = []

    def stop_bob(states: dict[str, pb.Experiment]) -> None:
        if not stopped and states[experiment_id].state == pb.EXPERIMENT_RUNNING:
            answer = httpx.post(
                f"http://127.0.0.1:{port}/api/collaborators/{experiment_id}/stop",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            stopped.append(answer.status_code)
        release(states)

    final = service.follow([experiment_id], stop_bob)[experiment_id]
    assert stopped == [202], stopped
    completed_without(final, "bob", pb.COLLABORATOR_GAVE_UP)
    assert site(final, "bob").reason.startswith("stopped by the site's operator"), final
    envoy_log = service.envoys["bob"].text()
    assert f"experiment {experiment_id}: told the aggregator that bob left" in envoy_log


def experiment_command(service: Service, *argv: str) -> subprocess.Popen[str]:
    """`experiment ARGV` as ada, started as a process."""
    config = service.folder / "ada.yaml"
    certs = service.certs
    config.write_text(
        yaml.safe_dump(
            {
                "director": f"localhost:{service.director.port}",
                "certs_dir": str(certs.root),
                "name": "ada",
            }
        ),
        encoding="utf-8",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "foedus.experiment", "--config", str(config), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def ended(process: subprocess.Popen[str]) -> tuple[int, str]:
    """Its exit code and output, once it has ended by itself (killed after RUN_SECONDS)."""
    try:
        out, err = process.communicate(timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"{process.args} did not end within {RUN_SECONDS} s") from None
    return process.returncode, out + err


def test_exit_2_fails_the_experiment_and_all_sites_ending_fail_theirs(service: Service) -> None:
    """carol's own runner_settings has an unknown key: her collaborator exits 2, given up at
    once; with every site needed the experiment fails naming carol, and the next in the queue
    starts. In it all three sites end (alice and bob raise, and leave, carol exits 2): with
    min_sites 1 it fails all the same, by the director's rule or its aggregator's (no round
    can close: everyone has left), naming carol; `experiment wait` exits 1, `metrics --follow`
    returns."""
    carol = service.envoys["carol"]
    carol.terminate()
    write_envoy_config(
        carol.config.parent,
        service.certs,
        service.director.port,
        runners=RUNNERS["carol"],
        runner_settings={"no_such_setting": 1},
    )
    carol.start()
    first = submit(service, {"name": "digits"})
    second = submit(service, raising("alice", "bob"), liveness={"min_sites": 1})
    waiting = experiment_command(service, "wait", second)
    following = experiment_command(service, "metrics", second, "--follow")
    states = service.follow([first, second])
    failed = states[first]
    assert failed.state == pb.EXPERIMENT_FAILED, failed
    assert "site carol gave up: a bad plan or settings" in failed.reason, failed
    assert (site(failed, "carol").state, site(failed, "carol").exit_code) == (
        pb.COLLABORATOR_GAVE_UP,
        2,
    )
    after = states[second]
    assert after.started_at >= failed.ended_at > 0, (failed, after)
    assert after.state == pb.EXPERIMENT_FAILED, after
    assert "site carol gave up: a bad plan or settings" in after.reason, after.reason
    assert site(after, "carol").state == pb.COLLABORATOR_GAVE_UP, after
    code, output = ended(waiting)
    assert code == 1 and output.startswith("failed: "), output
    code, output = ended(following)
    assert code == 0, output
