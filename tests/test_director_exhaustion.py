"""No identity exhausts the director: calls bounded per identity and for people, silent streams ended.

A real director with real certificates; hostile callers open hundreds of streams that send
nothing, while another user and every envoy are answered within a second (each call's deadline).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from foedus.director.capacity import Capacity
from foedus.director.identity import Caller, Role
from foedus.pki.layout import CertsLayout
from foedus.plans.director_config import DirectorLimits
from foedus.protos import director_pb2 as pb
from foedus.refusals.errors import LimitExceededError

from directors import (
    ENVOYS,
    Director,
    eventually,
    running_director,
    submitted_plan,
)

STREAMS = 200  # idle streams from each hostile caller
PER_IDENTITY = 4  # limits.max_calls_per_identity
IDLE_SECONDS = 10  # limits.idle_stream_seconds: long enough for the checks in between
ANSWER_SECONDS = 1.0  # the "answered within a second", as each call's deadline
CALL_SECONDS = 120  # an idle stream's own deadline: far past the idle limit
WAIT_SECONDS = 60
LIMITS = {
    "max_plan_bytes": 16384,
    "max_model_bytes": 65536,
    "chunk_bytes": 4096,
    "max_calls_per_identity": PER_IDENTITY,
    "idle_stream_seconds": IDLE_SECONDS,
}


def register_envoys(director: Director) -> None:
    """Every envoy of director.yaml registers."""
    for name in ENVOYS:
        director.stub(name, role="envoy").RegisterEnvoy(
            pb.RegisterEnvoyRequest(shard=pb.ShardInfo(description=f"{name}'s digits")),
            timeout=WAIT_SECONDS,
        )


def silent(release: threading.Event, *first: Any) -> Iterator[Any]:
    """A request stream that sends `first` (if any), then nothing until `release` (bounded)."""
    yield from first
    release.wait(WAIT_SECONDS + CALL_SECONDS)


def first_submit_chunk() -> pb.SubmitChunk:
    """A valid first message announcing an initial model that never comes."""
    return pb.SubmitChunk(
        plan_yaml=yaml.safe_dump(submitted_plan()), has_initial_model=True, initial_model_size=1000
    )


def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """A finished future's status and message."""
    return call.code(), call.details() or ""


def others_are_answered(director: Director) -> None:
    """Another user lists experiments and every envoy heartbeats, each within a second."""
    director.stub("ada").ListExperiments(pb.ListExperimentsRequest(), timeout=ANSWER_SECONDS)
    for name in ENVOYS:
        answer = director.stub(name, role="envoy").EnvoyHeartbeat(
            pb.EnvoyHeartbeatRequest(), timeout=ANSWER_SECONDS
        )
        assert not answer.register_again, name


def test_idle_streams_of_a_user_and_a_site_exhaust_nothing(
    tmp_path: Path, director_certs: CertsLayout
) -> None:
    """200 silent streams from a user and 200 from a site: past 4 each refused at once, the
    4 admitted ended after limits.idle_stream_seconds, everyone else answered throughout."""
    release = threading.Event()
    with running_director(tmp_path, director_certs, limits=LIMITS) as director:
        register_envoys(director)
        capacity = director.server.servicer.capacity
        bea = director.stub("bea")
        alice = director.stub("alice", role="envoy")
        try:
            submits = [  # half send nothing, half a first message and then nothing
                bea.SubmitExperiment.future(
                    silent(release, *([first_submit_chunk()] if i % 2 else [])),
                    timeout=CALL_SECONDS,
                )
                for i in range(STREAMS)
            ]
            uploads = [
                alice.UploadLog.future(silent(release), timeout=CALL_SECONDS)
                for _ in range(STREAMS)
            ]
            streams = submits + uploads
            eventually(
                lambda: sum(call.done() for call in streams) == 2 * (STREAMS - PER_IDENTITY),
                "the calls past the limit to be refused",
                WAIT_SECONDS,
            )
            assert capacity.calls.in_progress("bea") == PER_IDENTITY
            assert capacity.calls.in_progress("alice") == PER_IDENTITY
            others_are_answered(director)
            # The checks ran while the silent streams were held: still held now.
            held = [call for call in streams if not call.done()]
            assert len(held) == 2 * PER_IDENTITY
            for name, calls in (("bea", submits), ("alice", uploads)):
                refused = [outcome(call) for call in calls if call.done()]
                assert len(refused) == STREAMS - PER_IDENTITY
                for code, details in refused:
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
                    assert f"certificate {name!r} already has {PER_IDENTITY} calls" in details
                    assert f"limits.max_calls_per_identity ({PER_IDENTITY})" in details
            eventually(
                lambda: all(call.done() for call in held), "the silent streams to end", WAIT_SECONDS
            )
            for call in held:
                code, details = outcome(call)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
                assert f"sent nothing for limits.idle_stream_seconds ({IDLE_SECONDS} s)" in details
            eventually(lambda: capacity.in_progress() == 0, "every slot to be let go", WAIT_SECONDS)
        finally:
            release.set()
        # Nothing of the cut-off submissions was kept; bea is served again.
        listed = bea.ListExperiments(pb.ListExperimentsRequest(), timeout=ANSWER_SECONDS)
        assert list(listed.experiments) == []
        others_are_answered(director)


def test_people_together_cannot_take_the_envoys_threads(
    tmp_path: Path, director_certs: CertsLayout
) -> None:
    """Past limits.max_people_calls a person's call is refused, an envoy's heartbeat answered."""
    release = threading.Event()
    limits = {**LIMITS, "max_people_calls": 2}
    with running_director(tmp_path, director_certs, limits=limits) as director:
        register_envoys(director)
        capacity = director.server.servicer.capacity
        ada = director.stub("ada")
        try:
            held = [
                ada.SubmitExperiment.future(silent(release), timeout=CALL_SECONDS) for _ in range(2)
            ]
            eventually(
                lambda: capacity.people.in_progress() == 2, "ada's streams to be held", WAIT_SECONDS
            )
            with pytest.raises(grpc.RpcError) as raised:
                director.stub("bea").ListExperiments(
                    pb.ListExperimentsRequest(), timeout=ANSWER_SECONDS
                )
            error: Any = raised.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert "limits.max_people_calls (2)" in error.details()
            for name in ENVOYS:
                director.stub(name, role="envoy").EnvoyHeartbeat(
                    pb.EnvoyHeartbeatRequest(), timeout=ANSWER_SECONDS
                )
            assert not any(call.done() for call in held)
        finally:
            release.set()
        eventually(lambda: all(call.done() for call in held), "ada's streams to end", WAIT_SECONDS)


def test_a_followed_stream_holds_a_slot_until_it_is_cancelled(
    tmp_path: Path, director_certs: CertsLayout
) -> None:
    """Watching as many experiments as the limit allows holds every slot; a cancel frees one."""
    with running_director(tmp_path, director_certs, limits=LIMITS) as director:
        register_envoys(director)
        capacity = director.server.servicer.capacity
        ada = director.stub("ada")
        plan = yaml.safe_dump(submitted_plan())
        experiment = ada.SubmitExperiment(
            iter([pb.SubmitChunk(plan_yaml=plan)]), timeout=WAIT_SECONDS
        )
        request = pb.ExperimentRequest(experiment_id=experiment.experiment_id)
        watches = [ada.WatchExperiment(request, timeout=CALL_SECONDS) for _ in range(PER_IDENTITY)]
        try:
            for watch in watches:  # each one admitted and following: it has sent its first state
                assert next(watch).experiment_id == experiment.experiment_id
            with pytest.raises(grpc.RpcError) as raised:
                ada.ListExperiments(pb.ListExperimentsRequest(), timeout=ANSWER_SECONDS)
            error: Any = raised.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert f"limits.max_calls_per_identity ({PER_IDENTITY})" in error.details()
            watches[0].cancel()
            eventually(
                lambda: capacity.calls.in_progress("ada") == PER_IDENTITY - 1,
                "the cancelled watch to let go of its slot",
                WAIT_SECONDS,
            )
            ada.ListExperiments(pb.ListExperimentsRequest(), timeout=ANSWER_SECONDS)
        finally:
            for watch in watches:
                watch.cancel()
        eventually(lambda: capacity.in_progress() == 0, "every slot to be let go", WAIT_SECONDS)


def test_capacity_keeps_envoys_heartbeats_apart_and_bounds_people_together() -> None:
    """An envoy's uploads do not take its heartbeat's slots; people share one bound; all let go."""
    capacity = Capacity(DirectorLimits(max_calls_per_identity=1, max_people_calls=2))
    alice, ada, bea, root = (
        Caller("alice", Role.ENVOY),
        Caller("ada", Role.USER),
        Caller("bea", Role.USER),
        Caller("root", Role.ADMIN),
    )
    with capacity.admit(alice, "UploadLog"), capacity.admit(alice, "EnvoyHeartbeat"):
        with (
            pytest.raises(LimitExceededError, match=r"certificate 'alice' already has 1 calls"),
            capacity.admit(alice, "UploadLog"),
        ):
            pass
        with (
            pytest.raises(LimitExceededError, match=r"limits\.max_calls_per_identity \(1\)"),
            capacity.admit(alice, "RegisterEnvoy"),
        ):
            pass
        with capacity.admit(ada, "ListExperiments"), capacity.admit(bea, "ListExperiments"):
            with (
                pytest.raises(LimitExceededError, match=r"limits\.max_people_calls \(2\)"),
                capacity.admit(root, "ListExperiments"),
            ):
                pass
            assert capacity.in_progress() == 4
    assert capacity.in_progress() == 0 and capacity.people.in_progress() == 0
