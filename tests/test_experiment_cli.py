"""The experiment command against a real director over mTLS: tables, --json, exit codes."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from foedus.command.usage import fail
from foedus.experiment import show
from foedus.experiment.cli import main
from foedus.pki.layout import CertsLayout
from foedus.privacy.accountant import epsilon_after
from foedus.privacy.site_budget import SiteBudget
from foedus.processes.children import Ended
from foedus.protos import director_pb2 as pb

from directors import (
    ADMIN,
    ENVOYS,
    Director,
    RecordingLauncher,
    running_director,
    submitted_plan,
)
from federation_processes import run_module

REPO = Path(__file__).resolve().parent.parent
WAIT_SECONDS = 30


@pytest.fixture
def launcher() -> RecordingLauncher:
    """A launcher that starts nothing."""
    return RecordingLauncher()


@pytest.fixture
def director(
    tmp_path: Path, director_certs: CertsLayout, launcher: RecordingLauncher
) -> Iterator[Director]:
    """A director with automatic review, its envoys registered."""
    with registered_director(tmp_path, director_certs, launcher) as running:
        yield running


@contextmanager
def registered_director(
    tmp_path: Path, director_certs: CertsLayout, launcher: RecordingLauncher, **changes: Any
) -> Iterator[Director]:
    """A director with automatic review (director.yaml changed by `changes`), envoys registered."""
    with running_director(
        tmp_path / "director",
        director_certs,
        launcher=launcher,
        # The envoys register once and never beat: online for 20 minutes, not 2 s, however slow
        # the machine is between their registration and a test's look.
        health_check_seconds=600,
        **changes,
    ) as running:
        for name in ENVOYS:
            running.stub(name, role="envoy").RegisterEnvoy(
                pb.RegisterEnvoyRequest(
                    shard=pb.ShardInfo(description=f"{name}'s digits", train_samples=500)
                ),
                timeout=20,
            )
        yield running


def client_config(folder: Path, director: Director, name: str) -> Path:
    """The experiment command's config for `name`."""
    path = folder / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "director": f"localhost:{director.port}",
                "certs_dir": str(director.certs.root),
                "name": name,
            }
        ),
        encoding="utf-8",
    )
    return path


def run(config: Path, *argv: str) -> tuple[int, str]:
    """main(argv) in-process; its exit code and what it printed."""
    out = io.StringIO()
    code = main(["--config", str(config), *argv], out=out)
    return code, out.getvalue()


def write_plan(folder: Path, **sections: object) -> Path:
    """A submittable plan file."""
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(submitted_plan(**sections)), encoding="utf-8")  # type: ignore[arg-type]
    return path


def test_submit_list_status_and_a_run_to_its_model(
    tmp_path: Path, director: Director, launcher: RecordingLauncher
) -> None:
    """Submit, see it listed and its sites, follow it to completed, then metrics and download."""
    ada = client_config(tmp_path, director, "ada")
    code, out = run(ada, "submit", str(write_plan(tmp_path)), "--name", "digits")
    assert code == 0, out
    experiment_id = out.split()[0]
    code, out = run(ada, "list")
    assert code == 0 and experiment_id in out and "digits" in out and "ada" in out
    assert out.splitlines()[0].split() == ["ID", "NAME", "OWNER", "STATE", "ROUNDS", "SUBMITTED"]
    code, out = run(ada, "--json", "status", experiment_id)
    assert code == 0 and json.loads(out)["experiment_id"] == experiment_id

    deadline = time.monotonic() + WAIT_SECONDS
    while not launcher.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for name in ENVOYS:
        director.stub(name, role="envoy").ReportCollaborator(
            pb.CollaboratorReport(experiment_id=experiment_id, state=pb.COLLABORATOR_STARTED),
            timeout=20,
        )
    output = director.server.service.folders.folder(experiment_id) / "output"
    output.mkdir()
    rows = [
        {
            "round": n,
            "final_validation": False,
            "reporters": list(ENVOYS[: 2 if n == 1 else 3]),
            "missing": ["carol"] if n == 1 else [],
            "metrics": {"train": {"loss": 1.0 / (n + 1)}},
            "sites": {
                name: {"train": {"loss": (i + 1) / (n + 1)}}
                for i, name in enumerate(ENVOYS[: 2 if n == 1 else 3])
            },
        }
        for n in range(10)
    ]
    (output / "metrics.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
    )
    (output / "last_model.pbuf").write_bytes(b"model bytes" * 1000)
    launcher.ends[experiment_id] = Ended(0)

    code, out = run(ada, "wait", experiment_id)
    assert code == 0, out
    assert out.splitlines()[-1] == "completed: round 10 of 10, sites started 3/3"
    code, out = run(ada, "status", experiment_id)
    assert "completed" in out and "models:    last" in out and "secure:    no" in out
    assert [line.split()[:3] for line in out.splitlines()[-3:]] == [
        [name, "yes", "started"] for name in ENVOYS
    ]
    code, out = run(ada, "metrics", experiment_id)
    assert out.splitlines()[:2] == [
        "round 1 of 10, sites reported 3/3  train: loss 1.0000",
        "round 2 of 10, sites reported 2/3  train: loss 0.5000",
    ]
    assert len(out.splitlines()) == 10
    code, out = run(ada, "metrics", "--sites", experiment_id)
    assert out.splitlines()[:7] == [
        "round 1 of 10, sites reported 3/3  train: loss 1.0000",
        "  alice  train: loss 1.0000",
        "  bob  train: loss 2.0000",
        "  carol  train: loss 3.0000",
        "round 2 of 10, sites reported 2/3  train: loss 0.5000",
        "  alice  train: loss 0.5000",
        "  bob  train: loss 1.0000",
    ]
    code, out = run(ada, "--json", "metrics", experiment_id)
    assert [json.loads(line) for line in out.splitlines()] == rows
    target = tmp_path / "model.pbuf"
    code, out = run(ada, "download", experiment_id, "--model", "last", "-o", str(target))
    assert code == 0 and target.read_bytes() == b"model bytes" * 1000
    code, out = run(ada, "download", experiment_id, "--model", "best", "-o", str(target))
    assert code == 2 and target.read_bytes() == b"model bytes" * 1000  # a failed download keeps it
    assert not list(tmp_path.glob(".*"))  # nor a temporary file beside it
    code, out = run(ada, "remove", experiment_id)
    assert (code, out) == (0, f"{experiment_id} removed\n")


def test_a_secure_experiment_shows_its_steps_and_dropouts(
    tmp_path: Path, director: Director
) -> None:
    """status says the experiment aggregates securely; metrics gives each secure round's steps
    (time, who dropped out where) and why a round closed untrained."""
    ada = client_config(tmp_path, director, "ada")
    plan = write_plan(tmp_path, federation={"rounds": 2}, secure_aggregation={"enabled": True})
    code, out = run(ada, "submit", str(plan), "--name", "secure digits")
    assert code == 0, out
    experiment_id = out.split()[0]
    code, out = run(ada, "status", experiment_id)
    assert code == 0 and "secure:    yes" in out.splitlines(), out
    assert "privacy:" not in out and "budget:" not in out
    code, out = run(ada, "--json", "status", experiment_id)
    assert json.loads(out)["secure_aggregation"] is True
    steps = [
        {"stage": "KEYS", "seconds": 0.412, "dropped": []},
        {"stage": "SHARES", "seconds": None, "dropped": []},
        {"stage": "UPLOAD", "seconds": 5.1, "dropped": ["carol"]},
        {"stage": "SURVIVORS", "seconds": 0.05, "dropped": []},
        {"stage": "UNMASK", "seconds": 0.3, "dropped": []},
    ]
    why = "round 1 has 1 survivor(s) (alice), fewer than the threshold of 2"
    rows = [
        {"round": 0, "reporters": ["alice", "bob"], "missing": ["carol"], "secure": True,
         "stages": steps, "untrained": "", "metrics": {"train": {"loss": 0.5}}},
        {"round": 1, "reporters": ["alice"], "missing": ["bob", "carol"], "secure": True,
         "stages": [{"stage": "KEYS", "seconds": 0.2, "dropped": ["bob", "carol"]}],
         "untrained": why, "metrics": {}},
    ]  # fmt: skip
    output = director.server.service.folders.folder(experiment_id) / "output"
    output.mkdir()
    (output / "metrics.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
    )
    code, out = run(ada, "metrics", experiment_id)
    assert code == 0 and out.splitlines() == [
        "round 1 of 2, sites reported 2/3  train: loss 0.5000",
        "  secure  KEYS 0.41 s  SHARES -  UPLOAD 5.10 s (dropped carol)  SURVIVORS 0.05 s  "
        "UNMASK 0.30 s",
        "round 2 of 2, sites reported 1/3",
        "  secure  KEYS 0.20 s (dropped bob, carol)",
        f"  untrained: {why}",
    ], out


def test_a_dp_experiment_shows_its_settings_and_the_epsilon_spent(
    tmp_path: Path, director: Director
) -> None:
    """status names the DP settings and the epsilon its completed rounds spent of the cap (the
    rounds are those the cap allows), and the budget alice's DP-SGD last reported; --json
    carries them; metrics gives each round's epsilon."""
    ada = client_config(tmp_path, director, "ada")
    privacy = {"enabled": True, "clip": 1.0, "noise_multiplier": 2.0, "max_epsilon": 8}
    plan = write_plan(tmp_path, federation={"rounds": 20}, differential_privacy=privacy)
    code, out = run(ada, "submit", str(plan))
    assert code == 0, out
    experiment_id = out.split()[0]
    spent = [epsilon_after(rounds, 2.0, 1e-5) for rounds in (1, 2)]
    alice = [SiteBudget(epsilon, 1e-5, 6.0) for epsilon in (1.5, 2.25)]  # her own DP-SGD
    rows = [
        {"round": r, "reporters": ["alice", "bob", "carol"], "missing": [],
         "metrics": {"train": {"loss": 0.5}}, "dp": {"epsilon": spent[r], "delta": 1e-5},
         "sites": {"alice": {"train": alice[r].to_metrics()}}}
        for r in (0, 1)
    ]  # fmt: skip
    output = director.server.service.folders.folder(experiment_id) / "output"
    output.mkdir()
    (output / "metrics.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
    )
    code, out = run(ada, "status", experiment_id)
    lines = out.splitlines()
    assert code == 0 and "rounds:    2 of 9" in lines, out  # the budget allows 9 of the 20
    assert "privacy:   DP-FedAvg, clip 1, noise multiplier 2" in lines, out
    assert f"budget:    epsilon {spent[1]:.2f} of 8 at delta 1e-05 after 2 rounds" in lines, out
    assert lines[-2:] == [
        "sites' own privacy budgets (DP-SGD):",
        "  alice: epsilon 2.25 of 6 at delta 1e-05, as of round 2",
    ], out
    code, out = run(ada, "--json", "status", experiment_id)
    status = json.loads(out)
    assert status["differential_privacy"] == {
        "clip": 1.0,
        "noise_multiplier": 2.0,
        "delta": 1e-5,
        "max_epsilon": 8.0,
        "epsilon": spent[1],
    }
    budgets = {site["site"]: site.get("budget") for site in status["sites"]}
    assert budgets == {
        "alice": {"epsilon": 2.25, "delta": 1e-5, "max_epsilon": 6.0, "round": 2},
        "bob": None,
        "carol": None,
    }
    code, out = run(ada, "metrics", experiment_id)
    assert code == 0 and out.splitlines() == [
        f"round {r + 1} of 9, sites reported 3/3  epsilon {spent[r]:.2f}  train: loss 0.5000"
        for r in (0, 1)
    ], out


def test_a_dp_experiment_without_a_cap_shows_the_epsilon_alone() -> None:
    """No cap: the budget line gives the epsilon spent and says there is no cap."""
    e = pb.Experiment(
        state=pb.EXPERIMENT_RUNNING,
        rounds=5,
        rounds_completed=1,
        differential_privacy=pb.DifferentialPrivacy(
            clip=0.5, noise_multiplier=1.1, delta=1e-6, epsilon=6.789
        ),
    )
    lines = show.status_lines(e)
    assert "budget:    epsilon 6.79 at delta 1e-06 after 1 round (no cap)" in lines, lines
    assert not any("DP-SGD" in line for line in lines), lines  # no site reports a budget
    e.sites.append(pb.SiteStatus(site="bob", budget=pb.SiteBudget(epsilon=3, delta=1e-5, round=1)))
    assert show.status_lines(e)[-1] == "  bob: epsilon 3.00 at delta 1e-05, as of round 1"


def test_an_initial_model_goes_in_pieces_within_the_limit(
    tmp_path: Path, director: Director, capsys: pytest.CaptureFixture[str]
) -> None:
    """--initial-model: a model under the director's limit is stored whole; one over it, exit 2."""
    ada = client_config(tmp_path, director, "ada")
    model = tmp_path / "model.pbuf"
    model.write_bytes(bytes(range(256)) * 250)  # 64000 bytes, the limit being 65536
    code, out = run(ada, "submit", str(write_plan(tmp_path)), "--initial-model", str(model))
    assert code == 0, capsys.readouterr().err
    folder = director.server.service.folders.folder(out.split()[0])
    assert (folder / "initial_model.pbuf").read_bytes() == model.read_bytes()
    model.write_bytes(b"\0" * 65537)
    code, out = run(ada, "submit", str(write_plan(tmp_path)), "--initial-model", str(model))
    assert code == 2
    assert "RESOURCE_EXHAUSTED: the initial model is 65537 bytes" in capsys.readouterr().err


def test_refusals_exit_2_with_one_line(
    tmp_path: Path, director: Director, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown id, a plan setting the director's field, another's experiment: exit 2, one line."""
    ada, bea = client_config(tmp_path, director, "ada"), client_config(tmp_path, director, "bea")
    unknown = "00000000-0000-4000-8000-000000000000"
    assert run(ada, "status", unknown)[0] == 2
    assert capsys.readouterr().err == f"experiment: error: NOT_FOUND: no experiment '{unknown}'\n"
    assert run(ada, "status", "nope")[0] == 2
    assert capsys.readouterr().err.startswith(
        "experiment: error: INVALID_ARGUMENT: experiment_id: 'nope' is not an id of this director"
    )
    assert run(ada, "submit", str(write_plan(tmp_path, aggregator={"port": 1})))[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("experiment: error: INVALID_ARGUMENT: submitted plan: aggregator.port")
    experiment_id = run(ada, "submit", str(write_plan(tmp_path)))[1].split()[0]
    assert run(bea, "cancel", experiment_id)[0] == 2
    assert "belongs to another user" in capsys.readouterr().err
    assert run(ada, "approve", experiment_id)[0] == 2
    assert "ApproveExperiment is for admins" in capsys.readouterr().err


def test_one_users_backlog_waits_while_anothers_experiment_starts(
    tmp_path: Path, director_certs: CertsLayout, launcher: RecordingLauncher
) -> None:
    """The fair share (1 of 2 places for three people): ada submits five, bea one after them;
    bea's starts while ada's four wait, and `list` shows ada's in the queue's order."""
    with registered_director(tmp_path, director_certs, launcher, max_running_per_user=None) as d:
        ada, bea = client_config(tmp_path, d, "ada"), client_config(tmp_path, d, "bea")
        plan = str(write_plan(tmp_path))
        mine = [run(ada, "submit", plan)[1].split()[0] for _ in range(5)]
        theirs = run(bea, "submit", plan)[1].split()[0]
        deadline = time.monotonic() + WAIT_SECONDS
        while len(launcher.started) < 2:
            assert time.monotonic() < deadline, f"timed out waiting for two starts: {launcher}"
            time.sleep(0.05)
        d.server.service.supervisor.supervise()  # one more step of its own: nothing else may start
        assert [started for started, _ in launcher.started] == [mine[0], theirs]
        code, out = run(ada, "list")
        assert code == 0, out
        states = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert "waiting" in states[mine[0]]
        for position, experiment_id in enumerate(mine[1:], start=1):
            assert f"approved ({position} in queue)" in states[experiment_id], out
        code, out = run(bea, "--json", "status", theirs)
        assert code == 0 and json.loads(out)["state"] == "EXPERIMENT_WAITING", out


def test_admins_review_and_cancel(tmp_path: Path, director: Director) -> None:
    """An admin rejects with a reason; cancelling it after is refused; list shows it rejected."""
    ada, root = client_config(tmp_path, director, "ada"), client_config(tmp_path, director, ADMIN)
    experiment_id = run(ada, "submit", str(write_plan(tmp_path)))[1].split()[0]
    code, out = run(ada, "cancel", experiment_id)
    assert (code, out) == (0, f"{experiment_id}  cancelled: cancelled by ada\n")
    second = run(ada, "submit", str(write_plan(tmp_path)))[1].split()[0]
    code, out = run(root, "--json", "cancel", second)
    assert code == 0 and json.loads(out)["state"] == "EXPERIMENT_CANCELLED"
    assert run(root, "reject", second, "--reason", "late")[0] == 2


def test_envoys_are_a_table(tmp_path: Path, director: Director) -> None:
    """Each site with online, samples and its shard's description."""
    code, out = run(client_config(tmp_path, director, "bea"), "envoys")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["SITE", "ONLINE"]
    assert [line.split()[:2] for line in lines[1:]] == [[name, "yes"] for name in ENVOYS]
    assert "alice's digits" in lines[1] and "500/-" in lines[1]  # valid_samples not stated


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone (`experiment envoys | head -1`)."""

    def write(self, text: str) -> int:
        """Fail as a write to a closed pipe does."""
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_ends_quietly(
    tmp_path: Path, director: Director, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write to a closed pipe is exit 141 with nothing on stderr, not "error: : Broken pipe"."""
    config = client_config(tmp_path, director, "bea")
    assert main(["--config", str(config), "envoys"], out=ClosedPipe()) == 141
    assert capsys.readouterr().err == ""


ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m\r\x9b\u202e"  # title, clear, colour, CR, CSI, RLO
CONTROLS = set("\x1b\x07\r\x9b\u202e")


def test_others_text_reaches_the_terminal_without_controls(
    tmp_path: Path, director: Director, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names, descriptions, labels, reasons and logs holding escape sequences: printed without
    ESC, the C0/C1 controls or bidi overrides, by every command that shows them, stderr too."""
    director.stub("alice", role="envoy").RegisterEnvoy(
        pb.RegisterEnvoyRequest(
            shard=pb.ShardInfo(description=f"digits{ESCAPES}", labels={"k": ESCAPES})
        ),
        timeout=20,
    )
    ada = client_config(tmp_path, director, "ada")
    experiment_id = (
        director.stub("ada")
        .SubmitExperiment(
            iter([pb.SubmitChunk(plan_yaml=yaml.safe_dump(submitted_plan()), name=ESCAPES)]),
            timeout=20,
        )
        .experiment_id
    )
    log = director.server.service.folders.folder(experiment_id) / "aggregator.log"
    log.write_text(f"round 1{ESCAPES}\tdone\n", encoding="utf-8")
    outputs = [
        run(ada, "list")[1],
        run(ada, "status", experiment_id)[1],
        run(ada, "envoys")[1],
        run(ada, "logs", experiment_id)[1],
    ]
    fail("experiment", f"a refusal quoting{ESCAPES}", 2)  # every command's error line
    outputs.append(capsys.readouterr().err)
    for output in outputs:
        assert output and not CONTROLS & set(output), repr(output)
    assert "]0;owned[2J[31m" in outputs[0] and "digits]0;owned" in outputs[2]
    assert outputs[3] == "round 1]0;owned[2J[31m\tdone\n"
    assert outputs[4] == "experiment: error: a refusal quoting]0;owned[2J[31m\n"


def test_config_from_the_environment_and_config_errors(
    tmp_path: Path,
    director: Director,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """FOEDUS_EXPERIMENT_CONFIG is the default; no config, or a bad key, is exit 2 naming it."""
    assert main(["list"], out=io.StringIO()) == 2
    assert "give --config FILE or set FOEDUS_EXPERIMENT_CONFIG" in capsys.readouterr().err
    monkeypatch.setenv("FOEDUS_EXPERIMENT_CONFIG", str(client_config(tmp_path, director, "ada")))
    assert main(["list"], out=io.StringIO()) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("director: localhost\ncerts_dir: c\nname: ada\ncolour: red\n", "utf-8")
    assert main(["--config", str(bad), "list"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert (
        f"{bad}: director: expected a name matching" in err and f"{bad}: colour: unknown key" in err
    )


def test_an_unreachable_director_exits_1(
    tmp_path: Path, director_certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nobody listening: UNAVAILABLE, exit 1, one line."""
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"director": "localhost:1", "certs_dir": str(director_certs.root), "name": "ada"}
        ),
        encoding="utf-8",
    )
    assert main(["--config", str(config), "list"], out=io.StringIO()) == 1
    assert capsys.readouterr().err.startswith("experiment: error: UNAVAILABLE: ")


def test_python_m_experiment_help() -> None:
    """The module runs as a command; --help exits 0 and lists every subcommand."""
    result = run_module("experiment", "--help")
    assert result.returncode == 0
    for command in (
        "submit",
        "list",
        "status",
        "wait",
        "metrics",
        "logs",
        "download",
        "cancel",
        "remove",
        "approve",
        "reject",
        "envoys",
    ):
        assert command in result.stdout
