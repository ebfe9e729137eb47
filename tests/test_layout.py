"""The rooms and the one direction of their imports, as README's Layout section draws them.

README's Layout table lists every package in the order imports may go: a package imports only
packages listed above it. On top of that, the services (the aggregator, the collaborator, the
director, the envoy, the `experiment` client) import no other service: what two of them share
lives below both. The few exceptions are named here, each with its reason.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVICES = frozenset({"aggregator", "collaborator", "director", "envoy", "experiment"})
# (importing module, imported package): why the import runs against the table.
EXCEPTIONS = {
    ("pki.cli", "plans"): "`pki setup --plan` reads the plan's names and hosts (imported lazily)",
    ("envoy.leave", "collaborator"): "the envoy tells the aggregator that its site left with the "
    "collaborator's own client, as the collaborator would have",
    ("envoy.cli", "collaborator"): "how long the envoy's `Leave` may take is the client's",
}


def table_order() -> list[str]:
    """The packages in README's Layout table, top first."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)/` \|", section, flags=re.MULTILINE)


def packages() -> list[str]:
    """Our top-level import packages, as pyproject installs them."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    names = pyproject["tool"]["setuptools"]["packages"]
    return sorted({_ours(name) for name in names} - {""})


def _ours(module: str) -> str:
    """The package of ours a module name is in ('' for none): foedus.x.y and x.y are both x."""
    parts = module.split(".")
    if parts[0] == "foedus" and len(parts) > 1 and (REPO / parts[1]).is_dir():
        return parts[1]
    return parts[0] if (REPO / parts[0] / "__init__.py").is_file() else ""


def imports(package: str) -> Iterator[tuple[str, str]]:
    """(module, package of ours it imports) for every import in `package`, lazy ones too."""
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                imported = _ours(name)
                if imported and imported != package:
                    yield module, imported


def test_the_layout_table_lists_every_package_once() -> None:
    order = table_order()
    assert len(order) == len(set(order)), order
    assert sorted(set(packages()) - set(order)) == []


@pytest.mark.parametrize("package", packages())
def test_a_package_imports_only_packages_above_it(package: str) -> None:
    order = table_order()
    above = set(order[: order.index(package)])
    wrong = [
        f"{module} imports {imported}"
        for module, imported in imports(package)
        if imported not in above and (module, imported) not in EXCEPTIONS
    ]
    assert wrong == [], "README's Layout table says imports go up it only"


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_a_service_imports_no_other_service(package: str) -> None:
    wrong = [
        f"{module} imports {imported}"
        for module, imported in imports(package)
        if imported in SERVICES and (module, imported) not in EXCEPTIONS
    ]
    assert wrong == [], "what two services share lives below both"


def test_every_exception_is_still_needed() -> None:
    found = {edge for package in packages() for edge in imports(package)}
    assert sorted(set(EXCEPTIONS) - found) == []
