"""The README's minimal runner, exactly as printed, in a federation of real processes.

Each collaborator has its own data file, named in its own site settings file; the README's
scoring block, as printed too, then scores the federation's best model with `foedus.model`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits  # type: ignore[import-untyped, unused-ignore]

from foedus.collaborator.cli import main
from foedus.pki.layout import CertsLayout
from foedus.plans.runners import load_runner
from foedus.plans.schema import RunnerSettings

from federation_processes import write_plan
from readme_blocks import federate_sites, run_block, site_files

MARKER = "<!-- tests/test_readme_runner.py runs the next block as my_runner.py -->"
SCORING_MARKER = (
    "<!-- tests/test_readme_runner.py runs the next block in a folder with best_model.pbuf and "
    "test.npz -->"
)
RUNNER = {
    "name": "my_runner:SoftmaxRunner",
    "seed": 0,
    "settings": {"features": 64, "classes": 10, "epochs": 20},
}


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, Path]:
    """my_runner.py in `tmp_path`, and each collaborator's data and site settings files there."""
    return site_files(tmp_path, "my_runner", MARKER)


def test_the_readme_runner_trains_on_each_sites_own_data(
    certs: CertsLayout, tmp_path: Path, sites: dict[str, Path]
) -> None:
    """Three sites, each with its own file: the federation ends 0 and learns (accuracy >= 0.9),
    and the README's scoring block, run as printed on its best model, scores it as well."""
    federate_sites(certs, tmp_path, sites, RUNNER)
    scored = score_as_printed(tmp_path / "run" / "output" / "best_model.pbuf", tmp_path / "score")
    assert scored >= 0.9


def score_as_printed(best_model: Path, folder: Path) -> float:
    """The README's scoring block run as a script in `folder`, beside a copy of `best_model` and
    a `test.npz` of every digit; the accuracy it prints."""
    folder.mkdir()
    shutil.copy(best_model, folder / "best_model.pbuf")
    digits = load_digits()
    np.savez(folder / "test.npz", x=np.asarray(digits.data) / 16.0, y=np.asarray(digits.target))
    printed = run_block(SCORING_MARKER, folder, timeout=60)
    match = re.fullmatch(r"accuracy (\d\.\d{4}) on 1797 samples\n", printed)
    assert match, printed
    return float(match.group(1))


def test_the_readme_runner_names_a_bad_site_key(
    certs: CertsLayout,
    tmp_path: Path,
    sites: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its refusals name the site's file and key, and the collaborator exits 2 before sending."""
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = load_runner(RunnerSettings(name=str(RUNNER["name"]), seed=0, settings={}))
    assert sorted(runner.initial_model(RunnerSettings("x", 0, {"features": 3}))) == [
        "bias",
        "weight",
    ]
    plan = write_plan(tmp_path / "run", certs, 1, runner=RUNNER)
    site = sites["alice"]
    cases = {
        "epochs: 0\n": f"{site}: epochs: expected a number > 0, got 0",
        "device: gpu\n": f"{site}: device: unknown key (known: features, classes, data_path, "
        "epochs, learning_rate)",
        f"data_path: {tmp_path / 'absent.npz'}\n": f"{site}: data_path: [Errno 2] No such "
        f"file or directory: '{tmp_path / 'absent.npz'}'",
    }
    for text, line in cases.items():
        site.write_text(text, encoding="utf-8")
        args = ["start", "-n", "alice", "--plan", str(plan), "--site-settings", str(site)]
        assert main(args) == 2
        assert capsys.readouterr().err.splitlines() == [f"collaborator: error: {line}"]
