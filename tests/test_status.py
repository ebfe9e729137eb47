"""``aggregator status``: read from the durable state while the aggregator runs or after it stopped;
presence saved by the aggregator; a folder that is not a foedus state is one line, exit 2."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foedus.aggregator.cli import main
from foedus.aggregator.federation import Federation
from foedus.aggregator.inspection import CollaboratorStatus, FederationStatus, read_status
from foedus.aggregator.liveness import Liveness
from foedus.aggregator.records import ResultTensor, TaskResult
from foedus.aggregator.schema import SCHEMA_VERSION
from foedus.aggregator.state import DurableState
from foedus.aggregator.state_files import DATABASE, STATE_DIR
from foedus.history.rows import METRICS, MetricsRow, append_row
from foedus.pki.layout import CertsLayout
from foedus.plans import load_plan
from foedus.privacy.site_budget import SiteBudget
from foedus.refusals.errors import StorageError

from old_states import named_by_sha256
from test_aggregator_cli import serve_in_process, watchdog, write_plan

__all__ = ["watchdog"]  # the fixture, used by name
TESTS = Path(__file__).resolve().parent


def status(capsys: pytest.CaptureFixture[str], plan: Path, *extra: str) -> tuple[int, str, str]:
    """`aggregator status --plan PLAN` in-process: exit code, stdout, stderr."""
    code = main(["status", "--plan", str(plan), *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def state_files(plan: Path) -> list[str]:
    """The files in the plan's state folder, sorted (a reader must not add any)."""
    root = load_plan(plan).aggregator.output_dir / STATE_DIR
    return sorted(path.name for path in root.iterdir())


@pytest.mark.usefixtures("watchdog")
def test_status_of_a_finished_federation(
    tmp_path: Path,
    certs: CertsLayout,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After a whole federation: finished, not running, the final round's metrics, everyone seen."""
    plan = write_plan(tmp_path, certs, federation={"rounds": 1})
    assert serve_in_process(plan, certs, monkeypatch)[0] == 0
    monkeypatch.undo()  # stdout back to capsys
    before = state_files(plan)
    code, out, err = status(capsys, plan, "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["finished"] is True and report["aggregator_running"] is False
    assert (report["round"], report["rounds"], report["total_rounds"]) == (2, 1, 2)
    last = report["last_round"]
    assert last["final_validation"] is True and last["round"] == 1
    assert last["reporters"] == ["alice", "bob", "carol"]
    assert last["metrics"] == {"aggregated_model_validation": {"accuracy": pytest.approx(0.1)}}
    assert [c["name"] for c in report["collaborators"]] == ["alice", "bob", "carol"]
    assert {c["presence"] for c in report["collaborators"]} == {"online"}  # when it stopped
    assert all(c["since"] and c["last_seen"] for c in report["collaborators"])
    assert report["offline_after_seconds"] == 60  # the plan sets none: status's own threshold

    code, out, err = status(capsys, plan)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == (
        "federation test (test-federation-0001): finished (1 round); aggregator stopped"
    )
    assert "  last closed: final validation, reported alice,bob,carol, " in out
    assert "    aggregated_model_validation: accuracy 0.1000" in lines
    # Online to the aggregator when it stopped, not "online since": nobody is online to it now.
    assert any(line.startswith("    alice  was online, last seen ") for line in lines), lines
    assert not any(" online since " in line for line in lines), lines
    assert state_files(plan) == before  # read as immutable: no -wal or -shm made


def tiny_result(name: str, task: str = "train") -> TaskResult:
    """`name`'s result for `task` of round 0 of the tiny model."""
    tensors = [ResultTensor("accuracy", frozenset({"metric"}), np.array(0.5, np.float32))]
    if task == "train":
        tensors = [ResultTensor("w", frozenset({"trained"}), np.ones(3, np.float32))]
    return TaskResult(name, 0, task, 10, tuple(tensors))


def test_status_reads_a_running_aggregators_state_without_disturbing_it(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """While the state is open and written (results accepted, presence saved), status reads it
    again and again; neither side fails, and status sees what was committed."""
    plan_path = write_plan(tmp_path, certs)
    plan = load_plan(plan_path)
    model = {"w": np.zeros(3, np.float32)}
    state = DurableState.open(
        plan.aggregator.output_dir, plan.federation.uuid, lambda: model, max_tensor_bytes=2**20
    )
    with state:
        progress = state.recovered.progress
        federation = Federation.from_plan(plan, progress.model, store=state, progress=progress)
        liveness = Liveness(plan.collaborators, 60)
        liveness.seen("alice")
        state.save_presence(liveness.snapshot())
        assert federation.submit(tiny_result("alice"))

        seen = read_status(plan)
        assert seen.running and not seen.finished and seen.round_number == 0
        alice = seen.collaborators[0]
        assert (alice.name, alice.presence, alice.results) == ("alice", "online", ("train",))
        assert seen.collaborators[1].presence == "not heard from"
        assert seen.reported == ()  # alice owes two more tasks

        failures: list[BaseException] = []
        reads = 0
        done = threading.Event()

        def keep_reading() -> None:
            nonlocal reads
            try:
                while not done.is_set() and reads < 10_000:
                    read_status(plan)
                    reads += 1
            except BaseException as error:
                failures.append(error)

        reader = threading.Thread(target=keep_reading)
        reader.start()
        try:
            for task in ("aggregated_model_validation", "locally_tuned_model_validation"):
                assert federation.submit(tiny_result("alice", task))
            for _ in range(50):
                liveness.seen("bob")
                state.save_presence(liveness.snapshot())
        finally:
            done.set()
            reader.join(30)
        assert failures == [] and reads > 0
        seen = read_status(plan)
        assert seen.reported == ("alice",)
        assert seen.collaborators[1].presence == "online"


def test_status_reads_the_last_commits_of_a_killed_aggregator(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """An aggregator killed before folding its write-ahead log in: status still reads what it
    committed last (alice's result, her presence)."""
    plan_path = write_plan(tmp_path, certs)
    plan = load_plan(plan_path)
    script = f"""
import os
import numpy as np
from foedus.aggregator.federation import Federation
from foedus.aggregator.liveness import Liveness
from foedus.aggregator.state import DurableState
from foedus.plans import load_plan
from foedus.privacy.site_budget import SiteBudget
from test_status import tiny_result

plan = load_plan({str(plan_path)!r})
state = DurableState.open(
    plan.aggregator.output_dir, plan.federation.uuid, lambda: {{"w": np.zeros(3, np.float32)}},
    max_tensor_bytes=2**20,
)
progress = state.recovered.progress
federation = Federation.from_plan(plan, progress.model, store=state, progress=progress)
liveness = Liveness(plan.collaborators, 60)
liveness.seen("alice")
state.save_presence(liveness.snapshot())
assert federation.submit(tiny_result("alice"))
os._exit(0)  # as kill -9: nothing closed, the log not folded in
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])},
    )
    assert done.returncode == 0, done.stderr
    assert (plan.aggregator.output_dir / STATE_DIR / f"{DATABASE}-wal").exists()
    seen = read_status(plan)
    assert not seen.running
    alice = seen.collaborators[0]
    assert (alice.presence, alice.results) == ("online", ("train",))


def test_no_state_folder_is_one_line_exit_2(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plan whose output folder holds no state: one line naming it, exit 2, nothing created."""
    plan = write_plan(tmp_path, certs)
    code, out, err = status(capsys, plan)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"aggregator: error: {tmp_path / 'out' / 'state'}: no aggregator state there "
        f"(aggregator.output_dir of {plan}; 'aggregator start --plan {plan}' makes it)"
    ]
    assert not (tmp_path / "out").exists()


def fake_database(folder: Path, make: Any) -> None:
    """A state.sqlite in folder/state made by `make` (bytes, or a function of a connection)."""
    root = folder / STATE_DIR
    root.mkdir(parents=True)
    if isinstance(make, bytes):
        (root / DATABASE).write_bytes(make)
        return
    connection = sqlite3.connect(root / DATABASE)
    make(connection)
    connection.commit()
    connection.close()


@pytest.mark.parametrize(
    ("make", "words"),
    [
        pytest.param(b"not a database at all " * 100, "file is not a database", id="garbage"),
        pytest.param(lambda db: db.execute("CREATE TABLE x (y)"), "schema version 0", id="other"),
        pytest.param(
            lambda db: db.executescript("CREATE TABLE x (y); PRAGMA user_version = 1;"),
            "no such table: federation",
            id="version-1-without-tables",
        ),
        pytest.param(
            lambda db: db.execute("PRAGMA user_version = 7"), "schema version 7", id="newer"
        ),
    ],
)
def test_a_state_that_is_not_foedus_s_is_one_line_exit_2(
    tmp_path: Path,
    certs: CertsLayout,
    capsys: pytest.CaptureFixture[str],
    make: Any,
    words: str,
) -> None:
    """A state.sqlite that is no foedus state: one line, exit 2."""
    plan = write_plan(tmp_path, certs)
    fake_database(tmp_path / "out", make)
    code, out, err = status(capsys, plan)
    assert code == 2 and out == "", err
    [line] = err.splitlines()
    assert line.startswith("aggregator: error: ") and "not a foedus aggregator state" in line
    assert words in line


def test_the_state_of_another_federation_is_one_line_exit_2(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state of another federation uuid in the plan's folder: named, exit 2."""
    plan = write_plan(tmp_path, certs)
    DurableState.open(
        tmp_path / "out", "another", lambda: {"w": np.zeros(3, np.float32)}, max_tensor_bytes=64
    ).close()
    code, _, err = status(capsys, plan)
    assert code == 2
    assert err.splitlines() == [
        f"aggregator: error: {tmp_path / 'out' / 'state' / DATABASE}: the state of federation "
        "'another', not of this plan's 'test-federation-0001'"
    ]


def test_a_bad_plan_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plan that does not load: its problems, exit 2."""
    code, _, err = status(capsys, tmp_path / "missing.yaml")
    assert code == 2 and err.splitlines() == [f"{tmp_path / 'missing.yaml'}: file not found"]


def test_a_version_1_state_is_read_and_migrated(tmp_path: Path, certs: CertsLayout) -> None:
    """A state from before presence (schema 1) is read by status, then migrated when opened."""
    plan = load_plan(write_plan(tmp_path, certs))
    folder = plan.aggregator.output_dir
    model = {"w": np.zeros(3, np.float32)}
    DurableState.open(folder, plan.federation.uuid, lambda: model, max_tensor_bytes=64).close()
    database = folder / STATE_DIR / DATABASE
    named_by_sha256(folder / STATE_DIR, version=1)  # no presence, files named by SHA-256

    old = read_status(plan)
    assert {c.presence for c in old.collaborators} == {"unknown"} and old.presence_saved is None

    with DurableState.open(
        folder, plan.federation.uuid, lambda: model, max_tensor_bytes=64
    ) as state:
        assert state.recovered.progress.round_number == 0 and not state.recovered.fresh
        state.save_presence(Liveness(plan.collaborators, 60).snapshot())
    connection = sqlite3.connect(database)
    assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    connection.close()
    assert {c.presence for c in read_status(plan).collaborators} == {"not heard from"}


def test_a_newer_schema_is_refused_by_the_aggregator(tmp_path: Path) -> None:
    """A state written by a newer aggregator (a schema version above ours) is not opened, and says why."""
    model = {"w": np.zeros(3, np.float32)}
    DurableState.open(tmp_path, "f", lambda: model, max_tensor_bytes=64).close()
    connection = sqlite3.connect(tmp_path / STATE_DIR / DATABASE)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(
        StorageError,
        match=f"schema version {SCHEMA_VERSION + 1}; this aggregator reads versions up to "
        f"{SCHEMA_VERSION}",
    ):
        DurableState.open(tmp_path, "f", lambda: model, max_tensor_bytes=64)


def test_status_help_names_its_options_and_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`status --help` exits 0 and says what it reads and what its exit statuses mean."""
    assert main(["status", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--plan", "--json", "without any RPC", "exit status", "no state of this plan"):
        assert text in out, text


def test_presence_reads_as_of_now_running_or_stopped(tmp_path: Path) -> None:
    """Running: "online since T"; stopped: "was online, last seen T"; offline ones say both."""
    collaborators = (
        CollaboratorStatus("alice", "online", since=1000.0, last_seen=1050.0, results=()),
        CollaboratorStatus("bob", "offline", since=900.0, last_seen=880.0, results=()),
    )
    status = FederationStatus(
        name="f",
        uuid="u",
        state=tmp_path,
        running=True,
        round_number=0,
        rounds=1,
        total_rounds=1,
        round_tasks=("train",),
        closing=False,
        collaborators=collaborators,
        offline_after_seconds=60,
        presence_saved=1050.0,
        last_round=None,
    )
    running = status.lines(now=1060.0)
    assert running[0].endswith("; aggregator running")
    assert "    alice  online since 1970-01-01 00:16:40 UTC (60 s ago)" in running
    stopped = dataclasses.replace(status, running=False).lines(now=1060.0)
    assert stopped[0].endswith("; aggregator stopped")
    assert "    alice  was online, last seen 1970-01-01 00:17:30 UTC (10 s ago)" in stopped
    offline = "    bob    offline since 1970-01-01 00:15:00 UTC (3 min ago), last seen "
    assert any(line.startswith(offline) for line in running)
    assert any(line.startswith(offline) for line in stopped)


def test_each_sites_latest_budget_is_read_from_metrics_jsonl_and_outlives_the_last_round(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Sites that train with DP-SGD: each one's latest budget from metrics.jsonl, a line each
    ("alice: epsilon 2.10 of 8 at delta 1e-05, as of round 2") and `--json`'s `site_budgets`,
    still there after the final validation round, which nobody trains; a site without one has
    none."""
    plan = load_plan(write_plan(tmp_path, certs))
    model = {"w": np.zeros(3, np.float32)}
    DurableState.open(
        plan.aggregator.output_dir, plan.federation.uuid, lambda: model, max_tensor_bytes=2**20
    ).close()
    first = {"alice": SiteBudget(1.5, 1e-5, 8.0), "carol": SiteBudget(3.0, 1e-6)}
    rows = [
        MetricsRow(
            0, sites={n: {"train": {"loss": 0.5, **b.to_metrics()}} for n, b in first.items()}
        ),
        MetricsRow(
            1,
            sites={
                "alice": {"train": SiteBudget(2.1, 1e-5, 8.0).to_metrics()},
                "bob": {"train": {"loss": 0.4}},
            },
        ),
        MetricsRow(
            2,
            final_validation=True,
            sites={"alice": {"aggregated_model_validation": {"accuracy": 0.9}}},
        ),
    ]
    for row in rows:
        append_row(plan.aggregator.output_dir / METRICS, row)
    status = read_status(plan)
    lines = status.lines(now=0.0)
    at = lines.index("  sites' own privacy budgets (DP-SGD):")
    assert lines[at + 1 :] == [
        "    alice: epsilon 2.10 of 8 at delta 1e-05, as of round 2",
        "    carol: epsilon 3.00 at delta 1e-06, as of round 1",
    ]
    assert status.to_json()["site_budgets"] == [
        {"site": "alice", "round": 2, "epsilon": 2.1, "delta": 1e-5, "max_epsilon": 8.0},
        {"site": "carol", "round": 1, "epsilon": 3.0, "delta": 1e-6, "max_epsilon": None},
    ]
