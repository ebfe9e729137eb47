"""The envoy without a director: envoy.yaml, its durable state, the site's plan, backoff, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_disclosure import LOG

from foedus.envoy.cli import main
from foedus.envoy.client import DirectorClient
from foedus.envoy.config import (
    ConfigError,
    ShareWithAggregator,
    ShareWithDirector,
    load_config,
)
from foedus.envoy.disclosure import SharedLog, failure_reason
from foedus.envoy.errors import IllegalTransitionError, StateError, UnknownExperimentError
from foedus.envoy.leave import leave
from foedus.envoy.runtime import EnvoyLoop
from foedus.envoy.site import LOG_FILE, Site
from foedus.envoy.site_plan import (
    RefusedPlanError,
    keep_own_settings,
    site_document,
    write_site_settings,
)
from foedus.envoy.state import NO_ROUND, SITE, EnvoyState
from foedus.lifecycle.orders import LogOrder, StartOrder, Work
from foedus.lifecycle.states import TRANSITIONS, CollaboratorState
from foedus.pki.layout import CertsLayout
from foedus.plans.site_settings import load_site_settings

from directors import alias_bomb_plan
from envoys import read_all, write_envoy_config
from federation_processes import free_port, write_plan
from servers import plan_document

S = CollaboratorState


def config_file(tmp_path: Path, certs: CertsLayout, **keys: Any) -> Path:
    """An envoy.yaml for a director nobody serves."""
    return write_envoy_config(tmp_path, certs, free_port(), **keys)


def director_plan(tmp_path: Path, certs: CertsLayout, **sections: Any) -> str:
    """A plan as the director sends it: its own tls and output_dir, an initial model on its host."""
    document = plan_document(certs, **sections)
    document["aggregator"].update(
        output_dir="/director/experiments/e1/output",
        initial_model="/director/experiments/e1/initial_model.pbuf",
    )
    document["tls"] = {"certs_dir": "/director/certs"}
    return yaml.safe_dump(document)


# -- envoy.yaml ---------------------------------------------------------------------------------


def test_config_reads_every_key(tmp_path: Path, certs: CertsLayout) -> None:
    """Every key of envoy.yaml lands in the config, paths relative to the file."""
    path = config_file(
        tmp_path,
        certs,
        state_dir="state",
        runner_settings={"epochs": 2},
        review="manual",
        runners=["digits", "my_site.models:Net"],
        share_with_director={"logs": "none", "errors": "line", "paths": True},
        share_with_aggregator={"metrics": False},
        require_secure_aggregation=True,
    )
    config = load_config(path)
    assert config.director_host == "localhost"
    assert config.certs.root == certs.root
    assert config.state_dir == (tmp_path / "state").resolve()
    assert config.runners == ("digits", "my_site.models:Net")
    assert dict(config.runner_settings) == {"epochs": 2}
    assert config.manual_review
    assert config.shard.train_samples == 1200
    assert dict(config.shard.labels) == {"modality": "digits"}
    assert config.connection.backoff_max_seconds == 0.5
    assert config.share_with_director == ShareWithDirector(logs="none", errors="line", paths=True)
    assert config.require_secure_aggregation
    assert config.share_with_aggregator == ShareWithAggregator(metrics=False)
    defaults = load_config(config_file(tmp_path / "plain", certs))
    assert defaults.share_with_director == ShareWithDirector(
        logs="foedus", errors="category", paths=False
    )
    assert not defaults.require_secure_aggregation
    assert defaults.share_with_aggregator == ShareWithAggregator(metrics=True)


def test_config_names_every_problem_with_file_and_key(tmp_path: Path) -> None:
    """Unknown keys and bad values are all reported, each naming the file and its key."""
    path = tmp_path / "envoy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "director": {"host": "d", "port": "80a", "tls": True},
                "certs_dir": "certs",
                "runners": ["os.system; rm"],
                "review": "sometimes",
                "shard": {"labels": {"a": 1}, "train_samples": -1},
                "connection": {"backoff_initial_seconds": 5, "backoff_max_seconds": 1},
                "runner_setings": {},
                "share_with_director": {"logs": "some", "errors": 1, "paths": "no", "path": 1},
                "require_secure_aggregation": "yes",
                "share_with_aggregator": {"metrics": "no", "logs": True},
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    assert all(problem.startswith(f"{path}: ") for problem in problems)
    text = "\n".join(problems)
    for key in (
        "director.port: expected an integer",
        "director.tls: unknown key",
        "state_dir: required",
        "runners: expected a non-empty list",
        "review: expected one of auto, manual",
        "shard.labels: expected a mapping of text to text",
        "shard.train_samples: expected an integer",
        "connection.backoff_max_seconds: must be at least",
        "runner_setings: unknown key",
        "share_with_director.logs: expected one of none, foedus, all",
        "share_with_director.errors: expected one of category, line",
        "share_with_director.paths: expected true or false",
        "share_with_director.path: unknown key",
        "require_secure_aggregation: expected true or false",
        "share_with_aggregator.metrics: expected true or false",
        "share_with_aggregator.logs: unknown key",
    ):
        assert key in text, text


def test_config_missing_file_is_named(tmp_path: Path) -> None:
    """A missing envoy.yaml is an error naming it, never an empty config."""
    with pytest.raises(ConfigError, match=r"absent\.yaml: file not found"):
        load_config(tmp_path / "absent.yaml")


# -- durable state ------------------------------------------------------------------------------


def test_state_lifecycle_is_one_table_and_survives_reopening(tmp_path: Path) -> None:
    """Allowed moves pass, others raise; what was written is there after reopening."""
    state = EnvoyState.open(tmp_path, exclusive=True)
    state.add(
        experiment_id="e1",
        name="n",
        owner="dora",
        site="alice",
        plan_yaml="p",
        state=S.APPROVAL_PENDING,
    )
    with pytest.raises(IllegalTransitionError, match="approval_pending, it cannot become started"):
        state.transition("e1", S.STARTED)
    state.transition("e1", S.SITE_APPROVED)
    state.transition("e1", S.STARTED, pid=1234)
    with pytest.raises(UnknownExperimentError):
        state.transition("e2", S.STARTED)
    with pytest.raises(StateError, match="another envoy is using"):
        EnvoyState.open(tmp_path, exclusive=True)
    state.close()
    again = EnvoyState.open(tmp_path, exclusive=True)
    experiment = again.experiment("e1")
    assert (experiment.state, experiment.pid) == (S.STARTED, 1234)
    # Every change waits in the outbox, in order, until acknowledged.
    outgoing = again.outgoing()
    assert [r.state for r in outgoing] == [S.APPROVAL_PENDING, S.SITE_APPROVED, S.STARTED]
    again.acknowledge(outgoing[0].sequence)
    assert [r.state for r in again.outgoing()] == [S.SITE_APPROVED, S.STARTED]
    again.close()
    assert all(state.final == (not moves) for state, moves in TRANSITIONS.items())
    assert {S.SITE_REJECTED, S.REFUSED, S.GAVE_UP} == {state for state in S if state.final}


# -- the site's plan ----------------------------------------------------------------------------


def test_site_plan_uses_the_site_certificates_and_settings(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """tls points at the site's folder, the director's files are dropped; the site's own
    settings (a privacy cap too, which a plan may not hold) go in a file of their own, for
    --site-settings, and a site without any writes none."""
    own = {"epochs": 3, "dp_sgd": {"noise_multiplier": 1.0, "max_epsilon": 8}}
    config = load_config(config_file(tmp_path, certs, runner_settings=own))
    text = director_plan(tmp_path, certs, runner={"name": "digits", "settings": {"epochs": 1}})
    document = site_document(text, "alice", config, tmp_path / "e1")
    assert document["tls"] == {"certs_dir": str(certs.root)}
    assert "initial_model" not in document["aggregator"]
    assert "output_dir" not in document["aggregator"]
    assert document["runner"]["settings"] == {"epochs": 1}
    settings = write_site_settings(config, tmp_path / "e1")
    assert settings == tmp_path / "e1" / "site-settings.yaml"
    assert dict(load_site_settings(settings)) == own
    plain = load_config(config_file(tmp_path / "plain", certs))
    assert write_site_settings(plain, tmp_path / "e2") is None
    assert not (tmp_path / "e2").exists()
    # A collaborator the site's API started: the request's settings, envoy.yaml's over them.
    keep_own_settings({"epochs": 5, "batch_size": 8}, tmp_path / "e3")
    settings = write_site_settings(config, tmp_path / "e3")
    assert settings is not None
    assert dict(load_site_settings(settings)) == {"batch_size": 8, **own}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"runner": {"name": "evil.module:Runner"}}, "runner 'evil.module:Runner' is not one"),
        ({"collaborators": ["bob", "carol"]}, "this site 'alice' is not listed"),
        ({"federation": {"rounds": "many"}}, "federation.rounds: expected an integer"),
    ],
)
def test_site_plan_refusals_say_why(
    tmp_path: Path, certs: CertsLayout, change: dict[str, Any], reason: str
) -> None:
    """A runner not agreed to, a plan without this site, a bad plan: refused with the reason."""
    config = load_config(config_file(tmp_path, certs))
    with pytest.raises(RefusedPlanError, match=reason):
        site_document(director_plan(tmp_path, certs, **change), "alice", config, tmp_path)


@pytest.mark.parametrize("section", [None, {}, {"enabled": False}])
def test_site_requiring_secure_aggregation_refuses_a_plan_without_it(
    tmp_path: Path, certs: CertsLayout, section: dict[str, Any] | None
) -> None:
    """require_secure_aggregation: a plan that leaves it off (or says nothing) is refused, the
    reason naming the plan's field and the site's setting."""
    path = config_file(tmp_path, certs, require_secure_aggregation=True)
    config = load_config(path)
    sections = {} if section is None else {"secure_aggregation": section}
    text = director_plan(tmp_path, certs, **sections)
    with pytest.raises(RefusedPlanError) as refused:
        site_document(text, "alice", config, tmp_path / "e1")
    assert str(refused.value) == (
        "the director's plan: secure_aggregation.enabled: not true, and this site requires "
        f"secure aggregation ({path}: require_secure_aggregation: true)"
    )


def test_site_requiring_secure_aggregation_runs_a_secure_plan(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """The same site takes a plan with secure aggregation on, and a site that does not require
    it takes either."""
    secure = director_plan(tmp_path, certs, secure_aggregation={"enabled": True})
    demanding = load_config(config_file(tmp_path, certs, require_secure_aggregation=True))
    document = site_document(secure, "alice", demanding, tmp_path / "e1")
    assert document["secure_aggregation"] == {"enabled": True}
    relaxed = load_config(config_file(tmp_path / "relaxed", certs))
    site_document(director_plan(tmp_path, certs), "alice", relaxed, tmp_path / "e2")
    site_document(secure, "alice", relaxed, tmp_path / "e3")


@pytest.mark.parametrize("section", [None, {"enabled": False}])
def test_site_keeping_its_metrics_refuses_a_plan_without_secure_aggregation(
    tmp_path: Path, certs: CertsLayout, section: dict[str, Any] | None
) -> None:
    """share_with_aggregator.metrics: false: a plain plan (whose aggregator would refuse every
    validation without metrics) is refused, naming the plan's field and the site's setting; a
    secure one is taken."""
    path = config_file(tmp_path, certs, share_with_aggregator={"metrics": False})
    config = load_config(path)
    sections = {} if section is None else {"secure_aggregation": section}
    with pytest.raises(RefusedPlanError) as refused:
        site_document(director_plan(tmp_path, certs, **sections), "alice", config, tmp_path / "e1")
    assert str(refused.value) == (
        "the director's plan: secure_aggregation.enabled: not true, and this site keeps its "
        f"metrics, which only a secure federation accepts ({path}: share_with_aggregator: "
        "metrics: false)"
    )
    secure = director_plan(tmp_path, certs, secure_aggregation={"enabled": True})
    site_document(secure, "alice", config, tmp_path / "e2")


def test_site_plan_that_is_not_yaml_is_refused(tmp_path: Path, certs: CertsLayout) -> None:
    """Text that is not YAML is refused, never evaluated."""
    config = load_config(config_file(tmp_path, certs))
    with pytest.raises(RefusedPlanError, match="not valid YAML"):
        site_document("runner: [unclosed", "alice", config, tmp_path)
    with pytest.raises(RefusedPlanError, match="not valid YAML: could not determine a constructor"):
        site_document("!!python/object/apply:os.system ['true']", "alice", config, tmp_path)
    with pytest.raises(RefusedPlanError, match="expected a mapping of plan sections"):
        site_document("[1, 2]", "alice", config, tmp_path)


def test_site_plan_with_an_alias_bomb_in_runner_settings_is_refused(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Aliases unfolding into 10**9 strings under runner.settings: refused before expansion."""
    config = load_config(config_file(tmp_path, certs))
    bomb = alias_bomb_plan(yaml.safe_load(director_plan(tmp_path, certs)))
    with pytest.raises(RefusedPlanError) as raised:
        site_document(bomb, "alice", config, tmp_path)
    assert str(raised.value).endswith(
        "not valid YAML: YAML aliases (*name) are not accepted: write the value out"
    )


@pytest.mark.parametrize(("level", "keep"), [(None, False), ("debug", True)])
def test_a_collaborator_gets_the_sites_log_level_and_the_envoys_environment(
    tmp_path: Path,
    certs: CertsLayout,
    monkeypatch: pytest.MonkeyPatch,
    level: str | None,
    keep: bool,
) -> None:
    """`collaborator_log_level` (info by default) is its --log-level; PYTHONPATH reaches it;
    `share_with_aggregator.metrics: false` adds --keep-metrics (a secure plan's); the site's
    `runner_settings`, when it has some, are its --site-settings."""
    keys: dict[str, Any] = {} if level is None else {"collaborator_log_level": level}
    if keep:
        keys["share_with_aggregator"] = {"metrics": False}
        keys["runner_settings"] = {"epochs": 2}
    config = load_config(config_file(tmp_path, certs, **keys))
    monkeypatch.setenv("PYTHONPATH", "/site/runners")
    record = tmp_path / "collaborator.json"
    recorder = (
        sys.executable,
        "-c",
        "import json, os, sys; open(sys.argv[1], 'w').write("
        "json.dumps([sys.argv[2:], os.environ.get('PYTHONPATH')]))",
        str(record),
    )
    state = EnvoyState.open(config.state_dir, exclusive=True)
    site = Site("alice", config, state, collaborator_command=recorder)
    state.add(
        experiment_id="e1",
        name="n",
        owner="dora",
        site="alice",
        plan_yaml=director_plan(tmp_path, certs, secure_aggregation={"enabled": keep}),
        state=S.SITE_APPROVED,
    )
    try:
        site.tick()
        deadline = time.monotonic() + 30
        while site.children.poll("e1", site.folder("e1")) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        argv, pythonpath = json.loads(record.read_text(encoding="utf-8"))
        settings = str(site.folder("e1") / "site-settings.yaml")
        flags = ["--keep-metrics", "--site-settings", settings] if keep else []
        assert argv[:-1] == [
            "start",
            "-n",
            "alice",
            "--log-level",
            level or "info",
            "--no-leave",
            *flags,
            "--plan",
        ]
        assert pythonpath == "/site/runners"
    finally:
        state.close()


def test_collaborator_log_level_is_one_of_the_levels(tmp_path: Path, certs: CertsLayout) -> None:
    """Any other value stops the envoy at start with one line naming the key."""
    with pytest.raises(ConfigError, match="collaborator_log_level: expected one of debug, info"):
        load_config(config_file(tmp_path, certs, collaborator_log_level="loud"))


# -- the site without processes -----------------------------------------------------------------


def test_site_refuses_and_queues_for_review_without_starting(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """A runner not agreed to is refused at once; review: manual waits; nothing is launched."""
    config = load_config(config_file(tmp_path, certs, review="manual"))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    site = Site("alice", config, state)
    good = director_plan(tmp_path, certs)
    bad = director_plan(tmp_path, certs, runner={"name": "evil.module:Runner"})
    site.receive(
        Work(
            start=(
                StartOrder("e1", "one", "dora", good, "alice"),
                StartOrder("e2", "two", "dora", bad, "alice"),
                StartOrder("e3", "three", "dora", good, "bob"),
                StartOrder("../e4", "four", "dora", good, "alice"),
            )
        )
    )
    states = {r.experiment_id: (r.state, r.reason) for r in site.reports()}
    assert states["e1"] == (S.APPROVAL_PENDING, "waiting for the site operator: envoy approve e1")
    assert states["e2"][0] is S.REFUSED and "not one this site agreed to run" in states["e2"][1]
    assert states["e3"] == (S.REFUSED, "this envoy is site 'alice', not 'bob'")
    assert "../e4" not in states
    assert site.read_log(LogOrder("r", "e1", 0, 100)).found is False  # never started
    assert site.read_log(LogOrder("r", "other", 0, 100)).found is False
    site.receive(Work(stop=("e1",)))
    assert [r.experiment_id for r in site.reports()] == ["e2", "e3"]
    state.close()


# -- backoff and the loop -----------------------------------------------------------------------


def test_loop_keeps_trying_a_director_that_is_away(tmp_path: Path, certs: CertsLayout) -> None:
    """Against a port nobody serves, every call fails; the loop backs off, capped, and never raises."""
    config = load_config(config_file(tmp_path, certs))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    now = [0.0]
    slept: list[float] = []
    stop = threading.Event()

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds
        if len(slept) >= 60:
            stop.set()

    with DirectorClient("alice", config) as client:
        loop = EnvoyLoop(
            Site("alice", config, state),
            client,
            shard=config.shard,
            connection=config.connection,
            stop=stop,
            sleep=sleep,
            clock=lambda: now[0],
            random=lambda: 0.999,
            tick_seconds=0.05,
        )
        delays: list[float] = []
        next_delay = loop.backoff.next_delay

        def recorded() -> float:
            delays.append(next_delay())
            return delays[-1]

        loop.backoff.next_delay = recorded  # type: ignore[method-assign]
        loop.run()
    state.close()
    assert stop.is_set() and not loop.registered
    assert len(delays) >= 5, delays  # tried again and again
    assert delays[:3] == pytest.approx([0.0999, 0.1998, 0.3996])
    assert max(delays) == pytest.approx(0.4995)  # the cap, jittered


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_bad_config_is_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad envoy.yaml stops `envoy start` with exit 2 and lines naming file and key."""
    path = tmp_path / "envoy.yaml"
    path.write_text("director: {host: d, port: 1}\nbogus: 1\n", encoding="utf-8")
    assert main(["start", "-n", "alice", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"envoy: error: {path}: bogus: unknown key" in err
    assert "Traceback" not in err


def test_cli_start_refuses_a_site_without_its_certificate(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name with no certificate in certs_dir stops the envoy at start, exit 2, one line."""
    path = config_file(tmp_path, certs)
    assert main(["start", "-n", "mallory", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "certs_dir: certificate of 'mallory' not found" in err[0], err


def test_cli_review_acts_on_the_durable_state(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """approve and reject move waiting experiments; others and unknown ids are refused, exit 1."""
    path = config_file(tmp_path, certs, review="manual")
    config = load_config(path)
    assert main(["approve", "e1", "--config", str(path)]) == 1
    assert "no envoy state" in capsys.readouterr().err
    state = EnvoyState.open(config.state_dir, exclusive=True)  # as the running envoy holds it
    for experiment_id in ("e1", "e2"):
        state.add(
            experiment_id=experiment_id,
            name=experiment_id,
            owner="dora",
            site="alice",
            plan_yaml="",
            state=S.APPROVAL_PENDING,
        )
    assert main(["approve", "e1", "--config", str(path)]) == 0
    assert "approved" in capsys.readouterr().out
    assert main(["reject", "e2", "--config", str(path), "--reason", "not on weekends"]) == 0
    assert main(["approve", "e2", "--config", str(path)]) == 1
    assert "is site rejected: only one waiting for approval" in capsys.readouterr().err
    assert main(["approve", "e9", "--config", str(path)]) == 1
    assert "no experiment 'e9'" in capsys.readouterr().err
    assert state.experiment("e1").state is S.SITE_APPROVED
    assert (state.experiment("e2").state, state.experiment("e2").reason) == (
        S.SITE_REJECTED,
        "not on weekends",
    )
    assert main(["list", "--config", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "site_rejected" in listing and "not on weekends" in listing
    state.close()


def test_cli_list_and_review_print_others_text_without_controls(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name, an owner and a reason holding escape sequences: `envoy list` and `approve` print
    them without ESC, the C0/C1 controls or bidi overrides."""
    escapes = "\x1b]0;owned\x07\x1b[2J\r\x9b\u202e"
    path = config_file(tmp_path, certs, review="manual")
    state = EnvoyState.open(load_config(path).state_dir, exclusive=True)
    state.add(
        experiment_id="e1",
        name=f"name{escapes}",
        owner=f"dora{escapes}",
        site="alice",
        plan_yaml="",
        state=S.APPROVAL_PENDING,
        reason=f"why{escapes}",
    )
    assert main(["approve", "e1", "--config", str(path)]) == 0
    assert main(["list", "--config", str(path)]) == 0
    state.close()
    out = capsys.readouterr().out
    assert "name]0;owned[2J" in out and "dora]0;owned" in out
    assert not set("\x1b\x07\r\x9b\u202e") & set(out), repr(out)


def test_cli_list_aligns_columns_of_any_width(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names, owners and states longer than any fixed width still start under their headings."""
    path = config_file(tmp_path, certs)
    state = EnvoyState.open(load_config(path).state_dir, exclusive=True)
    rows = [
        ("e1", "a", "o", S.APPROVAL_PENDING, ""),
        ("e2-" + "x" * 60, "a name longer than twenty characters", "an-owner-of-many-letters",
         S.SITE_REJECTED, "not on weekends"),
    ]  # fmt: skip
    for experiment_id, name, owner, collaborator_state, reason in rows:
        state.add(
            experiment_id=experiment_id,
            name=name,
            owner=owner,
            site="alice",
            plan_yaml="",
            state=S.APPROVAL_PENDING,
        )
        if collaborator_state is S.SITE_REJECTED:
            state.transition(experiment_id, collaborator_state, reason=reason)
    state.close()
    assert main(["list", "--config", str(path)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    starts = [header.index(title) for title in ("NAME", "OWNER", "STATE", "DETAIL")]
    assert len(lines) == 2
    for line, (_, name, owner, collaborator_state, reason) in zip(lines, rows, strict=True):
        cells = (name, owner, collaborator_state.value, reason or None)
        for start, cell in zip(starts, cells, strict=True):
            if cell is not None:  # an empty last cell: the line ends before it (no blanks)
                assert line[start:].startswith(cell + "  ") or line[start:] == cell, (line, cell)
                assert line[start - 2 : start] == "  ", line


def test_help_is_true(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists the subcommands and the exit statuses."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("start", "approve", "reject", "list", "never exits because the director is away"):
        assert word in out


def test_a_plain_plan_is_accepted_as_it_is(tmp_path: Path, certs: CertsLayout) -> None:
    """write_plan makes a plan the envoy accepts as it is (no tls of the director's to drop)."""
    config = load_config(config_file(tmp_path, certs))
    plan = write_plan(tmp_path / "plan", certs, 1)
    site_document(plan.read_text(encoding="utf-8"), "alice", config, tmp_path)


def test_a_collaborator_started_but_not_recorded_is_adopted_not_started_twice(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Killed between starting a collaborator and recording it, the envoy finds it by its folder."""
    config = load_config(config_file(tmp_path, certs))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    sleeper = (sys.executable, "-c", "import time; time.sleep(120)")
    first = Site("alice", config, state, collaborator_command=sleeper)
    state.add(
        experiment_id="e1",
        name="n",
        owner="dora",
        site="alice",
        plan_yaml=director_plan(tmp_path, certs),
        state=S.SITE_APPROVED,
    )
    folder = first.folder("e1")
    folder.mkdir(parents=True)
    pid = first.children.start("e1", (*sleeper, "start"), folder)  # the envoy "dies" here
    try:
        second = Site("alice", config, state, collaborator_command=sleeper)
        second.tick()
        experiment = state.experiment("e1")
        assert (experiment.state, experiment.pid) == (S.STARTED, pid)
        assert second.children.poll("e1", folder) is None
    finally:
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while first.children.poll("e1", folder) is None:  # reaped: no zombie left
            assert time.monotonic() < deadline
            time.sleep(0.05)
        state.close()


# -- collaborators that die: restarted in a row, or given up -----------------------------------

# A stand-in for `collaborator start`: each start takes the next "ROUND:CODE" of a script file,
# logs that round as finished (as collaborator.loop does; "-": none) and exits with CODE.
FAKE_COLLABORATOR = """
import sys, time
from pathlib import Path
script = Path(sys.argv[1])
steps = script.read_text().split()
step, rest = steps[0], steps[1:]
script.write_text(" ".join(rest))
done, code = step.split(":")
if done != "-":
    stamp = time.strftime("%Y-%m-%d %H:%M:%S,000")
    print(f"{stamp} INFO foedus.collaborator.loop: round {done}: train on 1 samples: loss=1", flush=True)
print(f"start {step}: exiting with {code}", flush=True)
sys.exit(int(code))
"""


class Leaves(list[tuple[str, Path, str, str]]):
    """The Leave calls a site made, recorded instead of sent."""

    def __call__(self, experiment_id: str, plan: Path, site: str, reason: str) -> None:
        self.append((experiment_id, plan, site, reason))


def fake_site(
    tmp_path: Path, certs: CertsLayout, steps: str, leaves: Leaves | None = None
) -> tuple[Site, Path]:
    """A site whose collaborators follow `steps`, and the script file they consume."""
    config = load_config(config_file(tmp_path, certs))
    program, script = tmp_path / "fake_collaborator.py", tmp_path / "steps"
    program.write_text(FAKE_COLLABORATOR, encoding="utf-8")
    script.write_text(steps, encoding="utf-8")
    state = EnvoyState.open(config.state_dir, exclusive=True)
    command = (sys.executable, str(program), str(script))
    site = Site(
        "alice",
        config,
        state,
        collaborator_command=command,
        leave=Leaves() if leaves is None else leaves,
    )
    return site, script


def tick_until(site: Site, what: str, check: Any, timeout: float = 60) -> None:
    """Tick the site until `check()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        site.tick()
        time.sleep(0.05)


def start_order(tmp_path: Path, certs: CertsLayout, experiment_id: str = "e1") -> Work:
    """The director's start of one experiment at alice."""
    return Work(
        start=(StartOrder(experiment_id, "n", "dora", director_plan(tmp_path, certs), "alice"),)
    )


def test_restarts_are_counted_in_a_row_across_an_envoy_restart(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """A collaborator that dies is started again; a round finished since its last restart
    starts the count again; the count survives the envoy's restart; the 4th death in a row
    without progress gives it up, naming why and its last line."""
    leaves = Leaves()
    site, script = fake_site(tmp_path, certs, "0:1 -:1 -:1 1:1 -:1 -:1 -:1", leaves)
    site.receive(start_order(tmp_path, certs))
    tick_until(site, "the 5th start", lambda: len(script.read_text().split()) <= 2)
    deadline = time.monotonic() + 60
    while site.children.poll("e1", site.folder("e1")) is None:  # it dies while no envoy runs
        assert time.monotonic() < deadline, "the 5th start never ended"
        time.sleep(0.05)
    state, command = site.state, site.collaborator_command
    state.close()  # the envoy stops here and is started again with the same state
    state = EnvoyState.open(state.folder, exclusive=True)
    site = Site("alice", site.config, state, collaborator_command=command, leave=leaves)
    site.recover()
    tick_until(site, "the collaborator given up", lambda: state.experiment("e1").state.final)
    experiment = state.experiment("e1")
    assert script.read_text().split() == []  # 7 starts: 1 + 3 restarts, then 3 more in a row
    assert (experiment.state, experiment.exit_code) == (S.GAVE_UP, 1)
    assert experiment.reason == (
        "it died 4 times in a row; the collaborator exited with code 1; "
        "its log ends: start -:1: exiting with 1"
    )
    states = [r.state for r in state.outgoing()]
    assert states.count(S.STARTED) == 7 and states[-1] is S.GAVE_UP
    # The aggregator is told the site left, once, with the category and not the log's line.
    plan = site.folder("e1") / "plan.yaml"
    assert leaves == [("e1", plan, "alice", "the site gave it up: it died 4 times in a row")]
    state.close()


def test_exit_2_is_given_up_at_once(tmp_path: Path, certs: CertsLayout) -> None:
    """Exit 2 (a bad plan or settings): given up without a restart, the reason saying why."""
    leaves = Leaves()
    site, script = fake_site(tmp_path, certs, "-:2 -:1", leaves)
    site.receive(start_order(tmp_path, certs))
    tick_until(site, "the collaborator given up", lambda: site.state.experiment("e1").state.final)
    experiment = site.state.experiment("e1")
    assert (experiment.state, experiment.exit_code, experiment.restarts) == (S.GAVE_UP, 2, 0)
    assert experiment.reason.startswith(
        "a bad plan or settings; the collaborator exited with code 2"
    )
    assert script.read_text().split() == ["-:1"]  # started once
    assert [reason for *_, reason in leaves] == ["the site gave it up: a bad plan or settings"]
    site.state.close()


def test_the_operators_stop_gives_up_and_the_directors_stop_ends(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Two running collaborators: the site operator's stop gives one up; the director's stop
    ends the other as exited; the director's later stop of the first changes nothing."""
    config = load_config(config_file(tmp_path, certs))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    sleeper = (sys.executable, "-c", "import time; time.sleep(120)")
    leaves = Leaves()
    site = Site(
        "alice",
        config,
        state,
        collaborator_command=sleeper,
        stop_patience_seconds=0.1,
        leave=leaves,
    )
    site.receive(
        Work(
            start=(
                *start_order(tmp_path, certs, "e1").start,
                *start_order(tmp_path, certs, "e2").start,
            )
        )
    )
    tick_until(site, "both started", lambda: all(e.state is S.STARTED for e in state.experiments()))
    site.stop_collaborator("e1")
    site.receive(Work(stop=("e2",)))
    tick_until(site, "both done", lambda: all(e.done for e in state.experiments()))
    site.receive(Work(stop=("e1",)))
    first, second = state.experiment("e1"), state.experiment("e2")
    assert first.state is S.GAVE_UP and first.exit_code != 0
    assert first.reason.startswith("stopped by the site's operator; the collaborator "), first
    assert second.state is S.EXITED and second.exit_code != 0
    assert leaves == [
        (
            "e1",
            site.folder("e1") / "plan.yaml",
            "alice",
            "the site gave it up: stopped by the site's operator",
        )
    ]
    state.close()


def test_a_version_1_state_is_migrated(tmp_path: Path) -> None:
    """An envoy.sqlite of schema 1 (no restart_round) opens, migrated, its experiments intact."""
    state = EnvoyState.open(tmp_path, exclusive=True)
    state.add(
        experiment_id="e1",
        name="n",
        owner="dora",
        site="alice",
        plan_yaml="p",
        state=S.SITE_APPROVED,
    )
    state.transition("e1", S.STARTED, pid=1234, restarted=True, restart_round=3)
    state.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "envoy.sqlite")) as db, db:
        db.execute("ALTER TABLE experiments DROP COLUMN restart_round")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    again = EnvoyState.open(tmp_path, exclusive=True)
    experiment = again.experiment("e1")
    assert (experiment.state, experiment.pid, experiment.restarts) == (S.STARTED, 1234, 1)
    assert experiment.restart_round == NO_ROUND
    again.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "envoy.sqlite")) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("2",)


def test_a_death_noted_but_not_acted_on_is_acted_on_at_the_next_tick(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """Killed between noting a collaborator's death and starting it again, the envoy starts it
    again at its next tick (one restart in a row); one that exited 2 is given up instead."""
    site, script = fake_site(tmp_path, certs, "-:1 -:1 -:1")
    plan = director_plan(tmp_path, certs)
    for experiment_id, code in (("e1", 1), ("e2", 2)):
        site.state.add(
            experiment_id=experiment_id,
            name="n",
            owner="dora",
            site="alice",
            plan_yaml=plan,
            state=S.SITE_APPROVED,
        )
        site.state.transition(experiment_id, S.STARTED, pid=None)
        site.state.transition(experiment_id, S.EXITED, exit_code=code, reason="killed")
        site.folder(experiment_id).mkdir(parents=True)
    site.tick()
    started, given_up = site.state.experiment("e1"), site.state.experiment("e2")
    assert (started.state, started.restarts) == (S.STARTED, 1)
    assert (given_up.state, given_up.reason) == (S.GAVE_UP, "a bad plan or settings; killed")
    tick_until(site, "e1 given up", lambda: site.state.experiment("e1").state.final)
    assert site.state.experiment("e1").reason.startswith("it died 4 times in a row; ")
    assert script.read_text().split() == []  # the death before, then 3 starts
    site.state.close()


def test_a_leave_that_cannot_be_sent_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No site plan to call from: False, and a warning naming the experiment and the site."""
    assert leave("e1", tmp_path / "missing" / "plan.yaml", "alice", "the site gave it up") is False
    assert "experiment e1: could not tell the aggregator that alice left" in caplog.text


def test_a_site_keeping_its_metrics_keeps_them_from_the_directors_logs(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """share_with_aggregator.metrics: false: the log the director reads has the collaborator's
    round lines without their values."""
    config = load_config(config_file(tmp_path, certs, share_with_aggregator={"metrics": False}))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    plan = director_plan(tmp_path, certs, secure_aggregation={"enabled": True})
    state.add(
        experiment_id="e1", name="n", owner="dora", site="alice", plan_yaml=plan, state=S.STARTED
    )
    site = Site("alice", config, state)
    site.folder("e1").mkdir(parents=True)
    (site.folder("e1") / LOG_FILE).write_text(LOG, encoding="utf-8")
    try:
        piece = site.read_log(LogOrder("r", "e1", 0, 1 << 20))
        assert piece.found and piece.size == len(piece.data)
        assert b"round 0: train: metrics kept at the site" in piece.data
        assert b"loss=" not in piece.data
    finally:
        state.close()


def test_the_director_gets_logs_and_reasons_as_the_site_shares_them(
    tmp_path: Path, certs: CertsLayout
) -> None:
    """read_log serves the shared text by its offsets, piece by piece, the same from an envoy
    started again; reports carry the shared reason while the site's state keeps all of it; the
    logs of the site's own collaborators are not the director's to read."""
    config = load_config(config_file(tmp_path, certs))
    state = EnvoyState.open(config.state_dir, exclusive=True)
    plan = director_plan(tmp_path, certs)
    state.add(
        experiment_id="e1", name="n", owner="dora", site="alice", plan_yaml=plan, state=S.STARTED
    )
    state.add(
        experiment_id="own",
        name="n",
        owner="site",
        site="alice",
        plan_yaml=plan,
        state=S.STARTED,
        origin=SITE,  # started by the site's API
    )
    first = Site("alice", config, state)
    for experiment_id in ("e1", "own"):
        first.folder(experiment_id).mkdir(parents=True)
        (first.folder(experiment_id) / LOG_FILE).write_text(LOG * 3, encoding="utf-8")
    log = first.folder("e1") / LOG_FILE
    try:
        shared, offset = b"", 0
        for site in (first, Site("alice", config, state)):  # the second: after a restart
            for _ in range(1000):
                piece = site.read_log(LogOrder("r", "e1", offset, 100))
                assert piece.found
                if not piece.data or (site is first and offset > 600):
                    break
                shared, offset = shared + piece.data, offset + len(piece.data)
        assert shared == read_all(SharedLog(ShareWithDirector(), "alice"), log)
        assert b"loss=0.5000" in shared  # a site that keeps its metrics: test_disclosure.py
        assert (
            b"ERROR foedus.collaborator.cli: failure: the task runner failed (ValueError)" in shared
        )
        assert b"Jane Doe" not in shared and b"/srv" not in shared

        reason = failure_reason("the collaborator exited with code 1", 1, log)
        state.transition("e1", S.EXITED, exit_code=1, reason=reason)
        assert state.experiment("e1").reason == reason and "Jane Doe" in reason
        category = "the collaborator exited with code 1: the task runner failed (ValueError)"
        assert {r.reason for r in first.unreported() if r.experiment_id == "e1"} >= {category}
        assert "Jane Doe" not in repr(first.unreported()) + repr(first.reports())
        assert [r.reason for r in first.reports() if r.experiment_id == "e1"] == [category]
        assert first.read_log(LogOrder("r", "own", 0, 100)).found is False
    finally:
        state.close()
