"""The collaborator command line: start-up checks in one line and exit 2, runtime exits 0, 1 and 143."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from foedus.aggregator.federation import Federation
from foedus.collaborator.cli import leave_reason, main
from foedus.collaborator.digits import DigitsRunner
from foedus.collaborator.errors import (
    AggregatorUnavailableError,
    ClientConfigurationError,
    RequestRejectedError,
    ResponseValidationError,
)
from foedus.collaborator.loop import CollaboratorError
from foedus.pki.layout import CertsLayout
from foedus.plans.runners import Model, RunnerError, TrainOutcome

from directors import alias_bomb_plan
from failing_runner import FAIL_AT_ENV
from failing_runner import NAME as FAILING_RUNNER
from federation_processes import free_port, run_module
from servers import (
    closing_rounds,
    make_federation,
    make_plan,
    plan_document,
    running_aggregator,
)

REPO = Path(__file__).resolve().parent.parent
PREFIX = "collaborator: error: "
# Runs the command in its arguments; prints its exit code and peak resident memory (KiB).
PEAK_RSS = (
    "import os, subprocess, sys; child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)"
    "; _, status, usage = os.wait4(child.pid, 0)"
    "; print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)"
)


def write_plan(folder: Path, certs: CertsLayout | None, **sections: Any) -> Path:
    """A test plan (see `servers.plan_document`) written as YAML into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_document(certs, **sections)), encoding="utf-8")
    return path


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What the command printed to stderr, line by line (and that it printed nothing to stdout)."""
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def copy_certs(certs: CertsLayout, folder: Path) -> CertsLayout:
    """A copy of the test federation's certificate folder that a test may damage."""
    shutil.copytree(certs.root, folder)
    return CertsLayout(folder)


def test_help_at_each_level_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` and `start --help` print usage with the exit statuses and return 0."""
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "start" in top and "exit status" in top
    assert main(["start", "--help"]) == 0
    start = capsys.readouterr().out
    for text in ("--name", "--plan", "--log-level", "130", "143", "SIGTERM"):
        assert text in start, text


def test_python_m_collaborator_help() -> None:
    """`python -m foedus.collaborator --help` runs the command line and exits 0."""
    done = run_module("collaborator", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: collaborator")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["start", "--plan", "plan.yaml"], "the following arguments are required: -n/--name"),
        (["stop"], "invalid choice: 'stop'"),
        (["start", "-n", "alice", "--plan", "p", "--log-level", "loud"], "invalid choice: 'loud'"),
    ],
)
def test_bad_command_line_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """A bad command line is refused in one stderr line that points at --help."""
    assert main(argv) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(PREFIX) and message in line and "--help" in line


def test_name_not_in_plan(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name the plan does not list is refused with the plan's list, exit 2."""
    plan = write_plan(tmp_path, certs)
    assert main(["start", "-n", "mallory", "--plan", str(plan)]) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{plan}: collaborators: 'mallory' is not listed (listed: alice, bob, carol)"
    ]


def test_broken_plan_prints_each_problem(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plan with two problems gives one line per problem, each naming its key, exit 2."""
    plan = write_plan(tmp_path, certs, federation={"rounds": 0}, aggregator={"prot": 1})
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{PREFIX}{plan}: federation.rounds: expected an integer")
    assert lines[1] == f"{PREFIX}{plan}: aggregator.prot: unknown key"


def test_missing_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A plan file that does not exist is one line, exit 2."""
    missing = tmp_path / "nowhere.yaml"
    assert main(["start", "-n", "alice", "--plan", str(missing)]) == 2
    assert error_lines(capsys) == [f"{PREFIX}{missing}: file not found"]


@pytest.mark.parametrize(
    ("remove", "what"),
    [
        ("cert_chain.crt", "CA bundle"),
        ("collaborators/alice.crt", "certificate of 'alice'"),
        ("collaborators/alice.key", "private key of 'alice'"),
    ],
)
def test_missing_tls_file_says_how_to_make_it(
    certs: CertsLayout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    remove: str,
    what: str,
) -> None:
    """A missing CA bundle, certificate or key is named with its path and the pki command, exit 2."""
    layout = copy_certs(certs, tmp_path / "certs")
    (layout.root / remove).unlink()
    plan = write_plan(tmp_path, layout)
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{plan}: tls.certs_dir: {what} not found: {layout.root / remove} "
        f"(run 'pki setup --plan {plan}')"
    ]


def test_key_readable_by_others_is_refused(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A private key with mode 0644 is refused with the chmod that fixes it, exit 2."""
    layout = copy_certs(certs, tmp_path / "certs")
    key = layout.collaborator_key("alice")
    key.chmod(0o644)
    plan = write_plan(tmp_path, layout)
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"{PREFIX}{key}: private key is accessible by group or others")
    assert line.endswith(f"chmod 600 {key}")


def test_bad_runner_settings(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runner settings the digits runner refuses are one line naming runner.settings.<key>, exit 2."""
    plan = write_plan(tmp_path, certs, runner={"settings": {"epochs": 0, "split": "iid"}})
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{plan}: runner.settings.epochs: expected an integer >= 1, got 0"
    ]


def test_an_alias_bomb_in_runner_settings_is_refused_at_once(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """`collaborator start` on a plan whose runner.settings unfold into 10**9 strings by aliases:
    one line naming the line of the first alias, exit 2, and the process never grows past 512 MiB."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(alias_bomb_plan(plan_document(certs)), encoding="utf-8")
    first_alias = (
        plan.read_text(encoding="utf-8")
        .splitlines()
        .index(f"    l1: &l1 [{', '.join(['*l0'] * 10)}]")
    )
    err_path = tmp_path / "stderr"
    with err_path.open("w", encoding="utf-8") as err:
        # Measured from a small parent of its own: a child's peak RSS counts its parent's pages
        # until exec (vfork), and pytest's grow with the suite.
        command = [
            sys.executable,
            "-m",
            "foedus.collaborator",
            "start",
            "-n",
            "alice",
            "--plan",
            str(plan),
        ]
        measured = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, *command],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=120,
            check=True,
        )
    code, peak_kib = (int(field) for field in measured.stdout.split())
    assert code == 2, err_path.read_text(encoding="utf-8")
    assert err_path.read_text(encoding="utf-8").splitlines()[-1] == (
        f"{PREFIX}{plan}: line {first_alias + 1}: not valid YAML: YAML aliases (*name) are not "
        "accepted: write the value out"
    )
    assert peak_kib < 512 * 1024  # the aliases were never unfolded


def write_site(folder: Path, text: str) -> Path:
    """A site settings file holding `text`."""
    path = folder / "site.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- data\n", "expected a mapping of runner settings, got list"),
        ("batch_size: [1\n", "not valid YAML (line 2)"),
        ("7: x\n", "7: setting names must be non-empty text"),
    ],
)
def test_bad_site_settings_file_is_one_line_naming_it(
    certs: CertsLayout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    problem: str,
) -> None:
    """A site settings file that is not a mapping of names is one line naming the file, exit 2."""
    plan = write_plan(tmp_path, certs)
    site = write_site(tmp_path, text)
    args = ["start", "-n", "alice", "--plan", str(plan), "--site-settings", str(site)]
    assert main(args) == 2
    assert error_lines(capsys) == [f"{PREFIX}{site}: {problem}"]


def test_missing_site_settings_file_is_named(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A site settings file that does not exist is refused, never read as no settings."""
    plan = write_plan(tmp_path, certs)
    site = tmp_path / "absent.yaml"
    assert main(["start", "-n", "alice", "--plan", str(plan), "--site-settings", str(site)]) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{site}: cannot read site settings: No such file or directory"
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "data_dir: /srv/digits\n",
            "data_dir: unknown key (known: split, test_fraction, epochs, batch_size, "
            "learning_rate, skew)",
        ),
        ("batch_size: 0\n", "batch_size: expected an integer >= 1, got 0"),
        ("test_fraction: 0.0001\n", "test_fraction: 0.0001 leaves 0 test samples"),
    ],
)
def test_bad_site_settings_key_is_one_line_naming_file_and_key(
    certs: CertsLayout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    problem: str,
) -> None:
    """A key of the site's file the runner refuses is named with that file, not the plan; exit 2."""
    plan = write_plan(tmp_path, certs)
    site = write_site(tmp_path, text)
    args = ["start", "-n", "alice", "--plan", str(plan), "--site-settings", str(site)]
    assert main(args) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"{PREFIX}{site}: {problem}")


def test_plan_keys_stay_named_with_the_plan_beside_a_site_file(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a site file, a bad key the plan set is still named as the plan's runner.settings key."""
    plan = write_plan(tmp_path, certs, runner={"settings": {"epochs": 0}})
    site = write_site(tmp_path, "batch_size: 8\n")
    args = ["start", "-n", "alice", "--plan", str(plan), "--site-settings", str(site)]
    assert main(args) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{plan}: runner.settings.epochs: expected an integer >= 1, got 0"
    ]


def test_unknown_runner(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A runner that cannot be imported is one line naming runner.name, exit 2."""
    plan = write_plan(tmp_path, certs, runner={"name": "nosuchpackage.module:Runner"})
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"{PREFIX}{plan}: runner.name: cannot import 'nosuchpackage.module'")


def test_a_runner_named_by_a_folder_of_foedus_is_told_its_installed_name(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plan written before foedus installed one package names collaborator.digits: the line
    says to write foedus.collaborator.digits (a second copy of foedus's modules is never loaded)."""
    plan = write_plan(tmp_path, certs, runner={"name": "collaborator.digits:DigitsRunner"})
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{plan}: runner.name: 'collaborator.digits:DigitsRunner': foedus's own modules "
        "are imported as foedus.collaborator.digits: write "
        "'foedus.collaborator.digits:DigitsRunner'"
    ]


class CountingRunner(DigitsRunner):
    """A runner written before `train` took the round: it would count its calls instead."""

    def train(self, model: Model) -> TrainOutcome:  # type: ignore[override]
        """The digits runner's training, as if every call were round 0."""
        return super().train(model, 0)


def test_a_runner_whose_train_takes_no_round_is_refused_at_start(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train(self, model)` without the round: one line naming runner.name and the fix, exit 2."""
    plan = write_plan(tmp_path, certs, runner={"name": "test_collaborator_cli:CountingRunner"})
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{plan}: runner.name: 'test_collaborator_cli:CountingRunner': train must take "
        "(model, round_number), the round whose model it trains; draw the round's random "
        "choices from the seed, the site and round_number, never from a count kept in the process"
    ]


def test_unreachable_aggregator_exits_1(
    certs: CertsLayout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An aggregator nobody listens for, once the retries are spent, is one line and exit 1; its
    category alone is logged first (what a site shares with a director by default)."""
    plan = write_plan(
        tmp_path,
        certs,
        aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": free_port()},
        connection={"max_retries": 1, "backoff_initial_seconds": 0, "backoff_max_seconds": 0},
    )
    assert main(["start", "-n", "alice", "--plan", str(plan)]) == 1
    (line,) = error_lines(capsys)
    assert line.startswith(f"{PREFIX}aggregator at 127.0.0.1:")
    assert "GetTasks failed on 2 attempts" in line and "UNAVAILABLE" in line
    assert caplog.messages[-1] == "failure: the aggregator stayed unreachable"


def test_refusal_exits_1_with_its_status(
    certs: CertsLayout,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An aggregator that does not list alice refuses her: one line with the status, exit 1."""
    server_plan = make_plan(certs, collaborators=["bob", "carol"])
    with running_aggregator(server_plan) as server:
        plan = write_plan(
            tmp_path,
            certs,
            aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": server.port},
        )
        assert main(["start", "-n", "alice", "--plan", str(plan)]) == 1
    (line,) = error_lines(capsys)
    assert line.startswith(f"{PREFIX}the aggregator refused GetTasks with PERMISSION_DENIED: ")
    assert "'alice' is not an authorised collaborator" in line
    assert caplog.messages[-1] == "failure: the aggregator refused GetTasks (PERMISSION_DENIED)"


@contextmanager
def alice_alone(
    certs: CertsLayout, tmp_path: Path, **sections: Any
) -> Iterator[tuple[Federation, Path]]:
    """An aggregator of alice alone, one training round (and the final validation round after
    it), its rounds closing; yields it and alice's plan (`sections` merged into it)."""
    server_plan = make_plan(
        certs,
        federation={"rounds": 1},
        collaborators=["alice"],
        aggregator={"long_poll_seconds": 0.5},
    )
    federation = make_federation(server_plan, DigitsRunner.initial_model(server_plan.runner))
    with running_aggregator(server_plan, federation) as server, closing_rounds(federation):
        yield (
            federation,
            write_plan(
                tmp_path,
                certs,
                federation={"rounds": 1},
                collaborators=["alice"],
                aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": server.port},
                **sections,
            ),
        )


def test_a_whole_federation_exits_0(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Alice alone runs one round and the final validation, is told to quit, and exits 0 silently."""
    with alice_alone(certs, tmp_path) as (federation, plan):
        assert main(["start", "-n", "alice", "--plan", str(plan)]) == 0
    assert error_lines(capsys) == []
    assert federation.finished
    assert federation.told_to_quit() == ("alice",)
    assert federation.liveness.departures() == ()  # no Leave on exit 0


@pytest.mark.parametrize(("flags", "left"), [([], ("alice",)), (["--no-leave"], ())])
def test_a_failed_runner_leaves_unless_told_not_to(
    certs: CertsLayout,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    left: tuple[str, ...],
) -> None:
    """Alice's runner raises at her first training: she tells the aggregator she leaves, exits
    1; with --no-leave (an envoy's collaborator: the envoy starts it again) she tells it nothing."""
    monkeypatch.setenv(FAIL_AT_ENV, "0")
    with alice_alone(certs, tmp_path, runner={"name": FAILING_RUNNER}) as (federation, plan):
        assert main(["start", "-n", "alice", "--plan", str(plan), *flags]) == 1
    assert tuple(d.name for d in federation.liveness.departures()) == left


def test_site_settings_replace_the_plans_for_a_whole_federation(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A site file's key replaces the plan's: a plan whose epochs alone would be refused runs."""
    with alice_alone(certs, tmp_path, runner={"settings": {"epochs": 0}}) as (federation, plan):
        site = write_site(tmp_path, "epochs: 2\nbatch_size: 16\n")
        args = ["start", "-n", "alice", "--plan", str(plan), "--site-settings", str(site)]
        assert main(args) == 0
    assert error_lines(capsys) == []
    assert federation.finished


def test_keep_metrics_is_refused_in_a_plain_federation(
    certs: CertsLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--keep-metrics with a plan without secure aggregation: one line naming the plan's field
    and why, exit 2, before anything is sent (a whole secure run with it:
    tests/test_collaborator_secure.py)."""
    plan = write_plan(tmp_path, certs)
    assert main(["start", "-n", "alice", "--plan", str(plan), "--keep-metrics"]) == 2
    assert error_lines(capsys) == [
        f"{PREFIX}{plan}: secure_aggregation.enabled: not true, and --keep-metrics needs it (a "
        "plain federation's aggregator refuses a validation without metrics)"
    ]


def test_sigterm_exits_143_with_one_line(certs: CertsLayout, tmp_path: Path) -> None:
    """SIGTERM while waiting for the aggregator ends the process with 143 and one line, no traceback."""
    plan = write_plan(
        tmp_path,
        certs,
        aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": free_port()},
        connection={"max_retries": None, "max_wait_seconds": None, "backoff_max_seconds": 0.2},
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "foedus.collaborator", "start", "-n", "alice", "--plan", str(plan)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stderr is not None
        lines = []
        # The first retry warning shows it is in the loop, past every start-up check.
        for line in process.stderr:
            lines.append(line)
            if "retry 1 of unbounded" in line:
                break
        else:
            pytest.fail(f"no retry warning: {''.join(lines)}")
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 143, rest
    errors = [line for line in rest.splitlines() if line.startswith(PREFIX)]
    assert errors == [f"{PREFIX}terminated (SIGTERM); a task in progress, if any, was not sent"]
    assert "Traceback" not in rest


PATIENT = "could not convert string to float: 'n/a' (row 17, column radius_mean) in /site/data.csv"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ValueError(PATIENT), "the task runner failed (ValueError)"),
        (RunnerError(PATIENT), "the runner refused its settings"),
        (
            RequestRejectedError("GetTasks", grpc.StatusCode.PERMISSION_DENIED, PATIENT),
            "the aggregator refused GetTasks (PERMISSION_DENIED)",
        ),
        (
            AggregatorUnavailableError(PATIENT, attempts=1, elapsed=0, code=None, details=PATIENT),
            "the aggregator stayed unreachable",
        ),
        (
            ResponseValidationError(PATIENT),
            "a bad answer from the aggregator (ResponseValidationError)",
        ),
        (
            CollaboratorError(PATIENT),
            "the runner's work does not fit the federation (CollaboratorError)",
        ),
        (
            ClientConfigurationError(PATIENT),
            "the collaborator cannot go on (ClientConfigurationError)",
        ),
    ],
)
def test_the_reason_sent_is_a_category_and_a_class_never_the_message(
    error: Exception, reason: str
) -> None:
    """What leaves the site in a Leave: a fixed category and the class name, no data, no path."""
    assert leave_reason(error) == reason


def test_sigterm_sends_no_leave(certs: CertsLayout, tmp_path: Path) -> None:
    """A collaborator stopped by SIGTERM while it waits for the next round has not left."""
    server_plan = make_plan(certs, aggregator={"long_poll_seconds": 0.5})
    federation = make_federation(server_plan, DigitsRunner.initial_model(server_plan.runner))
    with running_aggregator(server_plan, federation) as server:
        plan = write_plan(
            tmp_path,
            certs,
            aggregator={"host": "127.0.0.1", "common_name": "localhost", "port": server.port},
        )
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "foedus.collaborator",
                "start",
                "-n",
                "alice",
                "--plan",
                str(plan),
            ],
            cwd=REPO,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 120
            while len(federation.accepted()) < len(server_plan.tasks):  # alice's round 0
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 143
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert federation.liveness.departures() == ()
