"""The aggregator's durable state without processes: accepts, closes, restarts, refusals, tidiness."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sqlite3
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from foedus.aggregator import failpoints
from foedus.aggregator.digest import file_digest
from foedus.aggregator.federation import Federation
from foedus.aggregator.records import ResultTensor, TaskResult
from foedus.aggregator.runtime import Runtime
from foedus.aggregator.schema import SCHEMA_VERSION
from foedus.aggregator.state import DurableState, ForeignStateError
from foedus.aggregator.storage import OutputFolder, model_bytes
from foedus.aggregator.upload import receive_upload
from foedus.plans.schema import StragglerPolicy, StragglerSettings
from foedus.protos import aggregator_pb2
from foedus.protos.codec import encode_tensor
from foedus.refusals.errors import PreconditionError, StorageError

from federations import (
    AMV,
    COLLABORATORS,
    TASKS,
    UUID,
    federation_of,
    open_state,
    report,
    result,
    scores,
)
from old_states import named_by_sha256, schema_of
from servers import make_plan

TWO_OF_THREE = StragglerSettings(StragglerPolicy.PERCENTAGE, percentage=0.6)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[DurableState]:
    """A new state in tmp_path/out, closed after the test."""
    opened = open_state(tmp_path / "out")
    yield opened
    opened.close()


def files(folder: Path) -> dict[str, int]:
    """Every file under `folder` but SQLite's, with its modification time in ns."""
    return {
        str(path.relative_to(folder)): path.stat().st_mtime_ns
        for path in folder.rglob("*")
        if path.is_file() and "state.sqlite" not in path.name
    }


def test_accepted_results_survive_a_restart(tmp_path: Path) -> None:
    """Results accepted before a restart are there after it, tensors byte for byte, not owed again."""
    first = open_state(tmp_path / "out")
    assert first.recovered.fresh
    fed = federation_of(first)
    sent = result("alice", 0, value=2.5)
    assert fed.submit(sent)
    assert fed.submit(result("alice", 0, AMV, metrics={"accuracy": 0.5}))
    first.close()

    again = open_state(tmp_path / "out")
    try:
        assert not again.recovered.fresh
        fed = federation_of(again)
        assert fed.round_number == 0
        assert [(a.collaborator, a.task_name) for a in fed.accepted()] == [
            ("alice", AMV),
            ("alice", "train"),
        ]
        stored = {r.task_name: r for r in fed.results()}["train"]
        assert stored.data_size == sent.data_size
        by_name = {t.name: t for t in stored.tensors}
        for tensor in sent.tensors:
            assert by_name[tensor.name].array.tobytes() == tensor.array.tobytes()
            assert by_name[tensor.name].array.dtype == tensor.array.dtype
            assert tensor.tags <= by_name[tensor.name].tags
        assert fed.assignment("alice").tasks == ()  # nothing owed: she is done with round 0
        assert fed.assignment("bob").tasks == TASKS
    finally:
        again.close()


def test_acknowledged_result_resent_after_a_restart_counts_once(tmp_path: Path) -> None:
    """A result acknowledged before the crash and sent again after it is answered OK, not stored twice."""
    first = open_state(tmp_path / "out")
    assert federation_of(first).submit(result("alice", 0, value=1.0))
    first.close()
    again = open_state(tmp_path / "out")
    try:
        fed = federation_of(again)
        before = files(tmp_path / "out")
        assert fed.submit(result("alice", 0, value=99.0)) is False
        assert files(tmp_path / "out") == before
        assert len(fed.accepted()) == 1
        assert fed.results()[0].tensors[0].array.flat[0] != 99.0
    finally:
        again.close()


def test_result_in_flight_at_the_crash_is_stored_once_when_resent(tmp_path: Path) -> None:
    """A result whose file was written but whose row was not committed is gone after a restart; its resend is stored once."""
    first = open_state(tmp_path / "out")
    staged = first.stage(result("bob", 0))  # the crash comes before `record`
    stray = tmp_path / "out" / "state" / staged.handle.name  # type: ignore[attr-defined]
    assert stray.exists()
    first.close()
    again = open_state(tmp_path / "out")
    try:
        assert not stray.exists()
        fed = federation_of(again)
        assert fed.accepted() == ()
        assert fed.submit(result("bob", 0)) is True
        assert fed.submit(result("bob", 0)) is False
        assert len(fed.accepted()) == 1
    finally:
        again.close()


def test_another_federation_uuid_is_refused(tmp_path: Path) -> None:
    """A folder holding another federation's state is refused with both uuids and the folder named."""
    open_state(tmp_path / "out").close()
    with pytest.raises(ForeignStateError) as refused:
        open_state(tmp_path / "out", uuid="someone-else")
    message = str(refused.value)
    assert str(tmp_path / "out") in message
    assert UUID in message and "someone-else" in message
    # The refusal changed nothing: the right uuid still opens it.
    open_state(tmp_path / "out").close()


def test_outputs_without_state_are_refused(tmp_path: Path) -> None:
    """A folder with a metrics.jsonl but no state (another run's outputs) is refused, not mixed in."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"round": 0}\n', encoding="utf-8")
    with pytest.raises(ForeignStateError, match=r"metrics\.jsonl of an earlier run"):
        open_state(folder)
    assert not (folder / "state").exists()


def test_reset_starts_over(tmp_path: Path) -> None:
    """`reset` removes the state and the outputs, keeps other files, and opens a new state at round 0."""
    folder = tmp_path / "out"
    first = open_state(folder)
    fed = federation_of(first)
    for name in COLLABORATORS:
        report(fed, name, metrics=scores(1.0))
    assert fed.close_round_if_due() is not None
    first.close()
    for name in ("last_model.pbuf", "best_model.pbuf", "metrics.jsonl", "notes.txt"):
        (folder / name).write_bytes(b"x")
    again = open_state(folder, uuid="another-federation", reset=True)
    try:
        assert again.recovered.fresh and again.recovered.progress.round_number == 0
        assert sorted(path.name for path in folder.iterdir()) == ["notes.txt", "state"]
    finally:
        again.close()


def test_one_aggregator_per_folder(state: DurableState) -> None:
    """While a state is open, opening the same folder again is refused."""
    with pytest.raises(StorageError, match="another aggregator"):
        open_state(state.folder)


def test_old_round_files_are_removed_after_each_commit(state: DurableState) -> None:
    """After each close only the new round's model (and the best model) are on disk; no result files."""
    fed = federation_of(state)
    assert state.disk_files() == ["models/round-0.pbuf"]
    for round_number, value in ((0, 1.0), (1, 2.0), (2, 3.0)):
        for name in COLLABORATORS:
            report(fed, name, value=value, metrics=scores(value))
        results = [
            name for name in state.disk_files() if name.startswith(f"rounds/{round_number}/")
        ]
        assert len(results) == len(TASKS) * len(COLLABORATORS)
        summary = fed.close_round_if_due()
        assert summary is not None and summary.round_number == round_number
        models = [name for name in state.disk_files() if name.startswith("models/")]
        assert state.disk_files() == models, "result files left behind"
        assert f"models/round-{round_number + 1}.pbuf" in models
        assert len(models) <= 2  # the current model and the best one
    assert fed.model()["w"].tolist() == [[3.0, 3.0], [3.0, 3.0]]


class Crash(BaseException):
    """Stands in for SIGKILL at a failpoint, in-process."""


def crash_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Make failpoint `point` raise `Crash` in the aggregator's modules."""

    def fire(name: str) -> None:
        if name == point:
            raise Crash(name)

    for module in (
        "foedus.aggregator.state",
        "foedus.aggregator.closing",
        "foedus.aggregator.storage",
    ):
        monkeypatch.setattr(f"{module}.failpoint", fire)


def start_round_zero(folder: Path) -> tuple[DurableState, Federation]:
    """A new state in `folder` whose round 0 alice and bob reported (due to close: 2 of 3)."""
    state = open_state(folder)
    fed = federation_of(state, straggler=TWO_OF_THREE)
    for name, value in (("alice", 1.0), ("bob", 4.5)):
        report(fed, name, value=value, metrics=scores(value))
    return state, fed


@pytest.mark.parametrize("point", ["while_aggregating", "before_round_commit"])
def test_a_close_cut_short_is_redone_with_the_same_reporters_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """A crash while aggregating or before the commit: after a restart the round closes at once, same reporters, same bytes."""
    state, fed = start_round_zero(tmp_path / "reference")
    summary = fed.close_round_if_due()
    assert summary is not None
    reference = model_bytes(summary.model)
    state.close()

    state, fed = start_round_zero(tmp_path / "out")
    with monkeypatch.context() as patch:
        crash_at(patch, point)
        with pytest.raises(Crash):
            fed.close_round_if_due()
    state.close()

    state = open_state(tmp_path / "out")
    try:
        assert state.recovered.progress.closing == ("alice", "bob")
        # Every collaborator may report now (wait_for_all), but the decided close stands.
        fed = federation_of(state)
        assert fed.assignment("carol").tasks == ()  # the round is closing: nothing handed out
        with pytest.raises(PreconditionError, match="round 0 is closed"):
            fed.submit(result("carol", 0))
        summary = fed.close_round_if_due()
        assert summary is not None
        assert (summary.reporters, summary.missing) == (("alice", "bob"), ("carol",))
        assert model_bytes(summary.model) == reference
        assert fed.round_number == 1
        assert [name for name in state.disk_files() if name.startswith("rounds/")] == []
    finally:
        state.close()


def test_a_corrupt_result_file_is_dropped_and_asked_for_again(tmp_path: Path) -> None:
    """A result file that no longer matches its digest is dropped at restart, and its task is owed again."""
    first = open_state(tmp_path / "out")
    fed = federation_of(first)
    assert fed.submit(result("carol", 0, value=3.0))
    (path,) = (tmp_path / "out" / "state" / "rounds" / "0").iterdir()
    first.close()
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    again = open_state(tmp_path / "out")
    try:
        assert again.recovered.dropped == ("rounds/0/carol-train.pbuf",)
        fed = federation_of(again)
        assert fed.accepted() == ()
        assert fed.assignment("carol").tasks == TASKS
    finally:
        again.close()


def runtime_for(state: DurableState, folder: Path) -> Runtime:
    """A runtime writing to `folder` for the federation in `state`, with a plan of uuid UUID."""
    plan = make_plan(None, federation={"uuid": UUID, "rounds": 3})
    fed = federation_of(state)
    return Runtime(plan, fed, OutputFolder(folder))


def metrics_rounds(folder: Path) -> list[int]:
    """The round of each row of metrics.jsonl."""
    lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["round"] for line in lines]


def test_restore_rewrites_outputs_a_crash_left_behind(tmp_path: Path) -> None:
    """After a crash while saving, a restart rewrites last/best model and adds the lost metrics row, never a duplicate."""
    folder = tmp_path / "out"
    state = open_state(folder)
    runtime = runtime_for(state, folder)
    for round_number, value in ((0, 1.0), (1, 2.0)):
        for name in COLLABORATORS:
            report(runtime.federation, name, value=value, metrics=scores(value))
        summary = runtime.federation.close_round_if_due()
        assert summary is not None
        if round_number == 0:
            runtime.record(summary)
    state.close()
    # Round 1 was committed, then the crash: its outputs were never written, and round 0's
    # metrics row was cut short on a retry, beside a half-written temporary model.
    last = (folder / "last_model.pbuf").read_bytes()
    with (folder / "metrics.jsonl").open("a", encoding="utf-8") as metrics:
        metrics.write('{"federation": "durable-0001", "rou')
    (folder / ".last_model.pbuf.abc.tmp").write_bytes(b"half")

    state = open_state(folder)
    try:
        runtime = runtime_for(state, folder)
        runtime.restore()
        assert metrics_rounds(folder) == [0, 1]
        assert not (folder / ".last_model.pbuf.abc.tmp").exists()
        model = state.recovered.progress.model
        assert (folder / "last_model.pbuf").read_bytes() == model_bytes(model, round_number=2)
        assert (folder / "last_model.pbuf").read_bytes() != last
        # Round 1's validation (of the model after one round) was the best: 0.1 -> 0.2.
        best = state.recovered.progress.best
        assert best is not None and best.training_rounds == 1
        best_model = state.best_model()
        assert best_model is not None
        assert (folder / "best_model.pbuf").read_bytes() == model_bytes(best_model, round_number=1)
        runtime.restore()  # a second restart adds nothing
        assert metrics_rounds(folder) == [0, 1]
    finally:
        state.close()


def test_each_sites_metrics_survive_a_restart_and_older_records_still_load(tmp_path: Path) -> None:
    """The sites' own metrics of a round committed before a crash come back in its rewritten
    metrics row; a record kept without them (by an earlier aggregator) loads with none."""
    folder = tmp_path / "out"
    state = open_state(folder)
    runtime = runtime_for(state, folder)

    def sites(round_number: int) -> dict[str, dict[str, dict[str, float]]]:
        """What each collaborator sent in `round_number` (exact in float32)."""
        return {
            name: {AMV: {"accuracy": (index + 1) / 8 + round_number / 4}, "train": {"loss": 1.0}}
            for index, name in enumerate(COLLABORATORS)
        }

    for round_number in (0, 1):
        for name, tasks in sites(round_number).items():
            accuracy = tasks[AMV]["accuracy"]
            for task in TASKS:
                metrics = {"accuracy": accuracy} if task == AMV else {"loss": 1.0}
                assert runtime.federation.submit(result(name, round_number, task, metrics=metrics))
        summary = runtime.federation.close_round_if_due()
        assert summary is not None and summary.record.sites == sites(round_number)
        if round_number == 0:
            runtime.record(summary)  # round 1 is committed, then the crash: no row
    state.close()

    state = open_state(folder)
    try:
        assert [r.sites for r in state.recovered.records] == [sites(0), sites(1)]
        runtime_for(state, folder).restore()
    finally:
        state.close()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["sites"]) for row in rows] == [(0, sites(0)), (1, sites(1))]
    assert rows[1]["metrics"][AMV] == {"accuracy": pytest.approx(0.5)}  # the mean, as before

    # Round 0's record as an aggregator before per-site metrics kept it; its row lost too.
    database = sqlite3.connect(folder / "state" / "state.sqlite", isolation_level=None)
    try:
        (text,) = database.execute("SELECT record FROM closed_rounds WHERE round = 0").fetchone()
        old = {key: value for key, value in json.loads(text).items() if key != "sites"}
        database.execute("UPDATE closed_rounds SET record = ? WHERE round = 0", (json.dumps(old),))
    finally:
        database.close()
    (folder / "metrics.jsonl").unlink()
    state = open_state(folder)
    try:
        assert [r.sites for r in state.recovered.records] == [{}, sites(1)]
        runtime_for(state, folder).restore()
    finally:
        state.close()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [(row["round"], row["sites"]) for row in rows] == [(0, {}), (1, sites(1))]


def test_failpoints_parse_and_refuse_unknown_names() -> None:
    """FOEDUS_FAILPOINTS arms named points with counts; unknown names and bad counts are refused; unset arms none."""
    assert failpoints.parse("after_accept:3, while_saving:1") == {
        "after_accept": 3,
        "while_saving": 1,
    }
    with pytest.raises(failpoints.FailpointError, match="unknown failpoint 'after_acept'"):
        failpoints.parse("after_acept:3")
    with pytest.raises(failpoints.FailpointError, match="count of 1 or more"):
        failpoints.parse("while_saving:0")
    environment: Mapping[str, str] = {
        k: v for k, v in os.environ.items() if k != "FOEDUS_FAILPOINTS"
    }
    assert failpoints.configure(environment) == {}
    failpoints.failpoint("after_accept")  # unarmed: nothing happens


def test_staged_results_keep_no_reference_to_their_arrays(state: DurableState) -> None:
    """Once a result is on disk, neither the store nor the federation holds its arrays."""
    fed = federation_of(state)
    sent = result("alice", 0)
    watched = [weakref.ref(tensor.array) for tensor in sent.tensors]
    assert fed.submit(sent)
    del sent
    gc.collect()
    assert all(ref() is None for ref in watched)


def streamed(fed: Federation, state: DurableState, sent: TaskResult) -> TaskResult:
    """`sent` as the servicer hands it over: received into the state's upload folder as a stream."""
    results = aggregator_pb2.TaskResults(
        round_number=sent.round_number, task_name=sent.task_name, data_size=sent.data_size
    )
    for tensor in sent.tensors:
        results.tensors.append(encode_tensor(tensor.name, tensor.array, tags=tensor.tags))
    data = results.SerializeToString()
    assert state.upload_folder is not None
    received = receive_upload(
        (data[start : start + 100] for start in range(0, len(data), 100)),
        state.upload_folder,
        on_head=lambda head: None,
        model_dtype=fed.model_dtype,
        max_tensor_bytes=2**20,
    )
    return dataclasses.replace(sent, tensors=received.tensors, upload=received.file)


def test_a_streamed_upload_is_kept_as_it_arrived(tmp_path: Path) -> None:
    """The upload's own file becomes the result's (renamed, not written again) and survives a restart."""
    first = open_state(tmp_path / "out")
    fed = federation_of(first)
    sent = streamed(fed, first, result("bob", 0, value=1.5, metrics={"loss": 1.0}))
    assert sent.upload is not None
    spooled = os.stat(sent.upload.path)
    assert fed.submit(sent)
    kept = tmp_path / "out" / "state" / "rounds" / "0" / "bob-train.upload"
    assert os.stat(kept).st_ino == spooled.st_ino
    assert not sent.upload.path.exists()
    leftover = tmp_path / "out" / "state" / "uploads" / ".upload-cut-by-a-crash.tmp"
    leftover.write_bytes(b"half an upload")
    first.close()

    again = open_state(tmp_path / "out")
    try:
        assert not leftover.exists()
        fed = federation_of(again)
        (stored,) = fed.results()
        by_name = {tensor.name: tensor.array for tensor in stored.tensors}
        np.testing.assert_array_equal(by_name["w"], np.full((2, 2), 1.5, np.float32))
        assert by_name["b"].dtype == np.float64 and float(by_name["loss"]) == 1.0
    finally:
        again.close()
    kept.write_bytes(kept.read_bytes()[:-1] + b"x")
    damaged = open_state(tmp_path / "out")
    try:
        assert damaged.recovered.dropped == ("rounds/0/bob-train.upload",)
    finally:
        damaged.close()


def test_the_global_model_is_held_mapped_from_its_file(tmp_path: Path) -> None:
    """From the start and after each close, the model is the state's file mapped, not arrays of ours."""
    large = {"w": np.arange(100_000, dtype=np.float32), "b": np.zeros(2, np.float64)}
    state = DurableState.open(tmp_path / "out", UUID, lambda: large, max_tensor_bytes=2**20)
    try:
        fed = Federation(
            collaborators=("alice",),
            tasks=("train",),
            rounds=2,
            model=large,
            store=state,
            progress=state.recovered.progress,
        )
        [(_, first)] = fed.global_tensors(["w"], 0)
        assert isinstance(first, np.memmap) and first.filename is not None
        assert Path(first.filename).parent == state.root / "models"
        trained = (
            ResultTensor("w", frozenset(), first + 1),
            ResultTensor("b", frozenset(), np.ones(2)),
        )
        assert fed.submit(TaskResult("alice", 0, "train", 5, trained))
        assert fed.close_round_if_due() is not None
        [(_, after)] = fed.global_tensors(["w"], 1)
        assert isinstance(after, np.memmap) and after.filename not in (None, first.filename)
        np.testing.assert_array_equal(after, large["w"] + 1)
    finally:
        state.close()


def test_a_state_named_by_sha256_is_migrated_and_resumes(tmp_path: Path) -> None:
    """A version-2 state (SHA-256) opens as the newest with each file's BLAKE3, and resumes as it was."""
    folder = tmp_path / "out"
    state = open_state(folder)
    fed = federation_of(state)
    for name in COLLABORATORS:
        report(fed, name, value=2.0, metrics=scores(2.0))
    assert fed.close_round_if_due() is not None
    report(fed, "alice", value=3.0, metrics=scores(3.0))
    model = {name: np.array(array) for name, array in fed.model().items()}
    state.close()
    digests = named_by_sha256(folder / "state")
    assert schema_of(folder) == (
        2,
        ["round", "collaborator", "task", "data_size", "file", "sha256"],
    )

    again = open_state(folder)
    try:
        assert schema_of(folder) == (
            SCHEMA_VERSION,
            ["round", "collaborator", "task", "data_size", "file", "digest"],
        )
        for name, digest in digests.items():
            if (folder / "state" / name).exists():
                assert file_digest(folder / "state" / name) == digest, name
        assert again.recovered.dropped == ()
        fed = federation_of(again)
        assert fed.round_number == 1
        assert [(a.collaborator, a.task_name) for a in fed.accepted()] == [
            ("alice", AMV),
            ("alice", "train"),
        ]
        assert {name: np.array(array) for name, array in fed.model().items()}.keys() == model.keys()
        for name, array in fed.model().items():
            assert np.array_equal(array, model[name]), name
    finally:
        again.close()
    reopened = open_state(folder)  # the newest version now: opened as it is
    reopened.close()


def test_a_file_that_failed_its_sha256_still_fails_after_the_migration(tmp_path: Path) -> None:
    """A result file that no longer matches its SHA-256 is not blessed by the migration: dropped."""
    folder = tmp_path / "out"
    state = open_state(folder)
    fed = federation_of(state)
    assert fed.submit(result("carol", 0, value=3.0))
    assert fed.submit(result("bob", 0, value=1.0))
    state.close()
    named_by_sha256(folder / "state")
    path = folder / "state" / "rounds" / "0" / "carol-train.pbuf"
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    again = open_state(folder)
    try:
        assert again.recovered.dropped == ("rounds/0/carol-train.pbuf",)
        assert [(a.collaborator, a.task_name) for a in federation_of(again).accepted()] == [
            ("bob", "train")
        ]
    finally:
        again.close()


def test_status_reads_what_the_open_store_says(tmp_path: Path) -> None:
    """Read-only from its folder (``aggregator status``), the state stands as the open store
    says, with the aggregator running; once closed, the same with it stopped."""
    folder = tmp_path / "out"
    state = open_state(folder)
    try:
        fed = federation_of(state, straggler=TWO_OF_THREE)
        for name in ("alice", "bob"):
            report(fed, name, value=2.0, metrics=scores(2.0))
        assert fed.close_round_if_due() is not None
        report(fed, "alice", value=3.0, metrics=scores(3.0))
        assert fed.leave("carol", "the disk is full")
        state.save_presence(fed.liveness.snapshot(), saved=50.0)
        standing = state.standing()
        assert standing.round_number == 1 and standing.last_round is not None
        assert standing.results == (("alice", AMV), ("alice", "train"))
        assert [d.name for d in standing.departures] == ["carol"]
        assert DurableState.read_standing(folder) == standing
    finally:
        state.close()
    assert DurableState.read_standing(folder) == dataclasses.replace(standing, running=False)
    assert DurableState.read_standing(tmp_path / "elsewhere") is None
