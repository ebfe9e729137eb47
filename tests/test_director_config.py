"""director.yaml loading (strict, every problem named) and the plan the director writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from foedus.director.experiment_plan import (
    OWNED,
    check_submitted,
    plan_liveness,
    write_director_plan,
)
from foedus.plans.director_config import ConfigError, DirectorConfig, SiteLossPolicy, load_config
from foedus.plans.loader import PlanError, load_plan
from foedus.refusals.errors import InvalidRequestError, LimitExceededError

REPO = Path(__file__).resolve().parent.parent
MINIMAL = {"host": "localhost", "certs_dir": "certs", "state_dir": "state", "envoys": ["alice"]}


def write(tmp_path: Path, document: object) -> Path:
    """director.yaml with `document` in tmp_path."""
    path = tmp_path / "director.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_a_minimal_config_gets_every_default(tmp_path: Path) -> None:
    """Four keys are enough; paths resolve relative to the file."""
    config = load_config(write(tmp_path, MINIMAL))
    assert config.certs.root == tmp_path / "certs"
    assert config.state_dir == tmp_path / "state"
    assert (config.listen_address, config.port) == ("0.0.0.0", 50050)
    assert config.aggregator_ports == range(50100, 50200)
    assert (config.users, config.admins, config.manual_review) == ((), (), False)
    assert (config.health_check_seconds, config.max_running_experiments) == (10.0, 2)
    assert config.max_running_per_user == 2  # no people listed: the limit never applies
    assert config.liveness.min_sites is None and config.liveness.offline_grace_seconds == 300
    assert config.limits.max_plan_bytes == 1024 * 1024
    assert (config.limits.max_calls_per_identity, config.limits.max_people_calls) == (8, 64)
    assert config.limits.idle_stream_seconds == 30
    assert config.runners == ("digits",)  # the built-in runners only


def test_every_key_is_read(tmp_path: Path) -> None:
    """A config setting every key is loaded as written."""
    document = {
        **MINIMAL,
        "listen": {"address": "127.0.0.1", "port": 0},
        "aggregator": {"listen_address": "127.0.0.1", "ports": [6000, 6009]},
        "envoys": ["alice", "bob"],
        "users": ["ada"],
        "admins": ["root"],
        "review": "manual",
        "health_check_seconds": 0.5,
        "max_running_experiments": 3,
        "max_running_per_user": 2,
        "limits": {
            "max_plan_bytes": 4096,
            "max_model_bytes": 8192,
            "chunk_bytes": 2048,
            "max_calls_per_identity": 3,
            "max_people_calls": 20,
            "idle_stream_seconds": 2.5,
        },
        "liveness": {"min_sites": 1, "mandatory_sites": ["bob"], "offline_grace_seconds": 7},
        "runners": ["digits", "my_lab.models:Net"],
    }
    config = load_config(write(tmp_path, document))
    assert config.runners == ("digits", "my_lab.models:Net")
    assert (config.max_running_experiments, config.max_running_per_user) == (3, 2)
    assert load_config(write(tmp_path, {**MINIMAL, "runners": []})).runners == ()
    assert config.port == 0 and config.aggregator_ports == range(6000, 6010)
    assert config.manual_review and config.admins == ("root",)
    assert config.liveness.mandatory_sites == ("bob",)
    assert (config.limits.max_model_bytes, config.limits.chunk_bytes) == (8192, 2048)
    assert (config.limits.max_calls_per_identity, config.limits.max_people_calls) == (3, 20)
    assert config.limits.idle_stream_seconds == 2.5


BAD: list[tuple[dict[str, Any], str]] = [
    ({"envoys": None}, "envoys: expected a list of names"),
    ({"colour": "red"}, "colour: unknown key"),
    (
        {"runners": ["os.system; rm"]},
        "runners: expected a list of runner names (built-in or package.module:Class)",
    ),
    ({"runners": "digits"}, "runners: expected a list of runner names"),
    ({"listen": {"port": 70000}}, "listen.port: expected an integer 0-65535"),
    ({"listen": {"adress": "x"}}, "listen.adress: unknown key"),
    ({"aggregator": {"ports": [6010, 6000]}}, "aggregator.ports: expected [first, last]"),
    ({"aggregator": {"ports": "6000-6010"}}, "aggregator.ports: expected [first, last]"),
    ({"review": "sometimes"}, "review: expected one of auto, manual"),
    ({"health_check_seconds": 0}, "health_check_seconds: expected a number"),
    ({"max_running_experiments": 0}, "max_running_experiments: expected an integer 1-10000"),
    ({"max_running_per_user": 0}, "max_running_per_user: expected an integer 1-10000, got 0"),
    ({"max_running_per_user": -1}, "max_running_per_user: expected an integer 1-10000, got -1"),
    (
        {"max_running_per_user": "two"},
        "max_running_per_user: expected an integer 1-10000, got 'two'",
    ),
    ({"max_running_per_user": True}, "max_running_per_user: expected an integer 1-10000"),
    (
        {"max_running_per_user": 3},
        "max_running_per_user: 3 is above max_running_experiments 2; one owner can never run "
        "more than all of them (at most 2, or leave it out for the fair share)",
    ),
    ({"limits": {"max_plan_bytes": 10}}, "limits.max_plan_bytes: expected an integer"),
    (
        {"limits": {"max_calls_per_identity": 0}},
        "limits.max_calls_per_identity: expected an integer 1-1000",
    ),
    ({"limits": {"max_people_calls": "many"}}, "limits.max_people_calls: expected an integer"),
    ({"limits": {"idle_stream_seconds": 0}}, "limits.idle_stream_seconds: expected a number"),
    ({"liveness": {"min_sites": 0}}, "liveness.min_sites: expected an integer"),
    ({"liveness": {"mandatory_sites": ["zed"]}}, "liveness.mandatory_sites: zed not in envoys"),
    ({"users": ["alice"]}, "envoys: alice also listed as users or admins"),
    ({"admins": ["alice"]}, "envoys: alice also listed as users or admins"),
    (
        {"listen": {"port": 6001}, "aggregator": {"ports": [6000, 6002]}},
        "listen.port: 6001 is in aggregator.ports 6000-6002",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_a_bad_key_is_named_with_the_file(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """Each bad value is one problem line: the file, the key path, what is wrong."""
    path = write(tmp_path, {**MINIMAL, **change})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any(line.startswith(f"{path}: {message}") for line in raised.value.problems), (
        raised.value.problems
    )


@pytest.mark.parametrize(
    ("most", "users", "admins", "share"),
    [
        (2, ["ada", "bea"], ["root"], 1),  # ceil(2 / 3)
        (5, ["ada"], ["root"], 3),  # ceil(5 / 2)
        (4, ["ada", "bea"], ["root", "ada"], 2),  # ada counted once: ceil(4 / 3)
        (1, [f"u{n}" for n in range(20)], [], 1),  # never below 1
        (3, ["ada"], [], 3),  # one person: every place, never above max_running_experiments
    ],
)
def test_the_default_per_user_limit_is_a_fair_share(
    tmp_path: Path, most: int, users: list[str], admins: list[str], share: int
) -> None:
    """Absent (or null): ceil(max_running_experiments / people in users and admins)."""
    document = {**MINIMAL, "max_running_experiments": most, "users": users, "admins": admins}
    assert load_config(write(tmp_path, document)).max_running_per_user == share
    document["max_running_per_user"] = None
    assert load_config(write(tmp_path, document)).max_running_per_user == share


@pytest.mark.parametrize("key", ["host", "certs_dir", "state_dir", "envoys"])
def test_required_keys_are_named_when_missing(tmp_path: Path, key: str) -> None:
    """Leaving out a required key says so, by name."""
    path = write(tmp_path, {k: v for k, v in MINIMAL.items() if k != key})
    with pytest.raises(ConfigError, match=f"{key}: required, but missing"):
        load_config(path)


def test_a_per_user_limit_is_not_compared_with_a_bad_total(tmp_path: Path) -> None:
    """max_running_experiments 0 and max_running_per_user 3: one line, the total's."""
    path = write(tmp_path, {**MINIMAL, "max_running_experiments": 0, "max_running_per_user": 3})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems == [
        f"{path}: max_running_experiments: expected an integer 1-10000, got 0"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Three mistakes, three lines."""
    path = write(tmp_path, {**MINIMAL, "review": 1, "colour": 2, "listen": {"port": "x"}})
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert len(raised.value.problems) == 3


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    """No file, or not YAML: one problem naming the file."""
    with pytest.raises(ConfigError, match=r"director\.yaml: file not found"):
        load_config(tmp_path / "director.yaml")
    (tmp_path / "director.yaml").write_text("envoys: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"director\.yaml: line \d+: not valid YAML"):
        load_config(tmp_path / "director.yaml")


# --- submitted plans ------------------------------------------------------------------------


def submitted(**changes: Any) -> dict[str, Any]:
    """plans/local.yaml without the director's fields, with `changes` merged into its sections."""
    document: dict[str, Any] = yaml.safe_load((REPO / "plans/local.yaml").read_text("utf-8"))
    for section, key in OWNED:
        if key is None:
            document.pop(section, None)
        else:
            document.get(section, {}).pop(key, None)
    for section, value in changes.items():
        base = document.get(section)
        document[section] = {**base, **value} if isinstance(base, dict) else value
    return document


SITES = ("alice", "bob", "carol")
# check_submitted's limits and rules, as a director with the default runners has them.
CHECKS: dict[str, Any] = {
    "registered": SITES,
    "max_bytes": 1 << 20,
    "runners": ("digits",),
    "initial_model": False,
}


def test_a_good_submission_is_accepted() -> None:
    """The demo plan without the director's fields passes, and its sites and rounds are read."""
    plan = check_submitted(yaml.safe_dump(submitted()), **CHECKS)
    assert (plan.name, plan.sites, plan.rounds) == ("local-demo", SITES, 10)


@pytest.mark.parametrize(("section", "key"), OWNED, ids=str)
def test_a_field_the_director_owns_is_refused(section: str, key: str | None) -> None:
    """Each owned field, set, is refused by its key path."""
    document = submitted()
    if key is None:
        document[section] = {"insecure": True}
    else:
        document.setdefault(section, {})[key] = "x"
    name = section + (f".{key}" if key else "")
    with pytest.raises(InvalidRequestError, match=rf"submitted plan: {name}: set by the director"):
        check_submitted(yaml.safe_dump(document), **CHECKS)


HOSTILE: list[tuple[str, str]] = [
    ("federation: [\n", r"submitted plan: line \d+: not valid YAML"),
    ("- a\n- b\n", "expected a mapping of plan sections"),
    (
        yaml.safe_dump(submitted(collaborators=["alice", "mallory"])),
        "not registered with this director: mallory",
    ),
    (yaml.safe_dump(submitted(federation={"rounds": 0})), "federation.rounds: expected an integer"),
    (yaml.safe_dump(submitted(colour="red")), "submitted plan: colour: unknown key"),
    (yaml.safe_dump(submitted(runner={"name": "os.system; rm"})), "runner.name: expected a name"),
    (
        yaml.safe_dump(submitted(liveness={"grace": 5})),
        "submitted plan: liveness.grace: unknown key",
    ),
    (
        yaml.safe_dump(submitted(liveness={"offline_grace_seconds": -1})),
        "liveness.offline_grace_seconds: expected a number",
    ),
    (
        yaml.safe_dump(submitted(liveness={"mandatory_sites": ["dave"]})),
        "submitted plan: liveness.mandatory_sites: dave not among the collaborators",
    ),
    (
        yaml.safe_dump(submitted(liveness={"min_sites": 4})),
        "submitted plan: liveness.min_sites: 4 is more than the plan's 3 collaborators",
    ),
    (yaml.safe_dump(submitted(liveness=[1])), "liveness: expected a mapping"),
]


@pytest.mark.parametrize(("text", "message"), HOSTILE, ids=range(len(HOSTILE)))
def test_a_bad_submission_names_its_problem(text: str, message: str) -> None:
    """Unparseable, unknown sites, out of range, unknown key: InvalidRequestError naming it."""
    with pytest.raises(InvalidRequestError, match=message):
        check_submitted(text, **CHECKS)


def test_a_plans_liveness_is_read_over_the_directors_and_kept_from_the_aggregator(
    tmp_path: Path,
) -> None:
    """The plan's liveness keys replace director.yaml's, the others stay; plan.yaml has none."""
    text = yaml.safe_dump(
        submitted(liveness={"min_sites": 2, "offline_grace_seconds": 5}),
    )
    check_submitted(text, **CHECKS)
    defaults = SiteLossPolicy(min_sites=None, mandatory_sites=("carol",), offline_grace_seconds=300)
    assert plan_liveness(text, defaults) == SiteLossPolicy(2, ("carol",), 5)
    assert plan_liveness(yaml.safe_dump(submitted()), defaults) == defaults
    config = load_config(write(tmp_path, MINIMAL))
    path, _ = write_director_plan(
        text,
        experiment_id="e1",
        port=50123,
        config=config,
        folder=tmp_path / "e1",
        initial_model=None,
    )
    assert "liveness" not in yaml.safe_load(path.read_text(encoding="utf-8"))
    with pytest.raises(PlanError, match="liveness: unknown key"):
        load_plan(text_file(tmp_path / "aggregator-plan.yaml", path, liveness={"min_sites": 2}))


def text_file(target: Path, plan: Path, **sections: object) -> Path:
    """`plan` with `sections` added, written to `target`."""
    document = {**yaml.safe_load(plan.read_text(encoding="utf-8")), **sections}
    target.write_text(yaml.safe_dump(document), encoding="utf-8")
    return target


def test_an_oversized_plan_is_refused_before_parsing() -> None:
    """Over max_plan_bytes: LimitExceededError naming the setting."""
    with pytest.raises(LimitExceededError, match=r"limits\.max_plan_bytes"):
        check_submitted("#" * 5000, **{**CHECKS, "max_bytes": 4096})


def test_the_director_plan_sets_its_fields_and_loads(tmp_path: Path) -> None:
    """The written plan carries the experiment's uuid, port, certificates and folder, and loads."""
    config: DirectorConfig = load_config(
        write(tmp_path, {**MINIMAL, "aggregator": {"listen_address": "127.0.0.1"}})
    )
    model = tmp_path / "model.pbuf"
    model.write_bytes(b"")
    folder = tmp_path / "state" / "experiments" / "e1"
    text = yaml.safe_dump(submitted())
    path, plan = write_director_plan(
        text, experiment_id="e1", port=50123, config=config, folder=folder, initial_model=model
    )
    assert path == folder / "plan.yaml"
    assert (plan.federation.uuid, plan.federation.aggregator_id) == ("e1", "aggregator_e1")
    assert (plan.aggregator.host, plan.aggregator.port) == ("localhost", 50123)
    assert plan.aggregator.listen_address == "127.0.0.1"
    assert plan.aggregator.output_dir == folder / "output"
    assert plan.aggregator.initial_model == model
    assert plan.tls.certs is not None and plan.tls.certs.root == tmp_path / "certs"
    assert plan.collaborators == SITES and plan.federation.rounds == 10
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("sections", "offline_after"),
    [
        ({"liveness": {"min_sites": 2, "offline_grace_seconds": 30}}, 2 * 10 + 30),
        # No less than twice the collaborators' heartbeat, which the plan requires.
        ({"liveness": {"min_sites": 2, "offline_grace_seconds": 1}}, 2 * 15),
        ({"liveness": {"min_sites": 2}, "straggler": {"offline_after_seconds": 40}}, 40),
        ({"liveness": {"min_sites": 3}}, None),
        ({}, None),
    ],
    ids=["min_sites", "heartbeat_floor", "plan_sets_it", "all_sites", "default"],
)
def test_the_aggregator_stops_waiting_for_a_site_the_director_counts_lost(
    tmp_path: Path, sections: dict[str, Any], offline_after: float | None
) -> None:
    """min_sites below the sites: offline_after_seconds is when the director counts a silent
    site lost (2 health periods + the grace), unless the plan sets it; else it stays unset."""
    config = load_config(write(tmp_path, MINIMAL))
    text = yaml.safe_dump(submitted(connection={"heartbeat_seconds": 15}, **sections))
    check_submitted(text, **CHECKS)
    _, plan = write_director_plan(
        text,
        experiment_id="e1",
        port=50123,
        config=config,
        folder=tmp_path / "e1",
        initial_model=None,
    )
    assert plan.straggler.offline_after_seconds == offline_after
