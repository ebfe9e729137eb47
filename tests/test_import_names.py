"""The layout: every package of ours is imported as foedus.<package>, never by its folder's name.

The folders stay at the top of the repository (protos/, aggregator/, ...); foedus/ holds one
relative link per folder, and the installed distribution holds the one package foedus.
"""

from __future__ import annotations

import ast
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOEDUS = REPO / "foedus"


def linked_packages() -> set[str]:
    """The packages foedus/ links to (foedus/aggregator -> ../aggregator, ...)."""
    return {path.name for path in FOEDUS.iterdir() if path.is_symlink()}


def python_files() -> list[Path]:
    """Every Python file of the repository git knows or would add (not the virtualenvs)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in listed if not (REPO / name).is_symlink()]


def test_every_package_folder_is_linked_from_foedus() -> None:
    """A folder at the top with an __init__.py is one of ours: foedus/ links to it, relatively."""
    folders = {
        path.name
        for path in REPO.iterdir()
        if path.is_dir()
        and (path / "__init__.py").exists()
        and path.name not in {"foedus", "tests"}
    }
    assert folders == linked_packages()
    for name in folders:
        assert (FOEDUS / name).readlink() == Path("..", name)


def test_pyproject_installs_only_foedus() -> None:
    """The distribution's packages and console scripts are all under foedus."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packages = pyproject["tool"]["setuptools"]["packages"]
    assert {name.split(".", 1)[0] for name in packages} == {"foedus"}
    assert {f"foedus.{name}" for name in linked_packages()} <= set(packages)
    for script, target in pyproject["project"]["scripts"].items():
        assert target.startswith("foedus."), (script, target)


def test_nothing_imports_a_package_by_its_bare_name() -> None:
    """No file imports aggregator, protos, ... by the folder's name: that would load a second
    copy of the module beside foedus.<package>'s."""
    bare = linked_packages()
    found = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [
                f"{path.relative_to(REPO)}:{node.lineno}: {name}"
                for name in names
                if name.split(".", 1)[0] in bare
            ]
    assert not found, "\n".join(found)
