"""The demos' plans and configs with every port moved, so two demos (or two clones) share a host.

The demos' files use ports from `DEFAULT_BASE` (`make demo` 50051, `make demo-torch` 50052,
`make demo-service` 50350-50359); `make ... PORT_BASE=51000` runs them from copies written
here with each port moved by PORT_BASE - 50000 (51051, 51052, 51350-51359):

    python -m foedus.plans.demo_ports --base 51000 --out build/ports plans/local.yaml

Each copy keeps the file's name and what it says, with its relative paths made absolute (the copy
lives elsewhere) and every port moved: `port`, `ports` and the port of `address`,
`metrics_address` and a client config's `director` ("host:port", or a port alone). Comments are
not kept: the copies are build output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from foedus.plans.reader import safe_yaml

DEFAULT_BASE = 50000  # the ports written in the demos' files count from here
PATH_KEYS = frozenset({"certs_dir", "state_dir", "output_dir", "initial_model"})
ADDRESS_KEYS = frozenset({"address", "metrics_address", "director"})
LOWEST, HIGHEST = 1024, 65535  # a demo never needs a privileged port


class PortsError(ValueError):
    """A base that moves a port out of range, or a file that cannot be read."""


def moved_port(port: int, base: int) -> int:
    """`port` moved from `DEFAULT_BASE` to `base`; `PortsError` when it leaves 1024-65535."""
    moved = port - DEFAULT_BASE + base
    if not LOWEST <= moved <= HIGHEST:
        raise PortsError(
            f"PORT_BASE {base} moves port {port} to {moved}, outside {LOWEST}-{HIGHEST}"
        )
    return moved


def _moved_address(value: object, base: int) -> object:
    """ "host:port" or a port alone, its port moved; anything else (a host alone) as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return moved_port(value, base)
    if isinstance(value, str):
        host, colon, port = value.rpartition(":")
        if colon and port.isdigit() and not host.endswith(":"):  # not an IPv6 address alone
            return f"{host}:{moved_port(int(port), base)}"
    return value


def moved(document: object, base: int, folder: Path) -> object:
    """`document` with its ports moved and its relative paths resolved against `folder`."""
    if isinstance(document, list):
        return [moved(item, base, folder) for item in document]
    if not isinstance(document, dict):
        return document
    result: dict[object, object] = {}
    for key, value in document.items():
        if key in PATH_KEYS and isinstance(value, str) and value:
            result[key] = str((folder / value).resolve())
        elif key == "port" and isinstance(value, int) and not isinstance(value, bool):
            result[key] = moved_port(value, base)
        elif key == "ports" and isinstance(value, list):
            result[key] = [
                moved_port(port, base) if isinstance(port, int) else port for port in value
            ]
        elif key in ADDRESS_KEYS and not isinstance(value, dict):
            result[key] = _moved_address(value, base)
        else:
            result[key] = moved(value, base, folder)
    return result


def write_moved(source: Path, base: int, out: Path) -> Path:
    """Write `source` moved to `base` as `out/NAME` (same name); its path."""
    try:
        document = safe_yaml(source.read_text(encoding="utf-8"))  # aliases refused, as everywhere
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise PortsError(f"{source}: cannot read: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    target = out / source.name
    target.write_text(
        f"# {source} with its ports moved to PORT_BASE {base} (plans/demo_ports.py)\n"
        + yaml.safe_dump(moved(document, base, source.resolve().parent), sort_keys=False),
        encoding="utf-8",
    )
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Write each file's moved copy into --out and print its path; exit 2 on a bad base or file."""
    parser = argparse.ArgumentParser(prog="python -m foedus.plans.demo_ports", description=__doc__)
    parser.add_argument("--base", type=int, default=DEFAULT_BASE, help="PORT_BASE (default 50000)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the copies")
    parser.add_argument("files", type=Path, nargs="+", help="plans and configs to move")
    args = parser.parse_args(argv)
    try:
        for source in args.files:
            print(write_moved(source, args.base, args.out))
    except PortsError as error:
        print(f"demo_ports: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
