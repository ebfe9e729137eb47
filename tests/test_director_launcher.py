"""The local launcher: real child processes, their exit status kept, stopped, adopted again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from foedus.director.launcher import LOG_FILE, LocalLauncher
from foedus.processes.children import STATUS_FILE, Ended, log_tail

WAIT_SECONDS = 60


def fake_aggregator(code: str) -> tuple[str, ...]:
    """A command standing in for `aggregator`: `code` runs with argv 'start --plan PLAN'."""
    return (sys.executable, "-c", code)


def wait_for_end(launcher: LocalLauncher, folder: Path) -> Ended:
    """Poll until the process has ended, bounded in time."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        ended = launcher.poll("e1", folder)
        if ended is not None:
            return ended
        time.sleep(0.05)
    raise AssertionError("the process did not end in time")


def test_exit_code_and_log_are_kept(tmp_path: Path) -> None:
    """The command's output goes to aggregator.log, its exit code to exit_status and poll."""
    launcher = LocalLauncher(
        fake_aggregator("import sys; print('serving', sys.argv[1:]); sys.exit(3)")
    )
    pid = launcher.start("e1", tmp_path / "plan.yaml", tmp_path)
    assert pid > 0
    assert wait_for_end(launcher, tmp_path) == Ended(3)
    assert (tmp_path / STATUS_FILE).read_text(encoding="utf-8") == "3\n"
    log = (tmp_path / LOG_FILE).read_text(encoding="utf-8")
    assert f"serving ['start', '--plan', '{tmp_path / 'plan.yaml'}']" in log
    assert Ended(3).describe() == "the aggregator exited with code 3"


def test_stop_ends_it_and_records_the_signal(tmp_path: Path) -> None:
    """Stop passes SIGTERM on; the command's end by that signal is recorded as -15."""
    launcher = LocalLauncher(
        fake_aggregator("import time; print('up', flush=True); time.sleep(600)")
    )
    launcher.start("e1", tmp_path / "plan.yaml", tmp_path)
    deadline = time.monotonic() + WAIT_SECONDS
    while "up" not in (tmp_path / LOG_FILE).read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.05)
    assert launcher.poll("e1", tmp_path) is None
    launcher.stop("e1", tmp_path, grace_seconds=WAIT_SECONDS)
    assert wait_for_end(launcher, tmp_path) == Ended(-signal.SIGTERM)
    assert "signal 15" in Ended(-15).describe()


def test_a_new_launcher_adopts_a_running_aggregator(tmp_path: Path) -> None:
    """After a 'restart' (a new launcher), the running process is found and its end read."""
    first = LocalLauncher(
        fake_aggregator(
            "import pathlib, sys, time\n"
            "while not pathlib.Path('go').exists(): time.sleep(0.05)\n"
            "sys.exit(0)"
        )
    )
    pid = first.start("e1", tmp_path / "plan.yaml", tmp_path)
    try:
        second = LocalLauncher()
        assert not second.adopt("e1", tmp_path, os.getpid())  # not ours: a reused pid is refused
        deadline = time.monotonic() + WAIT_SECONDS
        while not second.adopt("e1", tmp_path, pid):  # once the new process runs its command
            assert time.monotonic() < deadline, "the started process was never recognised"
            time.sleep(0.05)
        assert second.poll("e1", tmp_path) is None
        (tmp_path / "go").touch()
        assert wait_for_end(second, tmp_path) == Ended(0)
        assert not second.adopt("e1", tmp_path, pid)
    finally:
        (tmp_path / "go").touch()
        assert wait_for_end(first, tmp_path) == Ended(0)  # the real parent reaps it: no zombie


def test_a_child_started_under_its_earlier_name_is_adopted(tmp_path: Path) -> None:
    """A parent started by an earlier foedus (`python -m foedus.director.child`), still running after an
    upgrade, is found again rather than started a second time; another folder's is not."""
    status = tmp_path / STATUS_FILE
    earlier = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(600)",
            "director.child",
            "--status",
            str(status),
        ],
        start_new_session=True,
    )
    try:
        launcher = LocalLauncher()
        assert not launcher.adopt("e2", tmp_path / "elsewhere", earlier.pid)
        deadline = time.monotonic() + WAIT_SECONDS
        while not launcher.adopt("e1", tmp_path, earlier.pid):  # once its command line is set
            assert time.monotonic() < deadline, "the earlier parent was never recognised"
            time.sleep(0.05)
        assert launcher.poll("e1", tmp_path) is None
        launcher.stop("e1", tmp_path, grace_seconds=WAIT_SECONDS)
    finally:
        earlier.kill()
        earlier.wait(timeout=WAIT_SECONDS)


def test_a_parent_killed_without_a_status_reads_as_lost(tmp_path: Path) -> None:
    """SIGKILL of the whole session leaves no status: poll says it ended with code None."""
    launcher = LocalLauncher(fake_aggregator("import time; time.sleep(600)"))
    pid = launcher.start("e1", tmp_path / "plan.yaml", tmp_path)
    os.killpg(pid, signal.SIGKILL)
    ended = wait_for_end(launcher, tmp_path)
    assert ended == Ended(None)
    assert "without recording an exit status" in ended.describe()


def test_a_parent_killed_alone_takes_its_orphaned_command_with_it(tmp_path: Path) -> None:
    """SIGKILL of the parent only: the command, orphaned and still running, is killed when the
    end is read, so starting it again never runs it twice."""
    launcher = LocalLauncher(
        fake_aggregator(
            "import os, pathlib, time; pathlib.Path('command.pid').write_text(str(os.getpid())); "
            "time.sleep(600)"
        )
    )
    pid = launcher.start("e1", tmp_path / "plan.yaml", tmp_path)
    deadline = time.monotonic() + WAIT_SECONDS
    while not (tmp_path / "command.pid").exists():
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)
    command = int((tmp_path / "command.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert wait_for_end(launcher, tmp_path) == Ended(None)
    deadline = time.monotonic() + WAIT_SECONDS
    while runs(command):
        assert time.monotonic() < deadline, "the orphaned command still runs"
        time.sleep(0.05)


def runs(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    except OSError:
        return False


def test_a_second_start_forgets_the_last_status(tmp_path: Path) -> None:
    """Started again, an experiment's old exit_status cannot pass for the new run's."""
    (tmp_path / STATUS_FILE).write_text("1\n", encoding="utf-8")
    launcher = LocalLauncher(fake_aggregator("import time; time.sleep(600)"))
    launcher.start("e1", tmp_path / "plan.yaml", tmp_path)
    try:
        assert not (tmp_path / STATUS_FILE).exists()
        assert launcher.poll("e1", tmp_path) is None
    finally:
        launcher.stop("e1", tmp_path, grace_seconds=WAIT_SECONDS)


@pytest.mark.parametrize("argv", [[], ["--status", "x"]])
def test_the_child_parent_needs_a_status_and_a_command(argv: list[str]) -> None:
    """foedus.processes.child without --status or without a command is a usage error (exit 2)."""
    from foedus.processes.child import main  # noqa: PLC0415

    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


def test_log_tail_keeps_whole_lines_only(tmp_path: Path) -> None:
    """No log yet: no lines; a log longer than the bytes read loses its cut first line only."""
    log = tmp_path / LOG_FILE
    assert log_tail(log, 10, 64) == []
    log.write_bytes(b"first line\nsecond\nthird\n")
    assert log_tail(log, 10, 64) == ["first line", "second", "third"]
    assert log_tail(log, 2, 64) == ["second", "third"]
    assert log_tail(log, 10, 17) == ["second", "third"]  # "line\n" was read, and left out
    log.write_bytes(b"x" * 100 + b"\n\xff end\n")
    assert log_tail(log, 10, 8) == ["\ufffd end"]
