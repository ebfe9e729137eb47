"""pyproject.toml's package list: the dashboard's files installed, and without a warning.

setuptools warns (about 40 lines a folder) when a package's data globs reach into a folder that
is not a listed package itself, as `director`'s `web/*.html` did; listed as the data packages
they are, `director.web` and `director.web.static` go into the wheel by their own globs.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib

from federation_processes import REPO


def setuptools_config() -> dict[str, object]:
    """The `[tool.setuptools]` table of pyproject.toml."""
    with (REPO / "pyproject.toml").open("rb") as file:
        table: dict[str, object] = tomllib.load(file)["tool"]["setuptools"]
    return table


def test_package_data_stays_inside_listed_packages() -> None:
    """No data glob reaches into a folder (setuptools' warning); each names a listed package."""
    table = setuptools_config()
    packages, package_data = table["packages"], table["package-data"]
    assert isinstance(packages, list) and isinstance(package_data, dict)
    for package, globs in package_data.items():
        assert package in packages, package
        assert [glob for glob in globs if "/" in glob] == [], package
        assert (REPO / package.replace(".", "/")).is_dir(), package


def test_the_dashboards_files_are_package_data() -> None:
    """Every page, style sheet and script of the dashboard matches its package's data globs."""
    package_data = setuptools_config()["package-data"]
    assert isinstance(package_data, dict)
    web = REPO / "foedus" / "director" / "web"
    files = [path for path in web.rglob("*") if path.is_file() and "__pycache__" not in path.parts]
    assert len(files) >= 5  # the three pages, dashboard.css and dashboard.js
    for path in files:
        package = ".".join(path.parent.relative_to(REPO).parts)
        globs = package_data.get(package, [])
        assert any(fnmatch.fnmatch(path.name, glob) for glob in globs), path


def test_no_text_installs_foedus_from_a_package_index() -> None:
    """foedus is not on an index: README, make help and docstrings install it from the clone."""
    texts = [REPO / "README.md", REPO / "Makefile", *REPO.glob("*/*.py"), *REPO.glob("docs/*.md")]
    from_index = re.compile(r"pip install\s+['\"]?foedus\b")
    found = [str(path) for path in texts if from_index.search(path.read_text(encoding="utf-8"))]
    assert found == []
    assert "pip install -e '.[torch]'" in (REPO / "README.md").read_text(encoding="utf-8")
