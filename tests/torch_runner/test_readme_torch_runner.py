"""README's PyTorch runner, exactly as printed, in a federation of real processes.

Each collaborator has its own data file, named in its own site settings file, as in
tests/test_readme_runner.py for the numpy runner.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from foedus.collaborator.cli import main
from foedus.pki.layout import CertsLayout
from foedus.plans.runners import RunnerError
from foedus.plans.schema import RunnerSettings

from federation_processes import write_plan
from readme_blocks import federate_sites, site_files

MARKER = "<!-- tests/torch_runner/test_readme_torch_runner.py runs the next block as my_torch_runner.py -->"
RUNNER = {
    "name": "my_torch_runner:MLPRunner",
    "seed": 0,
    "settings": {"features": 64, "classes": 10, "epochs": 5},
}


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, Path]:
    """my_torch_runner.py in `tmp_path`, and each collaborator's data and site settings there."""
    return site_files(tmp_path, "my_torch_runner", MARKER)


def test_the_readme_torch_runner_trains_on_each_sites_own_data(
    certs: CertsLayout, tmp_path: Path, sites: dict[str, Path]
) -> None:
    """Three sites, each with its own file: the federation ends 0 and learns (accuracy >= 0.9)."""
    federate_sites(certs, tmp_path, sites, RUNNER)


def test_the_readme_torch_runner_names_a_bad_site_key(
    certs: CertsLayout,
    tmp_path: Path,
    sites: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its check refuses a plan's typo as the director runs it; at a site, the line names the
    site's file and key, and the collaborator exits 2 before sending."""
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = importlib.import_module("my_torch_runner").MLPRunner
    with pytest.raises(RunnerError, match=r"^runner\.settings\.epoch: unknown key"):
        runner.check_settings(RunnerSettings("my_torch_runner:MLPRunner", 0, {"epoch": 5}))
    plan = write_plan(tmp_path / "run", certs, 1, runner=RUNNER)
    site = sites["alice"]
    cases = {
        "batch_size: 0\n": f"{site}: batch_size: expected a number > 0, got 0",
        "device: gpu\n": f"{site}: device: unknown key (known: features, hidden, classes, "
        "epochs, batch_size, learning_rate, data_path)",
    }
    for text, line in cases.items():
        site.write_text(text, encoding="utf-8")
        args = ["start", "-n", "alice", "--plan", str(plan), "--site-settings", str(site)]
        assert main(args) == 2
        assert capsys.readouterr().err.splitlines() == [f"collaborator: error: {line}"]
