"""The plan loader: the example plan loads, and every problem is reported at once by its key path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from foedus.collaborator.digits import DigitsRunner
from foedus.plans import Plan, PlanError, load_plan, parse_plan

REPO = Path(__file__).resolve().parent.parent
LOCAL_PLAN = REPO / "plans" / "local.yaml"
PLAN_PATH = Path("/plans/test.yaml")
DELETE = object()


# The problem every error case also carries, to show that problems are collected, not first-only.
OTHER_PROBLEM = ("limits.max_tensor_bytes", 0, "limits.max_tensor_bytes: expected an integer 1-")


def _document() -> dict[str, Any]:
    """A valid plan document: `plans/local.yaml` as `yaml.safe_load` gives it."""
    document: dict[str, Any] = yaml.safe_load(LOCAL_PLAN.read_text(encoding="utf-8"))
    return document


def _with(document: dict[str, Any], *changes: tuple[str, Any]) -> dict[str, Any]:
    """A copy of `document` with each dotted key set to a value, or removed for DELETE."""
    result = copy.deepcopy(document)
    for dotted, value in changes:
        *parents, last = dotted.split(".")
        node = result
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return result


def _problems(data: object) -> list[str]:
    """The problems `parse_plan` reports for `data`, without the file prefix."""
    with pytest.raises(PlanError) as caught:
        parse_plan(data, PLAN_PATH)
    prefix = f"{PLAN_PATH}: "
    assert all(line.startswith(prefix) for line in caught.value.problems)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return [line.removeprefix(prefix) for line in caught.value.problems]


def _write(path: Path, document: object) -> Path:
    """Write `document` as YAML to `path`, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


# --- the example plan -----------------------------------------------------------------------------


def test_local_plan_loads_with_the_values_in_the_file() -> None:
    """`plans/local.yaml` loads, and every value it sets is the value in the plan."""
    raw = _document()
    plan = load_plan(LOCAL_PLAN)
    assert plan.path == LOCAL_PLAN
    for section in ("federation", "aggregator", "limits", "connection"):
        for key, value in raw[section].items():
            actual = getattr(getattr(plan, section), key)
            if isinstance(actual, Path):  # paths in a plan are relative to the plan file
                expected: object = (LOCAL_PLAN.parent / value).resolve()
            else:
                expected = tuple(value) if isinstance(value, list) else value
            assert actual == expected, f"{section}.{key}"
    assert plan.collaborators == tuple(raw["collaborators"])
    assert plan.tasks == tuple(raw["tasks"])
    assert plan.tls.insecure is False
    assert plan.tls.enabled
    assert plan.tls.certs is not None
    assert plan.tls.certs.root == (LOCAL_PLAN.parent / raw["tls"]["certs_dir"]).resolve()


def test_local_plan_spot_values() -> None:
    """A few of local.yaml's values and the defaults it relies on, spelled out."""
    plan = load_plan(LOCAL_PLAN)
    assert plan.federation.aggregator_id == "aggregator"
    assert plan.federation.rounds == 10
    assert (plan.aggregator.host, plan.aggregator.port) == ("localhost", 50051)
    assert plan.aggregator.san_ips == ("127.0.0.1", "::1")
    assert plan.aggregator.grace_seconds == 5.0
    assert plan.collaborators == ("alice", "bob", "carol")
    assert plan.limits.max_tensor_bytes == 1024 * 1024 * 1024
    assert plan.connection.max_retries == 10


def test_aggregator_id_defaults_to_openfl_form() -> None:
    """Without `federation.aggregator_id` the id is OpenFL's `aggregator_<uuid>`."""
    plan = parse_plan(_with(_document(), ("federation.aggregator_id", DELETE)), PLAN_PATH)
    assert isinstance(plan, Plan)
    assert plan.federation.aggregator_id == f"aggregator_{plan.federation.uuid}"


def test_aggregator_common_name_defaults_to_the_host() -> None:
    """Without `aggregator.common_name` the certificate must name `aggregator.host`; no pin."""
    plan = parse_plan(_with(_document(), ("aggregator.host", "10.0.0.5")), PLAN_PATH)
    assert (plan.aggregator.common_name, plan.aggregator.fingerprint) == ("10.0.0.5", None)


def test_aggregator_common_name_and_fingerprint_as_given() -> None:
    """`common_name` is kept as given; a fingerprint with colons and capitals is normalised."""
    pin = ":".join(["AB"] * 32)
    plan = parse_plan(
        _with(
            _document(),
            ("aggregator.host", "10.0.0.5"),
            ("aggregator.common_name", "agg.example.org"),
            ("aggregator.fingerprint", pin),
        ),
        PLAN_PATH,
    )
    assert plan.aggregator.common_name == "agg.example.org"
    assert plan.aggregator.fingerprint == "ab" * 32
    unpinned = parse_plan(_with(_document(), ("aggregator.fingerprint", None)), PLAN_PATH)
    assert unpinned.aggregator.fingerprint is None


# --- one test per kind of problem -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param([("extra", 1)], "extra: unknown key", id="unknown-top-level-key"),
        pytest.param(
            [("aggregator.prot", 50051)], "aggregator.prot: unknown key", id="unknown-nested-key"
        ),
        pytest.param(
            [("aggregator.port", "80a")],
            "aggregator.port: expected an integer 0-65535, got '80a'",
            id="wrong-type",
        ),
        pytest.param(
            [("federation.uuid", DELETE)],
            "federation.uuid: required, but missing",
            id="missing-required",
        ),
        pytest.param(
            [("aggregator.port", 70000)],
            "aggregator.port: expected an integer 0-65535, got 70000",
            id="bad-port",
        ),
        pytest.param(
            [("aggregator.san_ips", ["127.0.0.1", "300.1.2.3"])],
            "aggregator.san_ips: expected a list of IP addresses",
            id="bad-ip",
        ),
        pytest.param(
            [("collaborators", ["alice", "bob", "alice"])],
            "collaborators: listed more than once: alice",
            id="duplicate-collaborators",
        ),
        pytest.param(
            [("collaborators", [])],
            "collaborators: at least one collaborator is needed",
            id="no-collaborators",
        ),
        pytest.param(
            [("tls.insecure", True)],
            "tls: give either certs_dir or insecure: true, not both",
            id="tls-both",
        ),
        pytest.param(
            [("tls.certs_dir", DELETE)],
            "tls.certs_dir: required unless tls.insecure is true",
            id="tls-neither",
        ),
        pytest.param(
            [("federation.rounds", True)],
            "federation.rounds: expected an integer 1-1000000, got True",
            id="boolean-is-not-an-integer",
        ),
        pytest.param(
            [("connection.atomic_connections", "yes")],
            "connection.atomic_connections: expected true or false, got 'yes'",
            id="string-is-not-a-boolean",
        ),
        pytest.param(
            [("aggregator", ["localhost"])],
            "aggregator: expected a mapping, got list",
            id="section-not-a-mapping",
        ),
        pytest.param(
            [("collaborators", DELETE)],
            "collaborators: required, but missing",
            id="missing-collaborators",
        ),
        pytest.param(
            [("collaborators", "alice")],
            "collaborators: expected a list of names",
            id="collaborators-not-a-list",
        ),
        pytest.param(
            [("tls.certs_dir", "")],
            "tls.certs_dir: expected a non-empty string, got ''",
            id="empty-certs-dir",
        ),
        pytest.param(
            [("aggregator.common_name", "agg_1")],
            "aggregator.common_name: aggregator host 'agg_1': expected a DNS host name",
            id="bad-common-name",
        ),
        pytest.param(
            [("aggregator.common_name", "x.cn.foedus.invalid")],
            "aggregator.common_name: name 'x.cn.foedus.invalid': foedus.invalid is reserved",
            id="reserved-common-name",
        ),
        pytest.param(
            [("aggregator.fingerprint", "ab" * 31)],
            "aggregator.fingerprint: fingerprint 'abab",
            id="short-fingerprint",
        ),
        pytest.param(
            [("aggregator.fingerprint", 12)],
            "aggregator.fingerprint: expected a non-empty string, got 12",
            id="fingerprint-not-a-string",
        ),
        pytest.param(
            [("limits.stream_window_bytes", 1000)],
            "limits.stream_window_bytes: expected an integer 65536-",
            id="stream-window-too-small",
        ),
        *(
            pytest.param(
                [("aggregator.metrics_address", value)],
                "aggregator.metrics_address: expected host:port, [IPv6]:port, or a port alone",
                id=f"metrics-address-{name}",
            )
            for name, value in [
                ("port-too-large", "127.0.0.1:70000"),
                ("no-port", "127.0.0.1"),
                ("empty-host", ":9464"),
                ("bad-host", "my host:9464"),
                ("bad-ipv4", "1.2.3.256:9464"),
                ("ipv6-without-brackets", "::1:9464"),
                ("ipv4-in-brackets", "[127.0.0.1]:9464"),
                ("boolean", True),
                ("list", ["127.0.0.1", 9464]),
            ]
        ),
        pytest.param(
            [("straggler.offline_after_seconds", 0)],
            "straggler.offline_after_seconds: expected a number 0.5-",
            id="offline-after-too-small",
        ),
        pytest.param(
            [("straggler.offline_after_seconds", "3s")],
            "straggler.offline_after_seconds: expected a number 0.5-604800, got '3s'",
            id="offline-after-not-a-number",
        ),
        pytest.param(
            [("connection.heartbeat_seconds", 0)],
            "connection.heartbeat_seconds: expected a number 0.1-3600, got 0",
            id="heartbeat-too-small",
        ),
        pytest.param(
            [("straggler.offline_after_seconds", 15)],  # heartbeat_seconds is 10 by default
            "straggler.offline_after_seconds: 15 is less than twice "
            "connection.heartbeat_seconds (10)",
            id="offline-after-below-two-heartbeats",
        ),
    ],
)
def test_problem_is_reported_by_key_path(changes: list[tuple[str, Any]], expected: str) -> None:
    """Each kind of problem names its key path, and is reported together with the others."""
    other_key, other_value, other_expected = OTHER_PROBLEM
    problems = _problems(_with(_document(), *changes, (other_key, other_value)))
    assert any(line.startswith(expected) for line in problems), problems
    assert any(line.startswith(other_expected) for line in problems), problems


def test_every_problem_is_reported_at_once() -> None:
    """Several problems in several sections come back as one PlanError, one line each."""
    document = _with(
        _document(),
        ("federation.uuid", DELETE),
        ("aggregator.port", "80a"),
        ("aggregator.prot", 1),
        ("tls.insecure", True),
        ("collaborators", ["alice", "alice"]),
        ("connection.max_retries", -1),
        ("extra", {}),
    )
    assert sorted(_problems(document)) == sorted(
        [
            "federation.uuid: required, but missing",
            "aggregator.port: expected an integer 0-65535, got '80a'",
            "aggregator.prot: unknown key",
            "tls: give either certs_dir or insecure: true, not both",
            "collaborators: listed more than once: alice",
            "connection.max_retries: expected an integer 0-1000000, got -1",
            "extra: unknown key",
        ]
    )


@pytest.mark.parametrize("data", [["federation"], "federation", 42])
def test_top_level_not_a_mapping(data: object) -> None:
    """A document that is not a mapping is a PlanError saying so, with the missing keys."""
    problems = _problems(data)
    assert problems[0] == f"plan: expected a mapping, got {type(data).__name__}"
    assert "federation.uuid: required, but missing" in problems
    assert "collaborators: required, but missing" in problems


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """A YAML syntax error is a PlanError naming the file and the line."""
    path = tmp_path / "broken.yaml"
    path.write_text("federation:\n  name: x\naggregator: host: y\n", encoding="utf-8")
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert caught.value.problems == [
        f"{path}: line 3: not valid YAML: mapping values are not allowed here"
    ]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    """A plan file that does not exist is a PlanError naming the path, never an empty plan."""
    path = tmp_path / "nowhere" / "plan.yaml"
    with pytest.raises(PlanError, match="file not found") as caught:
        load_plan(path)
    assert caught.value.path == path
    assert str(path) in str(caught.value)


def test_directory_is_not_a_plan(tmp_path: Path) -> None:
    """A folder given as the plan is a PlanError, not an OSError."""
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path)


@pytest.mark.parametrize("key", ["max_retries", "max_wait_seconds"])
def test_null_means_unbounded(tmp_path: Path, key: str) -> None:
    """`null` for a connection bound, written as YAML, loads as None (no bound)."""
    path = _write(tmp_path / "plan.yaml", _with(_document(), (f"connection.{key}", None)))
    assert "null" in path.read_text(encoding="utf-8")
    assert getattr(load_plan(path).connection, key) is None


def test_offline_after_is_off_unless_given(tmp_path: Path) -> None:
    """`straggler.offline_after_seconds`: absent or null, nobody is ever offline; heartbeats 10 s."""
    plan = load_plan(_write(tmp_path / "a.yaml", _document()))
    assert plan.straggler.offline_after_seconds is None
    assert plan.connection.heartbeat_seconds == 10
    null = _with(_document(), ("straggler.offline_after_seconds", None))
    assert load_plan(_write(tmp_path / "b.yaml", null)).straggler.offline_after_seconds is None
    given = _with(
        _document(),
        ("straggler.offline_after_seconds", 3),
        ("connection.heartbeat_seconds", 1.5),
    )
    plan = load_plan(_write(tmp_path / "c.yaml", given))
    assert plan.straggler.offline_after_seconds == 3 and plan.connection.heartbeat_seconds == 1.5


def test_stream_window_is_grpcs_unless_given(tmp_path: Path) -> None:
    """`limits.stream_window_bytes`: absent, gRPC sizes the window; a number fixes it."""
    assert load_plan(_write(tmp_path / "a.yaml", _document())).limits.stream_window_bytes is None
    fixed = _with(_document(), ("limits.stream_window_bytes", 4 * 1024 * 1024))
    assert load_plan(_write(tmp_path / "b.yaml", fixed)).limits.stream_window_bytes == 4 * 2**20


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("127.0.0.1:9464", "127.0.0.1", 9464),
        (9464, "127.0.0.1", 9464),  # a port alone: loopback
        ("9464", "127.0.0.1", 9464),
        ("[::1]:9464", "::1", 9464),
        ("metrics.example.org:0", "metrics.example.org", 0),
        ("0.0.0.0:9464", "0.0.0.0", 9464),
    ],
)
def test_metrics_address_forms(value: object, host: str, port: int) -> None:
    """`aggregator.metrics_address` as host:port, [IPv6]:port, or a port alone on loopback."""
    plan = parse_plan(_with(_document(), ("aggregator.metrics_address", value)), PLAN_PATH)
    address = plan.aggregator.metrics_address
    assert address is not None and (address.host, address.port) == (host, port)


def test_metrics_are_off_by_default() -> None:
    """Without `aggregator.metrics_address` (or with null) no metrics server runs."""
    assert parse_plan(_document(), PLAN_PATH).aggregator.metrics_address is None
    plan = parse_plan(_with(_document(), ("aggregator.metrics_address", None)), PLAN_PATH)
    assert plan.aggregator.metrics_address is None


def test_certs_dir_is_relative_to_the_plan_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tls.certs_dir` resolves against the plan file's folder, whatever the working folder."""
    plan_dir = tmp_path / "federation" / "plans"
    _write(plan_dir / "plan.yaml", _with(_document(), ("tls.certs_dir", "../certs")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (plan_dir / "plan.yaml", Path("../federation/plans/plan.yaml")):
        certs = load_plan(given).tls.certs
        assert certs is not None
        assert certs.root == (tmp_path / "federation" / "certs").resolve()


def test_absolute_certs_dir_is_kept(tmp_path: Path) -> None:
    """An absolute `tls.certs_dir` is used as it is."""
    certs_dir = tmp_path / "absolute" / "certs"
    path = _write(tmp_path / "plan.yaml", _with(_document(), ("tls.certs_dir", str(certs_dir))))
    certs = load_plan(path).tls.certs
    assert certs is not None
    assert certs.root == certs_dir.resolve()


def test_insecure_plan_has_no_certs() -> None:
    """`tls.insecure: true` without `certs_dir` is accepted and turns TLS off explicitly."""
    plan = parse_plan(_with(_document(), ("tls", {"insecure": True})), PLAN_PATH)
    assert plan.tls.insecure is True
    assert plan.tls.certs is None
    assert not plan.tls.enabled


def test_plan_is_frozen() -> None:
    """A loaded plan cannot be changed."""
    plan = parse_plan(_document(), PLAN_PATH)
    with pytest.raises(AttributeError):
        plan.aggregator.port = 1  # type: ignore[misc]


# --- the sections of a federation run --------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ([("tasks", ["train", "mine_bitcoin"])], "tasks: unknown task 'mine_bitcoin'"),
        ([("tasks", ["aggregated_model_validation"])], "tasks: must include 'train'"),
        ([("runner.name", "os.system('rm')")], "runner.name: expected a name matching"),
        ([("runner", DELETE)], "runner.name: required, but missing"),
        ([("runner.settings", [1, 2])], "runner.settings: expected a mapping"),
        ([("straggler.policy", "sometimes")], "straggler.policy: expected one of wait_for_all"),
        ([("straggler.min_reports", 4)], "straggler.min_reports: 4 is more than the 3"),
        ([("straggler.percentage", 1.5)], "straggler.percentage: expected a number"),
        ([("best_model.mode", "biggest")], "best_model.mode: expected one of max, min"),
        (
            [("tasks", ["train"]), ("best_model.task", "aggregated_model_validation")],
            "best_model.task: 'aggregated_model_validation' is not in tasks",
        ),
        (
            [("aggregator.initial_model", "no-such-model.pbuf")],
            "aggregator.initial_model: file not found",
        ),
    ],
    ids=[
        "unknown-task",
        "no-train-task",
        "runner-name-is-code",
        "no-runner",
        "runner-settings-not-a-mapping",
        "unknown-straggler-policy",
        "min-reports-over-collaborators",
        "percentage-over-one",
        "unknown-best-mode",
        "best-task-not-run",
        "missing-initial-model",
    ],
)
def test_run_section_problem_names_its_key(changes: list[tuple[str, Any]], expected: str) -> None:
    """Problems in tasks, runner, straggler, best_model and initial_model name their key path."""
    problems = _problems(_with(_document(), *changes))
    assert any(line.startswith(expected) for line in problems), problems


def test_local_plan_run_sections() -> None:
    """The demo plan's runner, straggler and best-model sections load as written."""
    plan = load_plan(LOCAL_PLAN)
    assert plan.runner.name == "digits"
    assert plan.runner.settings["split"] == "iid"
    assert plan.straggler.policy.value == "wait_for_all"
    assert plan.best_model is not None
    assert (plan.best_model.task, plan.best_model.metric, plan.best_model.maximize) == (
        "aggregated_model_validation",
        "accuracy",
        True,
    )
    assert plan.aggregator.output_dir == (LOCAL_PLAN.parent / "../build/local/output").resolve()


# --- secure_aggregation ---------------------------------------------------------------------------

SECURE_PLAN = REPO / "plans" / "secure.yaml"
SECURE_ON = ("secure_aggregation.enabled", True)


def _sites(count: int) -> tuple[str, list[str]]:
    """The `collaborators` key and `count` names for it."""
    return ("collaborators", [f"site-{index:03d}" for index in range(count)])


def test_secure_aggregation_is_off_with_the_schemas_defaults() -> None:
    """Without the section: off, a majority threshold (2 of 3), clip 1, a 32-bit ring, weights up
    to 65536, every peer a neighbour."""
    settings = parse_plan(_document(), PLAN_PATH).secure_aggregation
    assert (settings.enabled, settings.threshold, settings.clip) == (False, 2, 1.0)
    assert (settings.bits, settings.max_weight, settings.neighbours) == (32, 65536, None)
    empty = parse_plan(_with(_document(), ("secure_aggregation", None)), PLAN_PATH)
    assert empty.secure_aggregation == settings


def test_secure_aggregation_values_as_given() -> None:
    """Every key is read as written; an integer clip is a float."""
    document = _with(
        _document(),
        _sites(9),
        SECURE_ON,
        ("secure_aggregation.threshold", 4),
        ("secure_aggregation.clip", 3),
        ("secure_aggregation.bits", 64),
        ("secure_aggregation.max_weight", 1000),
        ("secure_aggregation.neighbours", 6),
    )
    settings = parse_plan(document, PLAN_PATH).secure_aggregation
    assert (settings.enabled, settings.threshold, settings.bits) == (True, 4, 64)
    assert (settings.max_weight, settings.neighbours) == (1000, 6)
    assert settings.clip == 3.0 and isinstance(settings.clip, float)


@pytest.mark.parametrize(
    ("sites", "neighbours", "threshold"),
    [
        (2, None, 2),
        (3, None, 2),
        (4, None, 3),
        (5, None, 3),
        (100, None, 51),
        (7, 2, 2),
        (7, 4, 3),
        (100, 6, 4),
    ],
)
def test_threshold_defaults_to_a_majority(
    sites: int, neighbours: int | None, threshold: int
) -> None:
    """Absent or null, the threshold is a majority of the collaborators, or with `neighbours` of
    a site's neighbours and itself (who alone hold its shares)."""
    absent = _with(
        _document(),
        _sites(sites),
        SECURE_ON,
        ("secure_aggregation.bits", 64),
        ("secure_aggregation.neighbours", neighbours),
    )
    null = _with(absent, ("secure_aggregation.threshold", None))
    for document in (absent, null):
        assert parse_plan(document, PLAN_PATH).secure_aggregation.threshold == threshold


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            [("secure_aggregation.enabled", "yes")],
            "secure_aggregation.enabled: expected true or false, got 'yes'",
            id="enabled-not-a-boolean",
        ),
        pytest.param(
            [("secure_aggregation.treshold", 2)],
            "secure_aggregation.treshold: unknown key",
            id="unknown-key",
        ),
        pytest.param(
            [("secure_aggregation", [1])],
            "secure_aggregation: expected a mapping, got list",
            id="not-a-mapping",
        ),
        pytest.param(
            [SECURE_ON, ("secure_aggregation.threshold", 0)],
            "secure_aggregation.threshold: expected an integer 1-1000000, got 0",
            id="threshold-zero",
        ),
        pytest.param(
            [SECURE_ON, ("secure_aggregation.threshold", 2.5)],
            "secure_aggregation.threshold: expected an integer 1-1000000, got 2.5",
            id="threshold-not-an-integer",
        ),
        pytest.param(
            [SECURE_ON, ("secure_aggregation.threshold", 4)],
            "secure_aggregation.threshold: 4 is more than the 3 collaborators, so no round "
            "could ever be unmasked",
            id="threshold-over-collaborators",
        ),
        pytest.param(
            [
                SECURE_ON,
                _sites(9),
                ("secure_aggregation.neighbours", 4),
                ("secure_aggregation.threshold", 6),
            ],
            "secure_aggregation.threshold: 6 is more than a site's 4 neighbours and itself (5), "
            "who alone hold its shares",
            id="threshold-over-neighbours",
        ),
        *(
            pytest.param(
                [SECURE_ON, ("secure_aggregation.bits", value)],
                f"secure_aggregation.bits: expected one of 16, 32, 64, got {shown}",
                id=f"bits-{name}",
            )
            for name, value, shown in [
                ("24", 24, "24"),
                ("8", 8, "8"),
                ("text", "32", "'32'"),
                ("float", 32.0, "32.0"),
                ("boolean", True, "True"),
            ]
        ),
        *(
            pytest.param(
                [SECURE_ON, ("secure_aggregation.clip", value)],
                f"secure_aggregation.clip: expected a finite number > 0, got {shown}",
                id=f"clip-{name}",
            )
            for name, value, shown in [
                ("zero", 0, "0"),
                ("negative", -0.5, "-0.5"),
                ("infinite", float("inf"), "inf"),
                ("nan", float("nan"), "nan"),
                ("past-floats-range", 10**400, "1" + "0" * 27 + "..." + "0" * 29),
                ("text", "1", "'1'"),
                ("boolean", True, "True"),
            ]
        ),
        pytest.param(
            [SECURE_ON, ("secure_aggregation.max_weight", 0)],
            "secure_aggregation.max_weight: expected an integer 1-2147483647, got 0",
            id="max-weight-zero",
        ),
        pytest.param(
            [SECURE_ON, _sites(9), ("secure_aggregation.neighbours", 1)],
            "secure_aggregation.neighbours: expected an integer 2-1000000, got 1",
            id="neighbours-below-two",
        ),
        pytest.param(
            [SECURE_ON, _sites(9), ("secure_aggregation.neighbours", 3)],
            "secure_aggregation.neighbours: 3 is odd; each site is joined to half of them on "
            "each side of the round's circle of sites, so it must be even",
            id="neighbours-odd",
        ),
        pytest.param(
            [SECURE_ON, ("secure_aggregation.neighbours", 4)],
            "secure_aggregation.neighbours: 4 is not fewer than the 3 collaborators; leave it "
            "out to mask with every other site",
            id="neighbours-all-collaborators",
        ),
        pytest.param(
            [SECURE_ON, _sites(4), ("secure_aggregation.neighbours", 4)],
            "secure_aggregation.neighbours: 4 is not fewer than the 4 collaborators",
            id="neighbours-as-many-as-collaborators",
        ),
        pytest.param(
            [SECURE_ON, ("collaborators", ["alice"])],
            "secure_aggregation.enabled: needs at least 2 collaborators; the sum of one site's "
            "update is that update",
            id="one-collaborator",
        ),
        pytest.param(
            [SECURE_ON, ("secure_aggregation.bits", 16)],
            "secure_aggregation.bits: a ring of 16 bits is too small for 3 collaborators with "
            "max_weight 65536: it leaves fewer than 8 bits per value (2^15 - 1 < 256 x 3 x "
            "65536); use bits 32 or max_weight at most 42",
            id="ring-too-small",
        ),
    ],
)
def test_secure_aggregation_problem_names_its_key(
    changes: list[tuple[str, Any]], expected: str
) -> None:
    """Each refusal of `secure_aggregation` is one line naming its key (with the plan's file),
    reported together with the plan's other problems."""
    other_key, other_value, other_expected = OTHER_PROBLEM
    problems = _problems(_with(_document(), *changes, (other_key, other_value)))
    assert any(line.startswith(expected) for line in problems), problems
    assert any(line.startswith(other_expected) for line in problems), problems
    assert len(problems) == 2, problems


@pytest.mark.parametrize(("bits", "max_weight"), [(16, 42), (32, 2796202)])
def test_ring_holds_eight_bits_per_value_up_to_the_limit(bits: int, max_weight: int) -> None:
    """`2^(bits-1) - 1 >= 256 * collaborators * max_weight`: the largest max_weight that keeps 8
    bits per value for 3 sites loads; one more is refused, naming the largest."""
    fitting = _with(
        _document(),
        SECURE_ON,
        ("secure_aggregation.bits", bits),
        ("secure_aggregation.max_weight", max_weight),
    )
    assert parse_plan(fitting, PLAN_PATH).secure_aggregation.max_weight == max_weight
    problems = _problems(_with(fitting, ("secure_aggregation.max_weight", max_weight + 1)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"secure_aggregation.bits: a ring of {bits} bits is too small for 3 collaborators with "
        f"max_weight {max_weight + 1}: it leaves fewer than 8 bits per value"
    ), problems
    assert problems[0].endswith(f"max_weight at most {max_weight}"), problems


def test_a_64_bit_ring_takes_any_weight_for_a_thousand_sites() -> None:
    """The largest max_weight a plan may give fits a 64-bit ring for 1000 sites."""
    document = _with(
        _document(),
        SECURE_ON,
        _sites(1000),
        ("secure_aggregation.bits", 64),
        ("secure_aggregation.max_weight", 2**31 - 1),
    )
    assert parse_plan(document, PLAN_PATH).secure_aggregation.max_weight == 2**31 - 1


def test_ring_problem_names_the_smallest_ring_that_would_do() -> None:
    """200 sites with the default weights need a 64-bit ring, or weights of 41943 at most."""
    problems = _problems(_with(_document(), SECURE_ON, _sites(200)))
    assert problems == [
        "secure_aggregation.bits: a ring of 32 bits is too small for 200 collaborators with "
        "max_weight 65536: it leaves fewer than 8 bits per value (2^31 - 1 < 256 x 200 x "
        "65536); use bits 64 or max_weight at most 41943"
    ]


def test_secure_aggregation_off_is_not_checked_against_the_federation() -> None:
    """Off, the section's values are checked one by one, but not against the collaborators:
    200 sites do not fit its default ring, a threshold of 9 is more than 3 sites."""
    many = parse_plan(_with(_document(), _sites(200)), PLAN_PATH)
    assert many.secure_aggregation.enabled is False
    off = _with(
        _document(),
        ("secure_aggregation.enabled", False),
        ("secure_aggregation.threshold", 9),
        ("tls", {"insecure": True}),
    )
    assert parse_plan(off, PLAN_PATH).secure_aggregation.threshold == 9
    assert _problems(_with(off, ("secure_aggregation.bits", 12))) == [
        "secure_aggregation.bits: expected one of 16, 32, 64, got 12"
    ]


def test_secure_aggregation_without_tls_is_left_to_where_the_plan_runs() -> None:
    """The loader takes it without TLS: a director checks submitted plans with placeholder TLS,
    and `aggregator start` refuses it (tests/test_aggregator_cli.py)."""
    plan = parse_plan(_with(_document(), SECURE_ON, ("tls", {"insecure": True})), PLAN_PATH)
    assert plan.secure_aggregation.enabled and not plan.tls.enabled


def test_secure_plan_is_the_local_federation_with_secure_aggregation() -> None:
    """`plans/secure.yaml` loads with secure aggregation on, and is `plans/local.yaml`'s
    federation otherwise: the same sites, tasks, runner and rounds."""
    local, secure = load_plan(LOCAL_PLAN), load_plan(SECURE_PLAN)
    settings = secure.secure_aggregation
    assert settings.enabled and settings.neighbours is None
    assert (settings.threshold, settings.bits, settings.clip) == (2, 32, 1.0)
    assert secure.tls.enabled
    assert secure.federation.uuid != local.federation.uuid
    assert secure.aggregator.port != local.aggregator.port
    assert secure.aggregator.output_dir != local.aggregator.output_dir
    for same in ("collaborators", "tasks", "runner", "straggler", "best_model", "limits"):
        assert getattr(secure, same) == getattr(local, same), same
    assert secure.federation.rounds == local.federation.rounds


def test_secure_plans_clip_cuts_no_value_of_the_demo() -> None:
    """`plans/secure.yaml`'s clip is above every |trained - global| the digits runner makes over
    the demo's rounds (0.41 at most, in round 0), so the secure demo differs from the plain one
    only by the fixed point's rounding."""
    plan = load_plan(SECURE_PLAN)
    runners = [
        DigitsRunner(plan.runner, collaborator=name, collaborators=plan.collaborators)
        for name in plan.collaborators
    ]
    model = DigitsRunner.initial_model(plan.runner)
    largest = 0.0
    for round_number in range(plan.federation.rounds):
        outcomes = [runner.train(dict(model), round_number) for runner in runners]
        weights = sum(outcome.data_size for outcome in outcomes)
        assert all(outcome.data_size <= plan.secure_aggregation.max_weight for outcome in outcomes)
        for name, tensor in model.items():
            for outcome in outcomes:
                delta = outcome.model[name].astype(np.float64) - tensor
                largest = max(largest, float(np.abs(delta).max()))
        model = {
            name: (
                sum(o.model[name].astype(np.float64) * o.data_size for o in outcomes) / weights
            ).astype(tensor.dtype)
            for name, tensor in model.items()
        }
    assert 0.4 < largest < plan.secure_aggregation.clip, largest
