"""What of a collaborator's text leaves its site (foedus.envoy.disclosure), in plain Python.

Each `share_with_director` setting on a log holding what a site would not send: a runner's
print, its own logger's line, a multi-line traceback, a library's warning, a foedus line with a
path, and the collaborator's error line quoting the exception. Offsets of the shared text hold
however it is read, and after a restart (a new reader).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from foedus.envoy import disclosure
from foedus.envoy.config import ShareWithDirector
from foedus.envoy.disclosure import (
    SITE_PATH,
    SharedLog,
    failure_reason,
    is_foedus_line,
    shared_reason,
    without_paths,
)

from envoys import read_all

RECORD = "patient record: Jane Doe, 1961-02-03, MRN 12345"
T = "2026-12-06 13:00:0{},123"
LOG = f"""\
{T.format(0)} INFO foedus.collaborator.cli: collaborator alice of federation f1: working for the aggregator at localhost:50051
{T.format(1)} INFO foedus.plans.runners: reading /srv/hospital data/records.csv
{RECORD}
{T.format(2)} INFO my_site.models: loaded {RECORD}
/usr/lib/python3/dist-packages/numpy/core/fromnumeric.py:3504: RuntimeWarning: Mean of empty slice.
{T.format(3)} INFO foedus.collaborator.loop: round 0: train on 1200 samples: loss=0.5000
{T.format(4)} DEBUG foedus.collaborator.cli: unexpected failure
Traceback (most recent call last):
  File "/srv/site/my_site/models.py", line 12, in train
    raise ValueError(RECORD)
ValueError: {RECORD}
{T.format(4)} INFO foedus.collaborator.cli: told the aggregator this collaborator leaves: the task runner failed (ValueError)
{T.format(5)} ERROR foedus.collaborator.cli: failure: the task runner failed (ValueError)
collaborator: error: unexpected failure: ValueError: {RECORD} (--log-level debug shows the traceback)
"""
FOEDUS_LINES = [
    line + "\n" for line in LOG.splitlines() if line.startswith("2026-") and " my_site." not in line
]
DEFAULT = ShareWithDirector()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    """A collaborator's log as the runner above leaves it."""
    path = tmp_path / "collaborator.log"
    path.write_text(LOG, encoding="utf-8")
    return path


# -- paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shared"),
    [
        ("reading /srv/data.csv", f"reading {SITE_PATH}"),
        ("reading /srv/hospital data/records.csv now", f"reading {SITE_PATH} now"),
        ("/srv/a/b.csv: no such file", f"{SITE_PATH}: no such file"),
        ("No such file: '/srv/my data.csv'", f"No such file: '{SITE_PATH}'"),
        ('File "/srv/a b/m.py", line 3, in train', f'File "{SITE_PATH}", line 3, in train'),
        ("data_path=/srv/x,/srv/y;(/tmp/z)", f"data_path={SITE_PATH},{SITE_PATH};({SITE_PATH})"),
        ("from ~/data/file.txt.", f"from {SITE_PATH}"),
        ("[/srv/a] <\t/srv/b>", f"[{SITE_PATH}] <\t{SITE_PATH}>"),
        ("at /srv/a\nand /srv/b", f"at {SITE_PATH}\nand {SITE_PATH}"),
        ("data_path:/srv/x and file:///srv/y", f"data_path:{SITE_PATH} and file://{SITE_PATH}"),
        # Not paths: URLs, fractions, relative paths, a lone slash, a Windows-less word.
        ("https://example.org/a/b and redis://h:6379/0", None),
        ("3/4 of and/or data/x.csv a / b", None),
    ],
)
def test_absolute_paths_become_site_path(text: str, shared: str | None) -> None:
    """POSIX paths, spaces inside them, stopped at the usual delimiters; nothing else touched."""
    assert without_paths(text) == (text if shared is None else shared)


# -- reasons ------------------------------------------------------------------------------------


def test_a_failure_reason_keeps_everything_at_the_site_and_shares_a_category(log: Path) -> None:
    """The site's reason quotes the last line; shared by default: the category only."""
    reason = failure_reason("the collaborator exited with code 1", 1, log)
    assert reason == (
        "the collaborator exited with code 1: the task runner failed (ValueError); its log ends: "
        f"collaborator: error: unexpected failure: ValueError: {RECORD} (--log-level debug "
        "shows the traceback)"
    )
    assert shared_reason(reason, DEFAULT) == (
        "the collaborator exited with code 1: the task runner failed (ValueError)"
    )
    assert shared_reason(reason, ShareWithDirector(errors="line")) == reason


@pytest.mark.parametrize(
    ("code", "last", "category"),
    [
        (
            2,
            "collaborator: error: /srv/p.yaml: runner.settings: 'epoch': unknown key",
            "a bad plan, certificates or runner settings",
        ),
        (143, "collaborator: error: terminated (SIGTERM); a task ...", "terminated (SIGTERM)"),
        (130, "collaborator: error: interrupted (SIGINT); a task ...", "interrupted (SIGINT)"),
        (1, "collaborator: error: the aggregator at h:1 stayed unreachable", ""),
    ],
)
def test_categories_come_from_the_exit_code(
    tmp_path: Path, code: int, last: str, category: str
) -> None:
    """What an exit code means is the category; with none known, the exit alone."""
    log = tmp_path / "collaborator.log"
    log.write_text(
        f"{T.format(0)} INFO foedus.collaborator.cli: working\n{last}\n", encoding="utf-8"
    )
    described = f"the collaborator exited with code {code}"
    reason = failure_reason(described, code, log)
    assert reason.endswith(f"; its log ends: {last}")
    shared = shared_reason(reason, DEFAULT)
    assert shared == (f"{described}: {category}" if category else described)


def test_an_old_failure_line_is_not_the_category_of_a_later_end(tmp_path: Path) -> None:
    """Started again after an unexpected failure, then stopped: the category is not the old one."""
    log = tmp_path / "collaborator.log"
    log.write_text(
        f"{T.format(0)} ERROR foedus.collaborator.cli: failure: the task runner failed (KeyError)\n"
        "collaborator: error: unexpected failure: KeyError: 'x'\n"
        f"{T.format(1)} INFO foedus.collaborator.cli: collaborator alice: working for the aggregator\n"
        "collaborator: error: the aggregator refused\n",
        encoding="utf-8",
    )
    reason = failure_reason("the collaborator exited with code 1", 1, log)
    assert shared_reason(reason, DEFAULT) == "the collaborator exited with code 1"


def test_a_reason_without_a_log_and_other_reasons(tmp_path: Path) -> None:
    """No log: the exit alone. A refusal's reason leaves whole, its paths cut unless allowed."""
    described = "the collaborator stopped without recording an exit status"
    assert failure_reason(described, -1, tmp_path / "absent.log") == described
    refusal = "/srv/site/settings.yaml: data_path: /srv/data/x.csv is not a file"
    assert shared_reason(refusal, DEFAULT) == f"{SITE_PATH}: data_path: {SITE_PATH} is not a file"
    assert shared_reason(refusal, ShareWithDirector(paths=True)) == refusal


# -- log lines ----------------------------------------------------------------------------------


def test_foedus_lines_are_told_by_the_log_format_and_logger() -> None:
    """A foedus logger's line, not a runner's logger, a print, a traceback or a warning."""
    lines = LOG.splitlines()
    assert [is_foedus_line(line) for line in lines] == [
        True,
        True,
        False,  # the runner's print
        False,  # the runner's own logger
        False,  # a library's warning
        True,
        True,
        False,  # the traceback, line by line
        False,
        False,
        False,
        True,  # the Leave it sent
        True,  # the category of the failure
        False,  # the collaborator's error line, quoting the message
    ]
    assert not is_foedus_line(f"{T.format(0)} INFO collaboratorx: no")
    assert not is_foedus_line(f"  {T.format(0)} INFO foedus.collaborator.cli: indented")


def test_logs_foedus_the_default_sends_foedus_lines_without_paths(log: Path) -> None:
    """A first line says what is kept back; then foedus's lines only, paths cut; no record."""
    data = read_all(SharedLog(DEFAULT, "alice"), log)
    first, rest = data.split(b"\n", 1)
    assert b"shares only foedus's own log lines" in first and b"alice" in first
    expected = "".join(without_paths(line) for line in FOEDUS_LINES)
    assert rest.decode() == expected
    assert b"Jane Doe" not in data and b"12345" not in data and b"/srv" not in data
    assert b"ERROR foedus.collaborator.cli: failure: the task runner failed (ValueError)\n" in data
    assert f"reading {SITE_PATH}".encode() in data


def test_logs_none_sends_one_line_saying_so(log: Path) -> None:
    """logs: none: only the line saying the site shares none, whatever the log holds."""
    data = read_all(SharedLog(ShareWithDirector(logs="none"), "alice"), log)
    assert data == (
        b"[site alice shares no log lines with the director (envoy.yaml: "
        b"share_with_director.logs: none)]\n"
    )


def test_logs_all_sends_everything_paths_cut_unless_allowed(log: Path) -> None:
    """logs: all: every line, paths cut; with paths: true, the file as it is (offsets too)."""
    everything = read_all(SharedLog(ShareWithDirector(logs="all"), "alice"), log)
    assert everything.decode() == without_paths(LOG)
    assert b"Jane Doe" in everything and b"/srv" not in everything
    raw = SharedLog(ShareWithDirector(logs="all", paths=True), "alice")
    assert read_all(raw, log) == log.read_bytes()
    assert raw.read(log, 7, 5) == (len(LOG), log.read_bytes()[7:12])


@pytest.mark.parametrize("share", [DEFAULT, ShareWithDirector(logs="all")])
def test_offsets_of_the_shared_text_hold_however_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: ShareWithDirector
) -> None:
    """A growing log read in small pieces, from any offset, by a reader that has marks or a new
    one (an envoy started again): the same bytes at the same offsets; a line being written waits."""
    monkeypatch.setattr(disclosure, "_MARK_EVERY", 100)
    monkeypatch.setattr(disclosure, "_READ_BYTES", 37)
    path = tmp_path / "collaborator.log"
    path.write_text(LOG * 20, encoding="utf-8")
    reader = SharedLog(share, "alice")
    whole = read_all(reader, path, most=13)
    assert len(reader._marks) > 5  # the marks are what this exercises
    assert read_all(SharedLog(share, "alice"), path) == whole
    for offset in (0, 1, 99, 100, 101, len(whole) // 2, len(whole) - 1, len(whole)):
        assert read_all(reader, path, offset, most=50) == whole[offset:]
        assert read_all(SharedLog(share, "alice"), path, offset) == whole[offset:]
    with path.open("a", encoding="utf-8") as file:  # a line half written: not shared yet
        file.write(f"{T.format(6)} INFO foedus.collaborator.loop: round 1: tra")
    assert read_all(reader, path, len(whole)) == b""
    with path.open("a", encoding="utf-8") as file:
        file.write("in on 1200 samples: loss=0.2500\n")
    line = f"{T.format(6)} INFO foedus.collaborator.loop: round 1: train on 1200 samples: loss=0.2500\n"
    assert read_all(reader, path, len(whole)) == line.encode()
    assert read_all(SharedLog(share, "alice"), path) == whole + line.encode()


@pytest.mark.parametrize(
    "share", [DEFAULT, ShareWithDirector(logs="all"), ShareWithDirector(logs="all", paths=True)]
)
def test_a_site_keeping_its_metrics_shares_its_round_lines_without_them(
    log: Path, share: ShareWithDirector
) -> None:
    """share_with_aggregator.metrics: false: each round line leaves without its sample count
    and values, saying why; every other line leaves as it would."""
    kept = read_all(SharedLog(share, "alice", metrics=False), log)
    told = read_all(SharedLog(share, "alice"), log)
    round_line = f"{T.format(3)} INFO foedus.collaborator.loop: round 0: train"
    assert f"{round_line} on 1200 samples: loss=0.5000\n".encode() in told
    assert kept == told.replace(
        b" on 1200 samples: loss=0.5000\n",
        b": metrics kept at the site (share_with_aggregator.metrics: false)\n",
    )
    assert b"loss=" not in kept and b"1200" not in kept


def test_foedus_packages_are_pyproject_s() -> None:
    """The loggers counted as foedus's own are those of every package foedus installs."""
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text("utf-8"))
    packages = pyproject["tool"]["setuptools"]["packages"]  # sub-packages too: director.web
    assert {name.split(".", 1)[0] for name in packages} == disclosure.FOEDUS_PACKAGES
