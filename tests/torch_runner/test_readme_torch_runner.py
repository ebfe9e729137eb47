"""README's PyTorch runner, exactly as printed, in a federation of real processes.

Each collaborator has its own data file, named in its own site settings file, as in
tests/test_readme_runner.py for the numpy runner.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits  # type: ignore[import-untyped, unused-ignore]

from collaborator.cli import main
from pki.layout import CertsLayout
from plans.runners import RunnerError
from plans.schema import RunnerSettings

from processes import COLLABORATORS, REPO, FederationProcesses, final_accuracy, write_plan

MARKER = "<!-- tests/torch_runner/test_readme_torch_runner.py runs the next block as my_torch_runner.py -->"
RUNNER = {
    "name": "my_torch_runner:MLPRunner",
    "seed": 0,
    "settings": {"features": 64, "classes": 10, "epochs": 5},
}


def readme_runner() -> str:
    """The Python block right after the marker in README.md."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(MARKER) + r"\n```python\n(.*?)\n```\n", readme, re.DOTALL)
    assert match, f"README.md has no python block after {MARKER!r}"
    return match.group(1) + "\n"


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, Path]:
    """my_torch_runner.py in `tmp_path`, and each collaborator's data and site settings there."""
    (tmp_path / "my_torch_runner.py").write_text(readme_runner(), encoding="utf-8")
    digits = load_digits()
    x, y = np.asarray(digits.data) / 16.0, np.asarray(digits.target)
    files = {}
    for index, name in enumerate(COLLABORATORS):
        data = tmp_path / f"{name}.npz"
        np.savez(data, x=x[index :: len(COLLABORATORS)], y=y[index :: len(COLLABORATORS)])
        files[name] = tmp_path / f"{name}-site.yaml"
        files[name].write_text(f"data_path: {data}\n", encoding="utf-8")
    return files


def test_the_readme_torch_runner_trains_on_each_sites_own_data(
    certs: CertsLayout, tmp_path: Path, sites: dict[str, Path]
) -> None:
    """Three sites, each with its own file: the federation ends 0 and learns (accuracy >= 0.9)."""
    plan = write_plan(tmp_path / "run", certs, 5, runner=RUNNER)
    federation = FederationProcesses(plan, tmp_path / "run")
    environment = {"PYTHONPATH": str(tmp_path)}
    try:
        federation.start("aggregator", env=environment)
        for name in COLLABORATORS:
            federation.start(name, "--site-settings", str(sites[name]), env=environment)
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    assert set(codes.values()) == {0}, (codes, federation.output())
    assert final_accuracy(federation.output()) >= 0.9, federation.output()


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
