"""The director over real gRPC and real certificates: its lifecycle, and its hostile-input table."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from foedus.aggregator.storage import model_bytes
from foedus.director.changes import MAX_WAIT_SECONDS
from foedus.director.launcher import LOG_FILE, LocalLauncher
from foedus.pki.layout import CertsLayout
from foedus.pki.local import load_signing_ca
from foedus.pki.requests import Role
from foedus.processes.children import Ended
from foedus.protos import director_pb2 as pb
from foedus.protos import director_pb2_grpc

from conftest import Identity, issue_identity
from directors import (
    ADMIN,
    ENVOYS,
    OUTSIDER,
    PERSON_NAMED_LIKE_A_SITE,
    SITE_NAMED_LIKE_A_PERSON,
    STRANGER,
    Director,
    RecordingLauncher,
    alias_bomb_plan,
    eventually,
    running_director,
    stub_at,
    submitted_plan,
)
from federation_processes import child_python_path, free_port
from settings_runner import IMPORTED, MARKER
from settings_runner import NAME as SETTINGS_RUNNER

WAIT_SECONDS = 30
TIMEOUT = 20  # every call's deadline


@pytest.fixture
def launcher() -> RecordingLauncher:
    """A launcher that starts nothing."""
    return RecordingLauncher()


@pytest.fixture
def director(
    tmp_path: Path, director_certs: CertsLayout, launcher: RecordingLauncher
) -> Iterator[Director]:
    """A director with manual review, its three envoys registered."""
    with running_director(tmp_path, director_certs, launcher=launcher, review="manual") as running:
        for name in ENVOYS:
            running.stub(name, role="envoy").RegisterEnvoy(
                pb.RegisterEnvoyRequest(shard=pb.ShardInfo(description=f"{name}'s digits")),
                timeout=TIMEOUT,
            )
        yield running


def submit(stub: director_pb2_grpc.DirectorStub, plan: object, **first: Any) -> pb.Experiment:
    """Submit a plan (a document, or text as it is) with optional first-message fields."""
    text = plan if isinstance(plan, str) else yaml.safe_dump(plan)
    return stub.SubmitExperiment(iter([pb.SubmitChunk(plan_yaml=text, **first)]), timeout=TIMEOUT)


def state_of(director: Director, experiment_id: str) -> int:
    """The experiment's state, as an admin reads it."""
    return (
        director.stub(ADMIN)
        .GetExperiment(pb.ExperimentRequest(experiment_id=experiment_id), timeout=TIMEOUT)
        .state
    )


def test_an_experiment_runs_its_whole_lifecycle(
    director: Director, launcher: RecordingLauncher
) -> None:
    """Submit, approve, start, sites start, the aggregator ends well: completed, model downloadable."""
    ada, root = director.stub("ada"), director.stub(ADMIN)
    submitted = submit(ada, submitted_plan(), name="digits run")
    assert (submitted.state, submitted.owner, submitted.name) == (
        pb.EXPERIMENT_SUBMITTED,
        "ada",
        "digits run",
    )
    assert [site.site for site in submitted.sites] == list(ENVOYS)
    experiment_id = submitted.experiment_id
    request = pb.ReviewRequest(experiment_id=experiment_id, reason="looks fine")
    assert root.ApproveExperiment(request, timeout=TIMEOUT).reason == "approved by root: looks fine"
    eventually(lambda: state_of(director, experiment_id) == pb.EXPERIMENT_WAITING, "waiting")
    eventually(
        lambda: director.server.state.experiment(experiment_id).aggregator_pid is not None,
        "the aggregator's start recorded",
    )
    [(started_id, plan_path)] = launcher.started
    assert started_id == experiment_id
    plan = yaml.safe_load(plan_path.read_text(encoding="utf-8"))
    assert plan["federation"]["uuid"] == experiment_id and plan["aggregator"]["port"] == 60100

    alice = director.stub("alice", role="envoy")
    work = alice.EnvoyHeartbeat(pb.EnvoyHeartbeatRequest(), timeout=TIMEOUT)
    [order] = work.start
    assert (order.experiment_id, order.collaborator_name, order.owner) == (
        experiment_id,
        "alice",
        "ada",
    )
    assert yaml.safe_load(order.plan_yaml) == plan
    for name in ENVOYS:
        director.stub(name, role="envoy").ReportCollaborator(
            pb.CollaboratorReport(experiment_id=experiment_id, state=pb.COLLABORATOR_STARTED),
            timeout=TIMEOUT,
        )
    eventually(lambda: state_of(director, experiment_id) == pb.EXPERIMENT_RUNNING, "running")
    listed = pb.CollaboratorReport(experiment_id=experiment_id, state=pb.COLLABORATOR_RUNNING)
    again = alice.EnvoyHeartbeat(pb.EnvoyHeartbeatRequest(collaborators=[listed]), timeout=TIMEOUT)
    assert list(again.start) == [] and list(again.stop) == []

    output = director.server.service.folders.folder(experiment_id) / "output"
    output.mkdir()
    rows = [f'{{"round": {n}, "final_validation": false}}' for n in range(10)]
    (output / "metrics.jsonl").write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    model = bytes(range(256)) * 40  # 10240 bytes: three chunks of 4096 at most
    (output / "best_model.pbuf").write_bytes(model)
    launcher.ends[experiment_id] = Ended(0)
    eventually(lambda: state_of(director, experiment_id) == pb.EXPERIMENT_COMPLETED, "completed")

    finished = ada.GetExperiment(pb.ExperimentRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    assert (finished.rounds, finished.rounds_completed, finished.has_best_model) == (10, 10, True)
    assert not finished.has_last_model
    chunks = list(
        ada.DownloadModel(
            pb.DownloadModelRequest(experiment_id=experiment_id, kind=pb.MODEL_KIND_BEST),
            timeout=TIMEOUT,
        )
    )
    assert chunks[0].total_size == len(model) and len(chunks) == 3
    assert b"".join(chunk.data for chunk in chunks) == model
    metrics = ada.GetMetricStream(
        pb.MetricStreamRequest(experiment_id=experiment_id, from_row=8, follow=True),
        timeout=TIMEOUT,
    )
    assert [(row.index, row.json) for row in metrics] == [(8, rows[8]), (9, rows[9])]
    watched = list(
        ada.WatchExperiment(pb.ExperimentRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    )
    assert [message.state for message in watched] == [pb.EXPERIMENT_COMPLETED]
    ended = alice.EnvoyHeartbeat(pb.EnvoyHeartbeatRequest(collaborators=[listed]), timeout=TIMEOUT)
    assert list(ended.stop) == [experiment_id]
    ada.RemoveExperiment(pb.ExperimentRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    assert not director.server.service.folders.folder(experiment_id).exists()


def test_the_queue_runs_at_most_max_running_in_submission_order(
    director: Director, launcher: RecordingLauncher
) -> None:
    """Three approved experiments, two places: the third waits, then starts when one ends."""
    ada, root = director.stub("ada"), director.stub(ADMIN)
    ids = [submit(ada, submitted_plan()).experiment_id for _ in range(3)]
    for experiment_id in ids:  # the supervisor runs meanwhile: each may start as it is approved
        root.ApproveExperiment(pb.ReviewRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    eventually(lambda: len(launcher.started) == 2, "two starts")
    assert [started for started, _ in launcher.started] == ids[:2]
    third = ada.GetExperiment(pb.ExperimentRequest(experiment_id=ids[2]), timeout=TIMEOUT)
    assert (third.state, third.queue_position) == (pb.EXPERIMENT_APPROVED, 1)
    ada.CancelExperiment(pb.ExperimentRequest(experiment_id=ids[0]), timeout=TIMEOUT)
    assert launcher.stopped == [ids[0]]
    eventually(lambda: len(launcher.started) == 3, "the third start")
    assert launcher.started[2][0] == ids[2]


def test_a_refusing_site_fails_the_experiment_with_its_reason(
    director: Director, launcher: RecordingLauncher
) -> None:
    """A site reporting 'runner not allowed' fails the experiment, naming it; the aggregator stops."""
    ada, root = director.stub("ada"), director.stub(ADMIN)
    experiment_id = submit(ada, submitted_plan()).experiment_id
    root.ApproveExperiment(pb.ReviewRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    eventually(lambda: len(launcher.started) == 1, "the start")
    director.stub("bob", role="envoy").ReportCollaborator(
        pb.CollaboratorReport(
            experiment_id=experiment_id,
            state=pb.COLLABORATOR_REFUSED,
            reason="runner 'digits' is not in this site's runners",
        ),
        timeout=TIMEOUT,
    )
    eventually(lambda: state_of(director, experiment_id) == pb.EXPERIMENT_FAILED, "failed")
    failed = ada.GetExperiment(pb.ExperimentRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    assert failed.reason == (
        "site bob refused: runner 'digits' is not in this site's runners; 2 of 3 left, 3 needed"
    )
    # The supervisor records the end before it stops the aggregator: wait for the stop too.
    eventually(lambda: launcher.stopped == [experiment_id], "the aggregator stopped")


def test_an_aggregator_failing_fails_the_experiment_and_a_killed_one_starts_again(
    director: Director, launcher: RecordingLauncher
) -> None:
    """Exit code 1: failed with the code; killed by a signal: started again, same experiment."""
    ada, root = director.stub("ada"), director.stub(ADMIN)
    first, second = (submit(ada, submitted_plan()).experiment_id for _ in range(2))
    for experiment_id in (first, second):
        root.ApproveExperiment(pb.ReviewRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    eventually(lambda: len(launcher.started) == 2, "two starts")
    launcher.ends[first] = Ended(1)
    launcher.ends[second] = Ended(-9)
    eventually(lambda: state_of(director, first) == pb.EXPERIMENT_FAILED, "failed")
    failed = ada.GetExperiment(pb.ExperimentRequest(experiment_id=first), timeout=TIMEOUT)
    assert failed.reason.startswith("the aggregator exited with code 1")
    eventually(lambda: len(launcher.started) == 3, "the restart")
    assert launcher.started[2][0] == second
    assert state_of(director, second) == pb.EXPERIMENT_WAITING


def test_an_envoy_the_director_does_not_know_is_told_to_register(director: Director) -> None:
    """A heartbeat from an allowed but unregistered name answers register_again, and no work."""
    with running_director(
        director.config_path.parent / "other", director.certs, review="manual"
    ) as fresh:
        answer = fresh.stub("alice", role="envoy").EnvoyHeartbeat(
            pb.EnvoyHeartbeatRequest(), timeout=TIMEOUT
        )
        assert answer.register_again and answer.health_check_seconds == 1
        assert list(answer.start) == []


def test_envoys_are_listed_online_with_their_shards(director: Director) -> None:
    """ListEnvoys shows each registered envoy, online, with its shard description."""
    answer = director.stub("bea").ListEnvoys(pb.ListEnvoysRequest(), timeout=TIMEOUT)
    assert [(e.name, e.online, e.shard.description) for e in answer.envoys] == [
        (name, True, f"{name}'s digits") for name in ENVOYS
    ]


def test_a_user_sees_only_their_experiments_an_admin_all(director: Director) -> None:
    """ListExperiments: ada sees hers, bea hers, root both."""
    mine = submit(director.stub("ada"), submitted_plan()).experiment_id
    theirs = submit(director.stub("bea"), submitted_plan()).experiment_id

    def listed(name: str) -> list[str]:
        answer = director.stub(name).ListExperiments(pb.ListExperimentsRequest(), timeout=TIMEOUT)
        return [e.experiment_id for e in answer.experiments]

    assert (listed("ada"), listed("bea"), listed(ADMIN)) == ([mine], [theirs], [mine, theirs])


def test_envoys_list_only_the_experiments_the_caller_may_see(director: Director) -> None:
    """ListEnvoys: beside each envoy, ada sees her experiment's id, bea hers, root both."""
    mine = submit(director.stub("ada"), submitted_plan()).experiment_id
    theirs = submit(director.stub("bea"), submitted_plan()).experiment_id
    for experiment_id in (mine, theirs):
        director.stub(ADMIN).ApproveExperiment(
            pb.ReviewRequest(experiment_id=experiment_id), timeout=TIMEOUT
        )

    def listed(name: str) -> dict[str, list[str]]:
        answer = director.stub(name).ListEnvoys(pb.ListEnvoysRequest(), timeout=TIMEOUT)
        return {envoy.name: list(envoy.experiments) for envoy in answer.envoys}

    eventually(lambda: listed(ADMIN) == {site: [mine, theirs] for site in ENVOYS}, "both running")
    assert listed("ada") == {site: [mine] for site in ENVOYS}
    assert listed("bea") == {site: [theirs] for site in ENVOYS}


def test_an_initial_model_is_received_in_chunks(director: Director) -> None:
    """A model sent in pieces is stored whole, and the plan the director writes names it."""
    model = b"\x0a\x00" * 3000
    pieces = [model[i : i + 1000] for i in range(0, len(model), 1000)]
    first = pb.SubmitChunk(
        plan_yaml=yaml.safe_dump(submitted_plan()),
        has_initial_model=True,
        initial_model_size=len(model),
        initial_model_data=pieces[0],
    )
    rest = [pb.SubmitChunk(initial_model_data=piece) for piece in pieces[1:]]
    answer = director.stub("ada").SubmitExperiment(iter([first, *rest]), timeout=TIMEOUT)
    folder = director.server.service.folders.folder(answer.experiment_id)
    assert (folder / "initial_model.pbuf").read_bytes() == model


def test_a_sites_log_comes_through_its_envoy(director: Director) -> None:
    """GetLogs for a site: the envoy finds the request in its heartbeat, uploads, the person reads it."""
    experiment_id = submit(director.stub("ada"), submitted_plan()).experiment_id
    request = pb.LogRequestFromUser(experiment_id=experiment_id, site="alice", offset=5)
    chunks: list[pb.LogChunk] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            chunks.extend(director.stub("ada").GetLogs(request, timeout=TIMEOUT))
        except BaseException as error:
            errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    alice = director.stub("alice", role="envoy")
    orders: list[pb.LogRequestToEnvoy] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while not orders:
        assert time.monotonic() < deadline, "no log request reached the envoy"
        orders = list(
            alice.EnvoyHeartbeat(pb.EnvoyHeartbeatRequest(), timeout=TIMEOUT).log_requests
        )
        time.sleep(0.05)
    [order] = orders
    assert (order.experiment_id, order.offset, order.max_bytes) == (experiment_id, 5, 4096)
    log = b"0123456789 collaborator alice: round 1 done\n"
    alice.UploadLog(
        iter(
            [
                pb.LogUpload(request_id=order.request_id, found=True, log_size=len(log)),
                pb.LogUpload(data=log[order.offset :]),
            ]
        ),
        timeout=TIMEOUT,
    )
    # The reader asks again from the new offset; the envoy has nothing more: an empty upload.
    deadline = time.monotonic() + WAIT_SECONDS
    while reader.is_alive():
        assert time.monotonic() < deadline, "the reader did not finish"
        for more in alice.EnvoyHeartbeat(pb.EnvoyHeartbeatRequest(), timeout=TIMEOUT).log_requests:
            assert more.offset == len(log)
            alice.UploadLog(
                iter([pb.LogUpload(request_id=more.request_id, found=True)]), timeout=TIMEOUT
            )
        time.sleep(0.05)
    reader.join()
    assert errors == []
    assert [(chunk.offset, chunk.data) for chunk in chunks] == [(5, log[5:])]


def test_followed_streams_see_each_change_and_end_with_the_experiment(
    director: Director,
) -> None:
    """Metrics, the aggregator's log and the experiment followed: each new row, line and state
    arrives while they follow, and a cancel ends all three cleanly."""
    ada, root = director.stub("ada"), director.stub(ADMIN)
    experiment_id = submit(ada, submitted_plan()).experiment_id
    root.ApproveExperiment(pb.ReviewRequest(experiment_id=experiment_id), timeout=TIMEOUT)
    eventually(lambda: state_of(director, experiment_id) == pb.EXPERIMENT_WAITING, "waiting")
    folder = director.server.service.folders.folder(experiment_id)
    (folder / "output").mkdir(exist_ok=True)
    request = pb.ExperimentRequest(experiment_id=experiment_id)
    metrics = ada.GetMetricStream(
        pb.MetricStreamRequest(experiment_id=experiment_id, follow=True), timeout=TIMEOUT
    )
    logs = ada.GetLogs(
        pb.LogRequestFromUser(experiment_id=experiment_id, follow=True), timeout=TIMEOUT
    )
    watch = ada.WatchExperiment(request, timeout=TIMEOUT)
    assert next(watch).state == pb.EXPERIMENT_WAITING
    with (folder / "output" / "metrics.jsonl").open("a", encoding="utf-8") as rows:
        rows.write('{"round": 0}\n')
    with (folder / LOG_FILE).open("ab") as log:
        log.write(b"round 0 done\n")
    first_row = next(metrics)
    assert (first_row.index, first_row.json) == (0, '{"round": 0}')
    first_chunk = next(logs)
    assert (first_chunk.offset, first_chunk.data) == (0, b"round 0 done\n")
    assert next(watch).rounds_completed == 1
    ada.CancelExperiment(request, timeout=TIMEOUT)
    assert [message.state for message in watch] == [pb.EXPERIMENT_CANCELLED]
    assert list(metrics) == [] and list(logs) == []


def test_a_followed_stream_ends_cleanly_when_the_director_stops(director: Director) -> None:
    """The server stopping wakes a followed watch at once: it ends with OK, well within its
    deadline (the longest it could otherwise wait without a change)."""
    experiment_id = submit(director.stub("ada"), submitted_plan()).experiment_id
    request = pb.ExperimentRequest(experiment_id=experiment_id)
    watch = director.stub("ada").WatchExperiment(request, timeout=MAX_WAIT_SECONDS / 2)
    assert next(watch).state == pb.EXPERIMENT_SUBMITTED
    director.server.stopping.set()  # as `DirectorServer.stop` does first
    assert list(watch) == []


# --- the hostile table ----------------------------------------------------------------------

Call = Callable[[Director], object]


def _as(name: str, role: str = "user") -> Callable[[Director], director_pb2_grpc.DirectorStub]:
    return lambda d: d.stub(name, role=role)


def _ada_experiment(director: Director) -> str:
    return submit(director.stub("ada"), submitted_plan()).experiment_id


def _rejected(director: Director) -> str:
    experiment_id = _ada_experiment(director)
    director.stub(ADMIN).RejectExperiment(
        pb.ReviewRequest(experiment_id=experiment_id), timeout=TIMEOUT
    )
    return experiment_id


def _model_stream(size: int, sent: int) -> Iterator[pb.SubmitChunk]:
    yield pb.SubmitChunk(
        plan_yaml=yaml.safe_dump(submitted_plan()), has_initial_model=True, initial_model_size=size
    )
    for _ in range(sent // 1000):
        yield pb.SubmitChunk(initial_model_data=b"\0" * 1000)


UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"  # a UUID, of no experiment

HOSTILE: list[tuple[str, Call, grpc.StatusCode, str]] = [
    (
        "a site certificate not in envoys",
        lambda d: _as(STRANGER, "envoy")(d).RegisterEnvoy(
            pb.RegisterEnvoyRequest(), timeout=TIMEOUT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "'mallory' is not in this director's envoys, users or admins",
    ),
    (
        "a user certificate not in users",
        lambda d: _as(OUTSIDER)(d).ListExperiments(pb.ListExperimentsRequest(), timeout=TIMEOUT),
        grpc.StatusCode.PERMISSION_DENIED,
        "'eve' is not in this director's envoys, users or admins",
    ),
    (
        "a user calling an envoy's RPC",
        lambda d: _as("ada")(d).RegisterEnvoy(pb.RegisterEnvoyRequest(), timeout=TIMEOUT),
        grpc.StatusCode.PERMISSION_DENIED,
        "RegisterEnvoy is for envoys; certificate 'ada' is one of this director's users",
    ),
    (
        "an envoy calling a user's RPC",
        lambda d: _as("alice", "envoy")(d).ListExperiments(
            pb.ListExperimentsRequest(), timeout=TIMEOUT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ListExperiments is for users or admins",
    ),
    (
        "a person's certificate named like a site registering",
        lambda d: _as(PERSON_NAMED_LIKE_A_SITE)(d).RegisterEnvoy(
            pb.RegisterEnvoyRequest(), timeout=TIMEOUT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "certificate 'alice' is a user certificate, but director.yaml envoys names 'alice', "
        "which needs a collaborator certificate: it must be issued for that role (pki certify "
        "--role collaborator --name alice",
    ),
    (
        "a person's certificate named like a site heartbeating",
        lambda d: _as(PERSON_NAMED_LIKE_A_SITE)(d).EnvoyHeartbeat(
            pb.EnvoyHeartbeatRequest(), timeout=TIMEOUT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "certificate 'alice' is a user certificate, but director.yaml envoys names 'alice'",
    ),
    (
        "a site's certificate named like a person submitting",
        lambda d: submit(_as(SITE_NAMED_LIKE_A_PERSON, "envoy")(d), submitted_plan()),
        grpc.StatusCode.PERMISSION_DENIED,
        "certificate 'ada' is a collaborator certificate, but director.yaml users names 'ada', "
        "which needs a user certificate: it must be issued for that role (pki certify --role "
        "user --name ada",
    ),
    (
        "a site's certificate named like a person listing",
        lambda d: _as(SITE_NAMED_LIKE_A_PERSON, "envoy")(d).ListExperiments(
            pb.ListExperimentsRequest(), timeout=TIMEOUT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "certificate 'ada' is a collaborator certificate, but director.yaml users names 'ada'",
    ),
    (
        "a plan that does not parse",
        lambda d: submit(d.stub("ada"), "federation: [\n"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "submitted plan: line",
    ),
    (
        "a plan naming an unknown site",
        lambda d: submit(d.stub("ada"), submitted_plan(collaborators=["alice", "zed"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "collaborators: not registered with this director: zed",
    ),
    (
        "a plan setting a field the director owns",
        lambda d: submit(d.stub("ada"), submitted_plan(aggregator={"port": 443})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "submitted plan: aggregator.port: set by the director; remove it",
    ),
    (
        "a plan with a bad value",
        lambda d: submit(d.stub("ada"), submitted_plan(federation={"rounds": -1})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "federation.rounds: expected an integer",
    ),
    (
        "a runner.settings typo",
        lambda d: submit(d.stub("ada"), submitted_plan(runner={"settings": {"epoch": 2}})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "submitted plan: runner.settings.epoch: unknown key (known: split, test_fraction, "
        "epochs, batch_size, learning_rate, skew)",
    ),
    (
        "a runner the director does not run, without an initial model",
        lambda d: submit(d.stub("ada"), submitted_plan(runner={"name": "this:Zen"})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "submitted plan: runner.name: 'this:Zen' is not a runner this director's host runs "
        "(director.yaml runners: digits); submit the experiment with its initial model",
    ),
    (
        "an empty submission",
        lambda d: d.stub("ada").SubmitExperiment(iter([]), timeout=TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "plan_yaml: required in the first message",
    ),
    (
        "an oversized plan",
        lambda d: submit(d.stub("ada"), "#" * 16385),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limits.max_plan_bytes",
    ),
    (
        "an oversized model, declared",
        lambda d: d.stub("ada").SubmitExperiment(_model_stream(65537, 0), timeout=TIMEOUT),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limits.max_model_bytes",
    ),
    (
        "a model larger than declared",
        lambda d: d.stub("ada").SubmitExperiment(_model_stream(1000, 3000), timeout=TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "initial_model_size says 1000 bytes, but more arrived",
    ),
    (
        "a model shorter than declared",
        lambda d: d.stub("ada").SubmitExperiment(_model_stream(5000, 3000), timeout=TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "initial_model_size says 5000 bytes, but 3000 arrived",
    ),
    (
        "an unknown experiment id",
        lambda d: d.stub("ada").GetExperiment(
            pb.ExperimentRequest(experiment_id=UNKNOWN_ID), timeout=TIMEOUT
        ),
        grpc.StatusCode.NOT_FOUND,
        f"no experiment '{UNKNOWN_ID}'",
    ),
    (
        "an experiment id that is no UUID",
        lambda d: d.stub("ada").GetExperiment(
            pb.ExperimentRequest(experiment_id="nope"), timeout=TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "experiment_id: 'nope' is not an id of this director (a UUID",
    ),
    (
        "an experiment id of 200 KB, quoted cut",
        lambda d: d.stub("ada").CancelExperiment(
            pb.ExperimentRequest(experiment_id="a" * 200_000), timeout=TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "experiment_id: '" + "a" * 27 + "..." + "a" * 28 + "' is not an id of this director",
    ),
    (
        "a log offset past any file",
        lambda d: list(
            d.stub("ada").GetLogs(
                pb.LogRequestFromUser(experiment_id=_ada_experiment(d), offset=2**64 - 1),
                timeout=TIMEOUT,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "offset: 18446744073709551615 is past the largest offset, 9223372036854775807",
    ),
    (
        "a metric row past any list",
        lambda d: list(
            d.stub("ada").GetMetricStream(
                pb.MetricStreamRequest(experiment_id=_ada_experiment(d), from_row=2**64 - 1),
                timeout=TIMEOUT,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "from_row: 18446744073709551615 is past the largest offset",
    ),
    (
        "a log of a site that is no name",
        lambda d: list(
            d.stub("ada").GetLogs(
                pb.LogRequestFromUser(experiment_id=_ada_experiment(d), site="../" * 50000),
                timeout=TIMEOUT,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "site: '../../../",
    ),
    (
        "an experiment name of 10 KB",
        lambda d: submit(d.stub("ada"), submitted_plan(), name="n" * 10_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "name: 10000 characters; at most 200",
    ),
    (
        "a review reason of 10 KB",
        lambda d: d.stub(ADMIN).RejectExperiment(
            pb.ReviewRequest(experiment_id=_ada_experiment(d), reason="r" * 10_000),
            timeout=TIMEOUT,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "reason: 10000 characters; at most 1000",
    ),
    (
        "a shard description of 1 MB",
        lambda d: _as("alice", "envoy")(d).RegisterEnvoy(
            pb.RegisterEnvoyRequest(shard=pb.ShardInfo(description="d" * 1_000_000)),
            timeout=TIMEOUT,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shard.description: 1000000 characters; at most 4096",
    ),
    (
        "shard labels by the thousand",
        lambda d: _as("alice", "envoy")(d).RegisterEnvoy(
            pb.RegisterEnvoyRequest(shard=pb.ShardInfo(labels={str(i): "" for i in range(1000)})),
            timeout=TIMEOUT,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shard.labels: 1000 labels; at most 256",
    ),
    (
        "an alias bomb in runner.settings",
        lambda d: submit(d.stub("ada"), alias_bomb_plan(submitted_plan())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not valid YAML: YAML aliases (*name) are not accepted: write the value out",
    ),
    (
        "no experiment id",
        lambda d: d.stub("ada").CancelExperiment(pb.ExperimentRequest(), timeout=TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "experiment_id: required",
    ),
    (
        "a user acting on another's experiment",
        lambda d: d.stub("bea").CancelExperiment(
            pb.ExperimentRequest(experiment_id=_ada_experiment(d)), timeout=TIMEOUT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "belongs to another user",
    ),
    (
        "a user reading another's metrics",
        lambda d: list(
            d.stub("bea").GetMetricStream(
                pb.MetricStreamRequest(experiment_id=_ada_experiment(d)), timeout=TIMEOUT
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "belongs to another user",
    ),
    (
        "a download before any model exists",
        lambda d: list(
            d.stub("ada").DownloadModel(
                pb.DownloadModelRequest(experiment_id=_ada_experiment(d), kind=pb.MODEL_KIND_BEST),
                timeout=TIMEOUT,
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "has no best model yet",
    ),
    (
        "a download of no kind of model",
        lambda d: list(
            d.stub("ada").DownloadModel(
                pb.DownloadModelRequest(experiment_id=_ada_experiment(d)), timeout=TIMEOUT
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "kind: MODEL_KIND_BEST or MODEL_KIND_LAST",
    ),
    (
        "a cancel of an ended experiment",
        lambda d: d.stub("ada").CancelExperiment(
            pb.ExperimentRequest(experiment_id=_rejected(d)), timeout=TIMEOUT
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "has already ended (rejected)",
    ),
    (
        "a remove of a live experiment",
        lambda d: d.stub("ada").RemoveExperiment(
            pb.ExperimentRequest(experiment_id=_ada_experiment(d)), timeout=TIMEOUT
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "only an experiment that has ended can be removed",
    ),
    (
        "an approval by a user",
        lambda d: d.stub("ada").ApproveExperiment(
            pb.ReviewRequest(experiment_id=_ada_experiment(d)), timeout=TIMEOUT
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ApproveExperiment is for admins",
    ),
    (
        "an approval of a rejected experiment",
        lambda d: d.stub(ADMIN).ApproveExperiment(
            pb.ReviewRequest(experiment_id=_rejected(d)), timeout=TIMEOUT
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is rejected and cannot become approved: it has ended",
    ),
    (
        "a report on an experiment not naming the site",
        lambda d: _as("alice", "envoy")(d).ReportCollaborator(
            pb.CollaboratorReport(
                experiment_id=submit(
                    d.stub("ada"), submitted_plan(collaborators=["bob", "carol"])
                ).experiment_id,
                state=pb.COLLABORATOR_STARTED,
            ),
            timeout=TIMEOUT,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "site 'alice' is not one of experiment",
    ),
    (
        "a report without a state",
        lambda d: _as("alice", "envoy")(d).ReportCollaborator(
            pb.CollaboratorReport(experiment_id=_ada_experiment(d)), timeout=TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "state: 0 is not a collaborator state",
    ),
    (
        "a log upload nobody asked for",
        lambda d: _as("alice", "envoy")(d).UploadLog(
            iter([pb.LogUpload(request_id=UNKNOWN_ID, found=True, data=b"x")]), timeout=TIMEOUT
        ),
        grpc.StatusCode.NOT_FOUND,
        f"no log request '{UNKNOWN_ID}' is waiting for 'alice'",
    ),
    (
        "a log upload naming no request id",
        lambda d: _as("alice", "envoy")(d).UploadLog(
            iter([pb.LogUpload(request_id="forged", found=True, data=b"x")]), timeout=TIMEOUT
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_id: 'forged' is not an id of this director",
    ),
    (
        "a site's log from an offline envoy",
        lambda d: list(
            d.stub("ada").GetLogs(
                pb.LogRequestFromUser(experiment_id=_offline_site_experiment(d), site="alice"),
                timeout=TIMEOUT,
            )
        ),
        grpc.StatusCode.UNAVAILABLE,
        "the envoy of site 'alice' is offline",
    ),
]


@pytest.mark.parametrize(
    ("allowed", "with_model"),
    [(False, True), (True, False)],
    ids=["not allowed, with its initial model", "allowed, without one"],
)
def test_a_runner_is_imported_only_where_director_yaml_allows_it(
    tmp_path: Path,
    director_certs: CertsLayout,
    monkeypatch: pytest.MonkeyPatch,
    *,
    allowed: bool,
    with_model: bool,
) -> None:
    """A runner not in director.yaml runners, submitted with its initial model: accepted, and
    neither the director nor the aggregator it starts imports it (no mark, nothing it prints in
    the aggregator's log); allowed and without a model, both import it (the mark works)."""
    marker = tmp_path / "imported"
    monkeypatch.setenv(MARKER, str(marker))
    monkeypatch.setenv("PYTHONPATH", child_python_path())
    monkeypatch.delitem(sys.modules, "settings_runner", raising=False)
    port = free_port()
    runners = ["digits", SETTINGS_RUNNER] if allowed else ["digits"]
    model = model_bytes({"w": np.zeros(3, dtype=np.float32)}) if with_model else b""
    plan = submitted_plan(runner={"name": SETTINGS_RUNNER, "seed": 0, "settings": {"step": 1}})
    first = pb.SubmitChunk(
        plan_yaml=yaml.safe_dump(plan),
        has_initial_model=with_model,
        initial_model_size=len(model),
        initial_model_data=model,
    )
    with running_director(
        tmp_path / "director",
        director_certs,
        launcher=LocalLauncher(),
        aggregator={"listen_address": "127.0.0.1", "ports": [port, port]},
        runners=runners,
    ) as director:
        try:
            for name in ENVOYS:
                director.stub(name, role="envoy").RegisterEnvoy(
                    pb.RegisterEnvoyRequest(), timeout=TIMEOUT
                )
            answer = director.stub("ada").SubmitExperiment(iter([first]), timeout=TIMEOUT)
            log = director.server.service.folders.folder(answer.experiment_id) / LOG_FILE
            eventually(
                lambda: log.exists() and "serving federation" in log.read_text("utf-8"),
                "the aggregator serving",
            )
            director.stub(ADMIN).CancelExperiment(
                pb.ExperimentRequest(experiment_id=answer.experiment_id), timeout=TIMEOUT
            )
        finally:
            for experiment in director.server.state.experiments():
                if experiment.aggregator_pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(experiment.aggregator_pid, signal.SIGKILL)
    importers = marker.read_text("utf-8").split() if marker.exists() else []
    if allowed:
        assert len(importers) == 2 and str(os.getpid()) in importers  # the director, its aggregator
        assert IMPORTED in log.read_text("utf-8")
    else:
        assert importers == [] and "settings_runner" not in sys.modules
        assert IMPORTED not in log.read_text("utf-8")


def _offline_site_experiment(director: Director) -> str:
    experiment_id = _ada_experiment(director)
    eventually(  # health_check_seconds is 1: offline 2 s after the fixture registered it
        lambda: not director.server.state.envoy("alice").online,  # type: ignore[union-attr]
        "alice offline",
    )
    return experiment_id


@pytest.mark.parametrize(
    ("case", "call", "code", "message"), HOSTILE, ids=[case[0] for case in HOSTILE]
)
def test_hostile_input_gets_its_exact_status(
    director: Director, case: str, call: Call, code: grpc.StatusCode, message: str
) -> None:
    """Each hostile call is refused with its exact status and a message naming the field; the director goes on."""
    with pytest.raises(grpc.RpcError) as raised:
        call(director)
    error: Any = raised.value
    assert error.code() == code, (case, error.details())
    assert message in error.details(), error.details()
    answer = director.stub("ada").ListExperiments(pb.ListExperimentsRequest(), timeout=TIMEOUT)
    assert answer is not None


def test_a_certificate_from_another_ca_cannot_connect(
    director: Director, foreign_alice: Identity
) -> None:
    """A client certificate from a foreign CA fails the handshake: UNAVAILABLE, nothing served."""
    stub = stub_at(director.port, director.certs.ca_bundle, foreign_alice.cert, foreign_alice.key)
    with pytest.raises(grpc.RpcError) as raised:
        stub.RegisterEnvoy(pb.RegisterEnvoyRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_no_client_certificate_cannot_connect(director: Director) -> None:
    """Without a client certificate the handshake fails: the director requires one."""
    stub = stub_at(director.port, director.certs.ca_bundle, None, None)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ListExperiments(pb.ListExperimentsRequest(), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_certificates_made_before_role_marks_work_with_one_warning_each(
    director: Director, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unmarked user certificate and an unmarked site certificate still act in the one role
    director.yaml gives their names, each warned about once, naming the command to reissue it."""
    signing_key, signing_cert = load_signing_ca(director.certs)
    identities = {
        name: issue_identity(
            tmp_path,
            role,
            name,
            signing_key=signing_key,
            signing_cert=signing_cert,
            role_mark=False,
        )
        for name, role in (("bea", Role.USER), ("carol", Role.COLLABORATOR))
    }
    caplog.set_level(logging.WARNING, logger="foedus.pki.roles")
    bea, carol = (
        stub_at(
            director.port, director.certs.ca_bundle, identities[name].cert, identities[name].key
        )
        for name in ("bea", "carol")
    )
    for _ in range(3):
        bea.ListExperiments(pb.ListExperimentsRequest(), timeout=TIMEOUT)
        carol.RegisterEnvoy(pb.RegisterEnvoyRequest(), timeout=TIMEOUT)
        assert not carol.EnvoyHeartbeat(pb.EnvoyHeartbeatRequest(), timeout=TIMEOUT).register_again
    assert submit(bea, submitted_plan()).owner == "bea"
    warnings = sorted(r.getMessage() for r in caplog.records if r.name == "foedus.pki.roles")
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("certificate 'bea' has no role mark")
    assert "as a user certificate because director.yaml users names it so" in warnings[0]
    assert "reissue it: pki certify --role user --name bea" in warnings[0]
    assert warnings[1].startswith("certificate 'carol' has no role mark")
    assert "reissue it: pki certify --role collaborator --name carol" in warnings[1]


def test_a_log_offset_past_the_end_reads_nothing(director: Director) -> None:
    """The largest offset a file can have, past the aggregator's log: an empty answer, no error."""
    experiment_id = _ada_experiment(director)
    log = director.server.service.folders.folder(experiment_id) / LOG_FILE
    log.write_bytes(b"the aggregator's log\n")
    request = pb.LogRequestFromUser(experiment_id=experiment_id, offset=2**63 - 1)
    assert list(director.stub("ada").GetLogs(request, timeout=TIMEOUT)) == []
