"""PORT_BASE: every port a demo uses moves, and nothing else does (`plans/demo_ports.py`).

`make demo` itself is too slow for the suite; this runs the same substitution on the very files
the demos run and reads the copies with foedus's own loaders.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from foedus.envoy.config import load_config as load_envoy_config
from foedus.experiment.config import load_client_config
from foedus.plans import load_plan
from foedus.plans.demo_ports import DEFAULT_BASE, main, write_moved
from foedus.plans.director_config import load_config as load_director_config

from federation_processes import REPO

SERVICE = REPO / "plans" / "service"
DEMO_FILES: list[tuple[Path, Callable[[Path], object]]] = [
    (REPO / "plans" / "local.yaml", load_plan),
    (REPO / "plans" / "torch_digits.yaml", load_plan),
    (REPO / "plans" / "secure.yaml", load_plan),
    (REPO / "plans" / "torch_digits_dp.yaml", load_plan),
    (SERVICE / "director.yaml", load_director_config),
    *[(SERVICE / f"{site}.yaml", load_envoy_config) for site in ("alice", "bob", "carol")],
    (SERVICE / "ada.yaml", load_client_config),
]
# A port of the demos' block written as a literal (50000 alone is PORT_BASE's default).
FIXED_PORT = re.compile(r"\b50(?!000\b)\d{3}\b")


def flat(value: object, prefix: str = "") -> dict[str, object]:
    """Every leaf of a loaded config by its attribute path (a range as its first and last)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        leaves: dict[str, object] = {}
        for field in dataclasses.fields(value):
            leaves |= flat(getattr(value, field.name), f"{prefix}.{field.name}")
        return leaves
    if isinstance(value, Mapping):
        return {
            k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}").items()
        }
    if isinstance(value, list | tuple):
        return {
            k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}[{i}]").items()
        }
    if isinstance(value, range):
        return {f"{prefix}.first": value.start, f"{prefix}.last": value[-1]}
    return {prefix: value}


@pytest.mark.parametrize("source, load", DEMO_FILES, ids=[path.name for path, _ in DEMO_FILES])
def test_a_moved_copy_differs_only_in_its_ports(
    tmp_path: Path, source: Path, load: Callable[[Path], object]
) -> None:
    """Loaded as foedus loads it, the copy moved to 51000 has each port + 1000, all else equal."""
    original = flat(load(source))
    copy = write_moved(source, 51000, tmp_path)
    moved = flat(load(copy))
    assert set(moved) == set(original)
    changed = {key for key in original if original[key] != moved[key]} - {".path"}
    assert changed, "no port moved"
    for key in changed:
        assert isinstance(original[key], int) and moved[key] == original[key] + 1000, key
    assert FIXED_PORT.findall(copy.read_text(encoding="utf-8")) == []
    same = flat(load(write_moved(source, DEFAULT_BASE, tmp_path / "default")))
    assert {key for key in original if original[key] != same[key]} == {".path"}


def test_the_demos_run_only_moved_copies() -> None:
    """No port is written in demo.sh or in the Makefile's recipes: each comes from a moved copy."""
    script = (SERVICE / "demo.sh").read_text(encoding="utf-8")
    code = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert FIXED_PORT.findall("\n".join(code)) == []
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipes = [line for line in makefile.splitlines() if line.startswith("\t")]
    assert [line for line in recipes if FIXED_PORT.search(line) and "echo" not in line] == []
    demo_plans = ["$(DEMO_PLAN)", "$(SECURE_DEMO_PLAN)", "$(TORCH_DEMO_PLAN)", "$(DP_DEMO_PLAN)"]
    for demo_plan in demo_plans:
        assert demo_plan in makefile
    federations = [line for line in recipes if "plans/demo.sh" in line]
    assert [line.split()[3] for line in federations] == demo_plans


def test_a_base_that_moves_a_port_out_of_range_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PORT_BASE 65400 would put the director's port past 65535: refused, nothing written."""
    assert main(["--base", "65400", "--out", str(tmp_path), str(SERVICE / "director.yaml")]) == 2
    assert capsys.readouterr().err == (
        "demo_ports: error: PORT_BASE 65400 moves port 50350 to 65750, outside 1024-65535\n"
    )
    assert not (tmp_path / "director.yaml").exists()
