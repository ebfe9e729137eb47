"""Test helpers for README's code, run as printed: its blocks, and sites with data files of their own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits  # type: ignore[import-untyped, unused-ignore]

from foedus.pki.layout import CertsLayout

from federation_processes import (
    COLLABORATORS,
    REPO,
    FederationProcesses,
    child_python_path,
    final_accuracy,
    write_plan,
)


def readme_block(marker: str) -> str:
    """The Python block right after `marker` in README.md."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(marker) + r"\n```python\n(.*?)\n```\n", readme, re.DOTALL)
    assert match, f"README.md has no python block after {marker!r}"
    return match.group(1) + "\n"


def site_files(folder: Path, module: str, marker: str) -> dict[str, Path]:
    """README's block after `marker` as `module`.py in `folder`; each site's data and settings files.

    Each collaborator gets its own shard of the digits in NAME.npz and a site settings file
    NAME-site.yaml naming it (`data_path`), as a site would keep its own data.
    """
    (folder / f"{module}.py").write_text(readme_block(marker), encoding="utf-8")
    digits = load_digits()
    x, y = np.asarray(digits.data) / 16.0, np.asarray(digits.target)
    files = {}
    for index, name in enumerate(COLLABORATORS):
        data = folder / f"{name}.npz"
        np.savez(data, x=x[index :: len(COLLABORATORS)], y=y[index :: len(COLLABORATORS)])
        files[name] = folder / f"{name}-site.yaml"
        files[name].write_text(f"data_path: {data}\n", encoding="utf-8")
    return files


def run_block(marker: str, folder: Path, *, timeout: float = 120) -> str:
    """README's block after `marker` run as a script in `folder`, warnings as errors; its output.

    It must end 0 and print nothing on stderr (a read-only array, say, would warn).
    """
    script = folder / "block.py"
    script.write_text(readme_block(marker), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "error", script.name],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return done.stdout


def federate_sites(
    certs: CertsLayout, folder: Path, sites: dict[str, Path], runner: dict[str, object]
) -> None:
    """A 5-round federation of real processes with README's `runner` (its module in `folder`),
    each site with its own settings file (`site_files`): every process ends 0 and the final
    model learns (accuracy >= 0.9). Its output is under `folder`/run."""
    plan = write_plan(folder / "run", certs, 5, runner=runner)
    federation = FederationProcesses(plan, folder / "run")
    environment = {"PYTHONPATH": child_python_path(folder)}
    try:
        federation.start("aggregator", env=environment)
        for name in COLLABORATORS:
            federation.start(name, "--site-settings", str(sites[name]), env=environment)
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    assert set(codes.values()) == {0}, (codes, federation.output())
    assert final_accuracy(federation.output()) >= 0.9, federation.output()
