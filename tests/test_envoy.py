"""The envoy without a director: envoy.yaml, its durable state, the site's plan, backoff, the CLI."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from director.orders import LogOrder, StartOrder, Work
from envoy.cli import main
from envoy.client import DirectorClient
from envoy.config import ConfigError, load_config
from envoy.errors import IllegalTransitionError, StateError, UnknownExperimentError
from envoy.runtime import Backoff, EnvoyLoop
from envoy.site import Site
from envoy.site_plan import RefusedPlanError, site_document
from envoy.state import TRANSITIONS, CollaboratorState, EnvoyState
from pki.layout import CertsLayout

from envoys import write_envoy_config
from processes import free_port, write_plan
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
    """tls points at the site's folder, the director's files are dropped, site settings win."""
    config = load_config(config_file(tmp_path, certs, runner_settings={"epochs": 3}))
    text = director_plan(tmp_path, certs, runner={"name": "digits", "settings": {"epochs": 1}})
    document = site_document(text, "alice", config, tmp_path / "e1")
    assert document["tls"] == {"certs_dir": str(certs.root)}
    assert "initial_model" not in document["aggregator"]
    assert "output_dir" not in document["aggregator"]
    assert document["runner"]["settings"] == {"epochs": 3}


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


def test_site_plan_that_is_not_yaml_is_refused(tmp_path: Path, certs: CertsLayout) -> None:
    """Text that is not YAML is refused, never evaluated."""
    config = load_config(config_file(tmp_path, certs))
    with pytest.raises(RefusedPlanError, match="not valid YAML"):
        site_document("runner: [unclosed", "alice", config, tmp_path)
    with pytest.raises(RefusedPlanError, match="not valid YAML: could not determine a constructor"):
        site_document("!!python/object/apply:os.system ['true']", "alice", config, tmp_path)
    with pytest.raises(RefusedPlanError, match="expected a mapping of plan sections"):
        site_document("[1, 2]", "alice", config, tmp_path)


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


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    """Delays double from the initial one, stop at the cap, and jitter within [1/2, 1)."""
    low = Backoff(0.1, 1.0, random=lambda: 0.0)
    assert [round(low.next_delay(), 3) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    high = Backoff(0.1, 1.0, random=lambda: 0.999)
    delays = [high.next_delay() for _ in range(100)]
    assert max(delays) <= 1.0
    high.reset()
    assert high.next_delay() < 0.1


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
    assert delays[:3] == pytest.approx([0.09995, 0.1999, 0.3998])
    assert max(delays) == pytest.approx(0.49975)  # the cap, jittered


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
