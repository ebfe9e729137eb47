"""A runner's own settings check: the line a site prints, said by the runner before anything starts.

The digits runner and a PyTorch-free test runner (`settings_runner`, which leaves a mark when
imported) refuse an unknown key and a bad value in `check_settings` with exactly the line their
constructor raises at a site; the director's submit check imports only the runners director.yaml
allows, and imports nothing of a plan that brings its initial model.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from foedus.collaborator.digits import DigitsRunner
from foedus.director.experiment_plan import check_submitted
from foedus.plans.runners import RunnerError, check_runner_settings, load_runner
from foedus.plans.schema import RunnerSettings
from foedus.refusals.errors import InvalidRequestError

from directors import submitted_plan
from settings_runner import IMPORTED, MARKER, NAME, SettingsRunner

SITES = ("alice", "bob", "carol")
DIGITS_KEYS = "split, test_fraction, epochs, batch_size, learning_rate, skew"


def settings(name: str, **values: object) -> RunnerSettings:
    """Runner settings as the plan loader makes them."""
    return RunnerSettings(name=name, seed=0, settings=MappingProxyType(dict(values)))


def refusal_at_site(runner: Any, runner_settings: RunnerSettings) -> str:
    """What the runner's constructor raises at a site (the line the collaborator prints)."""
    with pytest.raises(RunnerError) as raised:
        runner(runner_settings, collaborator="alice", collaborators=SITES)
    return str(raised.value)


CASES = [
    (
        DigitsRunner,
        settings("digits", epoch=2),
        f"runner.settings.epoch: unknown key (known: {DIGITS_KEYS})",
    ),
    (
        DigitsRunner,
        settings("digits", epochs=0),
        "runner.settings.epochs: expected an integer >= 1, got 0",
    ),
    (SettingsRunner, settings(NAME, stp=1), "runner.settings.stp: unknown key (known: step)"),
    (
        SettingsRunner,
        settings(NAME, step="fast"),
        "runner.settings.step: expected a number > 0, got 'fast'",
    ),
]


@pytest.mark.parametrize(
    ("runner", "runner_settings", "line"),
    CASES,
    ids=[
        "digits unknown key",
        "digits bad value",
        "test runner unknown key",
        "test runner bad value",
    ],
)
def test_check_settings_refuses_with_the_line_a_site_prints(
    runner: Any, runner_settings: RunnerSettings, line: str
) -> None:
    """`check_settings` raises the very line the runner's constructor raises at a site."""
    with pytest.raises(RunnerError) as raised:
        check_runner_settings(runner, runner_settings)
    assert str(raised.value) == line
    assert refusal_at_site(runner, runner_settings) == line


def test_a_site_file_key_is_named_by_its_file() -> None:
    """A key merged from a site's file is named with that file, as the site names it."""
    merged = RunnerSettings(
        name="digits",
        seed=0,
        settings=MappingProxyType({"batch_size": -1}),
        site_file=Path("/site/settings.yaml"),
        site_keys=frozenset({"batch_size"}),
    )
    with pytest.raises(RunnerError, match=r"^/site/settings.yaml: batch_size: expected an integer"):
        check_runner_settings(DigitsRunner, merged)


def test_an_alias_bomb_in_a_setting_is_quoted_cut() -> None:
    """A value grown from YAML aliases is quoted in at most a short excerpt, never expanded whole."""
    levels = "abcdefghi"
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [{', '.join([f'*{below}'] * 10)}]\n"
        for below, name in itertools.pairwise(levels)
    )
    bomb = yaml.safe_load(text)["i"]  # 10**9 x's, were it printed whole
    with pytest.raises(RunnerError) as raised:
        check_runner_settings(DigitsRunner, settings("digits", split=bomb))
    assert len(str(raised.value)) < 200


class Unchecked:
    """A runner without `check_settings`: only the sites check its settings."""


class Faulty:
    """A runner whose check fails in a way of its own."""

    @classmethod
    def check_settings(cls, runner_settings: RunnerSettings) -> None:
        """Not a `RunnerError`."""
        raise KeyError("step")


def test_a_runner_without_a_check_passes_and_a_faulty_check_is_one_line() -> None:
    """No `check_settings`: nothing to refuse; one raising anything else: a line naming runner.name."""
    check_runner_settings(Unchecked, settings("x:Unchecked", anything=1))  # type: ignore[arg-type]
    with pytest.raises(RunnerError) as raised:
        check_runner_settings(Faulty, settings("x:Faulty"))  # type: ignore[arg-type]
    assert (
        str(raised.value) == "runner.name: 'x:Faulty': its check_settings failed: KeyError: 'step'"
    )


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The file `settings_runner` marks when imported, and that module not imported yet."""
    path = tmp_path / "imported"
    monkeypatch.setenv(MARKER, str(path))
    monkeypatch.delitem(sys.modules, "settings_runner", raising=False)
    yield path


def submit(plan: dict[str, Any], *, runners: tuple[str, ...], initial_model: bool) -> None:
    """The director's submit check of `plan`, with director.yaml `runners`."""
    check_submitted(
        yaml.safe_dump(plan),
        registered=SITES,
        max_bytes=1 << 20,
        runners=runners,
        initial_model=initial_model,
    )


def test_an_allowed_runner_is_imported_and_checks_the_plans_settings(
    marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Allowed in director.yaml: imported (the mark), and a bad step refused with the site's line."""
    plan = submitted_plan(runner={"name": NAME, "seed": 0, "settings": {"step": -1}})
    with pytest.raises(InvalidRequestError) as raised:
        submit(plan, runners=("digits", NAME), initial_model=True)
    assert (
        str(raised.value) == "submitted plan: runner.settings.step: expected a number > 0, got -1"
    )
    assert marker.exists() and IMPORTED in capsys.readouterr().out


def test_a_runner_not_allowed_is_refused_without_a_model_and_never_imported(
    marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not in director.yaml runners: refused naming runner.name and both ways on; nothing imported."""
    plan = submitted_plan(runner={"name": NAME, "seed": 0, "settings": {"step": -1}})
    with pytest.raises(InvalidRequestError) as raised:
        submit(plan, runners=("digits",), initial_model=False)
    assert str(raised.value) == (
        f"submitted plan: runner.name: {NAME!r} is not a runner this director's host runs "
        "(director.yaml runners: digits); submit the experiment with its initial model "
        "('experiment submit --initial-model FILE'), or ask an admin to add the runner to "
        "director.yaml runners"
    )
    submit(plan, runners=("digits",), initial_model=True)  # the sites check its settings
    assert "settings_runner" not in sys.modules
    assert not marker.exists() and IMPORTED not in capsys.readouterr().out


def test_a_director_that_imports_no_runner_needs_every_initial_model() -> None:
    """director.yaml `runners: []`: even the built-in runner is not imported; a model is needed."""
    with pytest.raises(InvalidRequestError, match=r"runner.name: 'digits' .* runners: none\)"):
        submit(submitted_plan(), runners=(), initial_model=False)
    submit(submitted_plan(runner={"settings": {"epoch": 2}}), runners=(), initial_model=True)


def test_the_built_in_runner_is_checked_at_submit() -> None:
    """The default runners: a typo in the digits settings is refused at submit, naming the key."""
    plan = submitted_plan(runner={"settings": {"epochs": 1, "epoch": 2}})
    with pytest.raises(InvalidRequestError) as raised:
        submit(plan, runners=("digits",), initial_model=False)
    assert str(raised.value) == (
        f"submitted plan: runner.settings.epoch: unknown key (known: {DIGITS_KEYS})"
    )
    assert load_runner(settings("digits")) is DigitsRunner
