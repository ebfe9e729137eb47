"""Real envoy processes with the real director: its gRPC server, its aggregators as processes.

Three sites' envoys register with a director (`foedus.director.server.DirectorServer`, launching
real `aggregator start` processes), a person submits the digits plan, and the envoys run the
collaborators to completion; a site's log comes through the director from its envoy; a site that did
not agree to the plan's runner, or demands secure aggregation of a plan without it, fails the
experiment with its reason. Every wait is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import yaml

from foedus.director.launcher import LocalLauncher
from foedus.envoy.config import ShareWithDirector
from foedus.envoy.disclosure import SharedLog
from foedus.pki.layout import CertsLayout
from foedus.protos import director_pb2 as pb
from foedus.protos import director_pb2_grpc

from directors import ENVOYS, running_director, submitted_plan
from envoys import EnvoyProcess, read_all, start_envoys, stop_envoys, write_envoy_config
from federation_processes import free_port

RUN_SECONDS = 300
FINAL = {pb.EXPERIMENT_COMPLETED, pb.EXPERIMENT_FAILED, pb.EXPERIMENT_CANCELLED}
T = TypeVar("T")
pytestmark = pytest.mark.slow


def wait_until(what: str, check: Callable[[], T | None], timeout: float = RUN_SECONDS) -> T:
    """Poll `check()` until it gives a value (an RPC failing meanwhile counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except grpc.RpcError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def submit(stub: director_pb2_grpc.DirectorStub, **sections: dict[str, object]) -> str:
    """Submit plans/local.yaml (the director's fields left out) for 3 rounds; its id."""
    plan = submitted_plan(
        federation={"rounds": 3},
        aggregator={"quit_grace_seconds": 10},
        connection={"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        **sections,
    )
    chunk = pb.SubmitChunk(plan_yaml=yaml.safe_dump(plan), name="digits")
    return stub.SubmitExperiment(iter([chunk]), timeout=60).experiment_id


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """The test's folder."""
    yield tmp_path


def test_three_envoys_run_an_experiment_to_completion(
    folder: Path, director_certs: CertsLayout
) -> None:
    """Submitted by a person, run by three envoys: completed, each site EXITED 0, logs served."""
    with running_director(
        folder / "director",
        director_certs,
        launcher=LocalLauncher(),
        aggregator={"listen_address": "127.0.0.1", "ports": [free_port()] * 2},
        health_check_seconds=0.5,
    ) as director:
        envoys = start_envoys(folder / "sites", director_certs, director.port)
        try:
            ada = director.stub("ada")

            def online() -> list[pb.EnvoyInfo] | None:
                envoys = ada.ListEnvoys(pb.ListEnvoysRequest(), timeout=20).envoys
                return list(envoys) if len(envoys) == 3 and all(e.online for e in envoys) else None

            listed = wait_until("three envoys online", online)
            assert sorted(e.name for e in listed) == sorted(ENVOYS)
            assert {e.shard.description for e in listed} == {f"{name}'s digits" for name in ENVOYS}
            experiment_id = submit(ada)
            request = pb.ExperimentRequest(experiment_id=experiment_id)

            def ended() -> pb.Experiment | None:
                experiment = ada.GetExperiment(request, timeout=20)
                return experiment if experiment.state in FINAL else None

            final = wait_until("the experiment to end", ended)
            assert final.state == pb.EXPERIMENT_COMPLETED, final

            def all_exited() -> list[pb.SiteStatus] | None:
                sites = list(ada.GetExperiment(request, timeout=20).sites)
                done = all(s.state == pb.COLLABORATOR_EXITED and s.exit_code == 0 for s in sites)
                return sites if done else None

            try:
                sites = wait_until("every site's EXITED 0", all_exited, timeout=60)
            except AssertionError:
                raise AssertionError(
                    f"{ada.GetExperiment(request, timeout=20).sites}\n"
                    + "\n".join(envoy.text()[-3000:] for envoy in envoys)
                ) from None
            assert sorted(site.site for site in sites) == sorted(ENVOYS)
            chunks = list(
                ada.GetLogs(
                    pb.LogRequestFromUser(experiment_id=experiment_id, site="bob"), timeout=60
                )
            )
            log = b"".join(chunk.data for chunk in chunks)
            assert b"collaborator bob of federation" in log
            bob_log = (folder / "sites" / "bob" / "state" / "experiments" / experiment_id).joinpath(
                "collaborator.log"
            )
            # As bob shares it by default (envoy.disclosure): foedus's own lines, paths cut.
            assert log == read_all(SharedLog(ShareWithDirector(), "bob"), bob_log)
            assert all(envoy.alive() for envoy in envoys)
        finally:
            stop_envoys(envoys, folder / "sites")


@pytest.mark.parametrize(
    ("runners", "keys", "why"),
    [
        (
            {"bob": ["my_site.models:Net"]},
            {},
            "runner 'digits' is not one this site agreed to run",
        ),
        (
            None,
            {"bob": {"require_secure_aggregation": True}},
            "secure_aggregation.enabled: not true, and this site requires secure aggregation",
        ),
    ],
    ids=["runner", "secure"],
)
def test_a_site_that_refuses_the_plan_fails_the_experiment(
    folder: Path,
    director_certs: CertsLayout,
    runners: dict[str, list[str]] | None,
    keys: dict[str, dict[str, object]],
    why: str,
) -> None:
    """bob's envoy agrees to another runner only, or demands secure aggregation of a plan
    without it: the experiment fails, naming bob and why."""
    with running_director(
        folder / "director",
        director_certs,
        launcher=LocalLauncher(),
        aggregator={"listen_address": "127.0.0.1", "ports": [free_port()] * 2},
        health_check_seconds=0.5,
    ) as director:
        envoys = start_envoys(folder / "sites", director_certs, director.port, runners, keys)
        try:
            ada = director.stub("ada")
            wait_until(
                "three envoys registered",
                lambda: len(ada.ListEnvoys(pb.ListEnvoysRequest(), timeout=20).envoys) == 3 or None,
            )
            experiment_id = submit(ada)
            request = pb.ExperimentRequest(experiment_id=experiment_id)

            def failed() -> pb.Experiment | None:
                experiment = ada.GetExperiment(request, timeout=20)
                return experiment if experiment.state in FINAL else None

            final = wait_until("the experiment to fail", failed, timeout=120)
            assert final.state == pb.EXPERIMENT_FAILED, final
            reason = final.reason
            assert "site bob refused" in reason, reason
            assert why in reason, reason
        finally:
            stop_envoys(envoys, folder / "sites")


def test_a_site_the_director_does_not_allow_keeps_trying_and_is_told_why(
    folder: Path, director_certs: CertsLayout
) -> None:
    """mallory's certificate is from the CA but not in director.yaml's envoys: refused, logged, alive."""
    with running_director(folder / "director", director_certs) as director:
        config = write_envoy_config(folder / "mallory", director_certs, director.port)
        envoy = EnvoyProcess("mallory", config, folder / "mallory" / "envoy.log")
        envoy.start()
        try:
            deadline = time.monotonic() + RUN_SECONDS
            while envoy.text().count("refused RegisterEnvoy with PERMISSION_DENIED") < 2:
                assert envoy.alive(), envoy.text()
                assert time.monotonic() < deadline, envoy.text()
                time.sleep(0.1)
            ada = director.stub("ada")
            assert list(ada.ListEnvoys(pb.ListEnvoysRequest(), timeout=20).envoys) == []
        finally:
            stop_envoys([envoy], folder)
