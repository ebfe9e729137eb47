"""Envoys as real processes against a real director-side gRPC server, over mTLS with our pki.

The director here is `envoys.RecordingDirector` (the envoy RPCs of director.proto, recording
what it receives); collaborators are real `collaborator start` processes working for a real
`aggregator start`. Every wait is bounded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from foedus.envoy.cli import main as envoy_main
from foedus.envoy.config import ShareWithDirector
from foedus.envoy.disclosure import SharedLog
from foedus.pki.layout import CertsLayout
from foedus.pki.local import setup_local_federation
from foedus.protos import director_pb2 as pb

from envoys import (
    WAIT_SECONDS,
    EnvoyProcess,
    RecordingDirector,
    kill_collaborator_process,
    plan_text,
    read_all,
    stop_collaborators,
    write_envoy_config,
)
from federation_processes import FederationProcesses, free_port, write_plan

ROUNDS = 3
ROUND_0_SENT = "round 0: locally_tuned_model_validation on"  # a collaborator's last line of round 0
PATIENT = {"max_retries": 200, "max_wait_seconds": 90}
FEDERATION_SECONDS = 240


@dataclass
class Site:
    """A recording director and one envoy process of site alice."""

    director: RecordingDirector
    envoy: EnvoyProcess
    config: Path
    state_dir: Path


@pytest.fixture
def site(certs: CertsLayout, tmp_path: Path) -> Iterator[Site]:
    """A director serving and alice's envoy started (review: auto)."""
    yield from _site(certs, tmp_path)


@pytest.fixture
def manual_site(certs: CertsLayout, tmp_path: Path) -> Iterator[Site]:
    """The same with review: manual."""
    yield from _site(certs, tmp_path, review="manual")


def _site(certs: CertsLayout, tmp_path: Path, **keys: object) -> Iterator[Site]:
    port = free_port()
    director = RecordingDirector(certs, port)
    director.start()
    config = write_envoy_config(tmp_path / "alice", certs, port, **keys)
    envoy = EnvoyProcess("alice", config, tmp_path / "alice" / "envoy.log")
    envoy.start()
    state_dir = tmp_path / "alice" / "state"
    try:
        yield Site(director, envoy, config, state_dir)
    finally:
        if envoy.alive():
            envoy.terminate()
        stop_collaborators(state_dir)
        director.stop()


def wait_for_log(envoy: EnvoyProcess, pattern: str, count: int = 1) -> None:
    """Wait until the envoy's log holds `pattern` `count` times; it must stay alive."""
    deadline = time.monotonic() + WAIT_SECONDS
    while len(re.findall(pattern, envoy.text())) < count:
        assert envoy.alive(), envoy.text()
        assert time.monotonic() < deadline, f"no {count} x {pattern!r} in:\n{envoy.text()}"
        time.sleep(0.1)


def test_registers_heartbeats_and_keeps_trying_while_the_director_is_away(site: Site) -> None:
    """It registers with its shard, heartbeats, outlives the director's absence and registers again."""
    director = site.director
    _, registration = director.wait_for(
        "alice's registration",
        lambda r: [x for x in r.registrations if x[0] == "alice"][:1] or None,
    )[0]
    assert registration.shard.description == "test shard"
    assert (registration.shard.train_samples, registration.shard.valid_samples) == (1200, 300)
    assert dict(registration.shard.labels) == {"modality": "digits"}
    assert registration.version
    director.wait_for("3 heartbeats", lambda r: len(r.heartbeats) >= 3)

    director.stop()
    wait_for_log(site.envoy, r"director call failed: .*UNAVAILABLE", count=4)
    registrations = len(director.records.registrations)
    director.start()  # a new director process: it does not know the envoy
    director.wait_for(
        "register_again answered",
        lambda r: len(r.registrations) > registrations and len(r.heartbeats) > 0,
    )
    assert "does not know this envoy; registering again" in site.envoy.text()
    beats = len(director.records.heartbeats)
    director.wait_for("heartbeats again", lambda r: len(r.heartbeats) >= beats + 3)

    director.ask_log("alice", "r1", "someone-elses-experiment")
    upload = director.wait_for(
        "the answer to r1", lambda r: [u for u in r.uploads if u.request_id == "r1"]
    )[0]
    assert (upload.envoy, upload.found, upload.data) == ("alice", False, b"")
    assert site.envoy.terminate() == 0
    assert "the collaborators keep running" in site.envoy.text()


def test_a_runner_not_agreed_to_is_refused(site: Site, certs: CertsLayout, tmp_path: Path) -> None:
    """A plan naming a runner outside envoy.yaml's runners: REFUSED with the reason, nothing run."""
    plan = write_plan(tmp_path / "plan", certs, 1, runner={"name": "evil.module:Runner"})
    site.director.give_start("alice", "e-evil", plan_text(plan))
    report = site.director.wait_for_state("alice", "e-evil", pb.COLLABORATOR_REFUSED)
    assert "runner 'evil.module:Runner' is not one this site agreed to run" in report.reason
    assert not (site.state_dir / "experiments" / "e-evil" / "collaborator.log").exists()
    # Listed until the director says stop; then no more.
    site.director.give_stop("alice", "e-evil")
    beats = len(site.director.records.heartbeats)
    site.director.wait_for(
        "a heartbeat without e-evil",
        lambda r: [
            h
            for name, h in r.heartbeats[beats:]
            if name == "alice" and not any(c.experiment_id == "e-evil" for c in h.collaborators)
        ],
    )


def test_manual_review_approve_then_stop_and_reject(
    manual_site: Site, certs: CertsLayout, tmp_path: Path
) -> None:
    """review: manual waits for `envoy approve` / `envoy reject`; a stop ends the collaborator."""
    site = manual_site
    director = site.director
    # An aggregator nobody runs: the approved collaborator keeps retrying until stopped.
    plan = write_plan(tmp_path / "plan", certs, 1, connection=PATIENT)
    director.give_start("alice", "e-yes", plan_text(plan))
    director.give_start("alice", "e-no", plan_text(plan))
    director.wait_for_state("alice", "e-yes", pb.COLLABORATOR_APPROVAL_PENDING)
    director.wait_for_state("alice", "e-no", pb.COLLABORATOR_APPROVAL_PENDING)
    time.sleep(1)  # a few heartbeats: nothing starts without the operator
    assert director.states("alice", "e-yes") == [pb.COLLABORATOR_APPROVAL_PENDING]

    config = str(site.config)
    assert envoy_main(["approve", "e-yes", "--config", config]) == 0
    assert envoy_main(["reject", "e-no", "--config", config, "--reason", "not our data"]) == 0
    rejected = director.wait_for_state("alice", "e-no", pb.COLLABORATOR_SITE_REJECTED)
    assert rejected.reason == "not our data"
    director.wait_for_state("alice", "e-yes", pb.COLLABORATOR_STARTED)
    assert director.states("alice", "e-yes")[:3] == [
        pb.COLLABORATOR_APPROVAL_PENDING,
        pb.COLLABORATOR_SITE_APPROVED,
        pb.COLLABORATOR_STARTED,
    ]
    log = site.state_dir / "experiments" / "e-yes" / "collaborator.log"
    deadline = time.monotonic() + WAIT_SECONDS
    while "working for the aggregator" not in log.read_text(encoding="utf-8", errors="replace"):
        assert time.monotonic() < deadline, log.read_text(encoding="utf-8")
        time.sleep(0.1)

    director.ask_log("alice", "r-yes", "e-yes", offset=3)
    upload = director.wait_for(
        "the log of e-yes", lambda r: [u for u in r.uploads if u.request_id == "r-yes"]
    )[0]
    # Offsets are of the log as the site shares it (by default: foedus's own lines, paths cut).
    whole = read_all(SharedLog(ShareWithDirector(), "alice"), log)
    assert upload.found and upload.log_size >= len(upload.data) + 3
    assert upload.data == whole[3 : 3 + len(upload.data)]
    assert b"working for the aggregator" in upload.data

    director.give_stop("alice", "e-yes")
    exited = director.wait_for_state("alice", "e-yes", pb.COLLABORATOR_EXITED)
    assert exited.exit_code == 143 and "terminated (SIGTERM)" in exited.reason, exited
    time.sleep(1)  # stopped for good: not started again
    assert director.states("alice", "e-yes")[-1] == pb.COLLABORATOR_EXITED


# -- whole federations ---------------------------------------------------------------------------


def ordeal(
    envoy: EnvoyProcess,
    director: RecordingDirector,
    state_dir: Path,
    *,
    kill_envoy: bool,
    kill_collaborator: bool,
) -> None:
    """Kill the envoy, its collaborator or both (-9) and wait until the collaborator runs again.

    The collaborator is killed once it has sent round 0's results, so that its new process
    starts at round 1; the envoy alone, once its collaborator works."""
    if not (kill_envoy or kill_collaborator):
        return
    log = state_dir / "experiments" / "exp-1" / "collaborator.log"
    waited = ROUND_0_SENT if kill_collaborator else "working for the aggregator"
    deadline = time.monotonic() + WAIT_SECONDS
    while waited not in log.read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, log.read_text(encoding="utf-8")
        time.sleep(0.1)
    seen = len(director.records.reports)
    if not kill_envoy:
        kill_collaborator_process(state_dir, "exp-1")  # its envoy sees it die, starts it again
        director.wait_for_state("alice", "exp-1", pb.COLLABORATOR_STARTED, after=seen)
        return
    envoy.kill()
    if kill_collaborator:
        stop_collaborators(state_dir)  # its whole session: as if the machine had failed
    envoy.start()
    again = pb.COLLABORATOR_STARTED if kill_collaborator else pb.COLLABORATOR_RUNNING
    director.wait_for_state("alice", "exp-1", again, after=seen)


def run_federation_with_envoy(
    folder: Path, certs: CertsLayout, *, kill_envoy: bool, kill_collaborator: bool = False
) -> tuple[dict[str, bytes], RecordingDirector, str]:
    """alice through her envoy, bob and carol by hand; the envoy, its collaborator or both killed.

    bob and carol start only after the ordeal, so alice's collaborator is mid-federation (waiting
    on round 0 to close) when it happens. The envoy killed alone is restarted and adopts its
    collaborator; a collaborator killed is killed after sending round 0's results, so its new
    process (started by the envoy, restarted or not) trains from round 1 on.
    """
    plan = write_plan(folder / "federation", certs, ROUNDS, connection=PATIENT)
    federation = FederationProcesses(plan, folder / "federation")
    port = free_port()
    director = RecordingDirector(certs, port)
    config = write_envoy_config(folder / "alice", certs, port)
    envoy = EnvoyProcess("alice", config, folder / "alice" / "envoy.log")
    state_dir = folder / "alice" / "state"
    try:
        director.start()
        federation.start("aggregator")
        envoy.start()
        director.give_start("alice", "exp-1", plan_text(plan), name="digits")
        director.wait_for_state("alice", "exp-1", pb.COLLABORATOR_STARTED)
        ordeal(
            envoy, director, state_dir, kill_envoy=kill_envoy, kill_collaborator=kill_collaborator
        )
        for name in ("bob", "carol"):
            federation.start(name)
        codes = federation.wait_all(FEDERATION_SECONDS)
        assert codes == {"aggregator": 0, "bob": 0, "carol": 0}, federation.output()
        director.wait_for(
            "alice to report EXITED 0",
            lambda r: [
                report
                for name, report in r.reports
                if report.state == pb.COLLABORATOR_EXITED and report.exit_code == 0
            ],
        )
        if kill_collaborator:  # its death was reported, then its new start
            died = [
                (report.exit_code, report.reason.split(";")[0])
                for name, report in director.records.reports
                if report.state == pb.COLLABORATOR_EXITED and report.exit_code != 0
            ]
            # The envoy's kill took the collaborator's whole session, its status keeper too.
            expected = (
                (-1, "the collaborator stopped without recording an exit status")
                if kill_envoy
                else (-9, "the collaborator was ended by signal 9")
            )
            assert died == [expected], died
        director.ask_log("alice", "r-final", "exp-1")
        upload = director.wait_for(
            "the final log", lambda r: [u for u in r.uploads if u.request_id == "r-final"]
        )[0]
        assert upload.found and b"working for the aggregator" in upload.data
        assert envoy.alive()
    finally:
        if envoy.alive():
            envoy.terminate()
        stop_collaborators(state_dir)
        federation.stop_all()
        director.stop()
    output = folder / "federation" / "output"
    models = {name: (output / name).read_bytes() for name in ("last_model.pbuf", "best_model.pbuf")}
    return models, director, federation.output()


@pytest.fixture(scope="module")
def undisturbed(certs: CertsLayout, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The models of a federation with alice's envoy left alone."""
    models, director, _ = run_federation_with_envoy(
        tmp_path_factory.mktemp("undisturbed"), certs, kill_envoy=False
    )
    assert director.states("alice", "exp-1") == [
        pb.COLLABORATOR_SITE_APPROVED,
        pb.COLLABORATOR_STARTED,
        pb.COLLABORATOR_EXITED,
    ]
    return models


def test_a_start_runs_a_collaborator_to_the_end(undisturbed: dict[str, bytes]) -> None:
    """A start runs `collaborator start` for a real aggregator to completion; EXITED 0 reported."""
    assert undisturbed["last_model.pbuf"] and undisturbed["best_model.pbuf"]


def test_envoy_killed_mid_federation_resumes_to_the_same_model(
    undisturbed: dict[str, bytes], certs: CertsLayout, tmp_path: Path
) -> None:
    """kill -9 of the envoy mid-federation, restarted: its collaborator adopted, the models byte-identical."""
    models, _, _ = run_federation_with_envoy(tmp_path, certs, kill_envoy=True)
    assert models == undisturbed


def test_envoy_and_collaborator_killed_the_collaborator_is_started_again(
    undisturbed: dict[str, bytes], certs: CertsLayout, tmp_path: Path
) -> None:
    """kill -9 of the envoy and its collaborator's session: restarted, the envoy starts it again.

    The new collaborator asks the aggregator what it still owes, the federation completes with
    alice in every round, and the models are byte-identical: the digits runner draws its
    shuffles from the seed, the site and the round, not from its process.
    """
    models, _, stdout = run_federation_with_envoy(
        tmp_path, certs, kill_envoy=True, kill_collaborator=True
    )
    rounds = [line for line in stdout.splitlines() if "reported" in line]
    assert len(rounds) == ROUNDS + 1, stdout
    assert all("reported alice,bob,carol " in line for line in rounds), stdout
    assert models == undisturbed


def test_collaborator_killed_its_envoy_starts_it_again_to_the_same_model(
    undisturbed: dict[str, bytes], certs: CertsLayout, tmp_path: Path
) -> None:
    """kill -9 of the collaborator alone after round 0's results: its envoy reports the death
    (signal 9) and starts it again, and the models are byte-identical to the undisturbed run's."""
    models, _, stdout = run_federation_with_envoy(
        tmp_path, certs, kill_envoy=False, kill_collaborator=True
    )
    rounds = [line for line in stdout.splitlines() if "reported" in line]
    assert len(rounds) == ROUNDS + 1, stdout
    assert all("reported alice,bob,carol " in line for line in rounds), stdout
    assert models == undisturbed


def test_a_director_from_another_ca_is_never_trusted(
    certs: CertsLayout, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A server whose certificate chains to another CA: the envoy ends the handshake, sends nothing.

    The impostor asks for no client certificate, so only the envoy's own check can stop it.
    """
    other = CertsLayout(tmp_path_factory.mktemp("other-ca"))
    setup_local_federation(
        other,
        aggregator_host="localhost",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
        collaborators=("alice",),
    )
    port = free_port()
    impostor = RecordingDirector(other, port, require_client_auth=False)
    impostor.start()
    envoy = EnvoyProcess("alice", write_envoy_config(tmp_path, certs, port), tmp_path / "envoy.log")
    envoy.start()
    try:
        wait_for_log(envoy, r"director call failed: RegisterEnvoy .*UNAVAILABLE", count=3)
        assert envoy.alive()
    finally:
        envoy.terminate()
        impostor.stop()
    records = impostor.records
    assert (records.registrations, records.heartbeats, records.reports) == ([], [], [])
