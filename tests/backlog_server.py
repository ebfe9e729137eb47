"""A real aggregator server in a process of its own, whose Python a test can hold still.

`python tests/backlog_server.py PLAN` serves the plan's federation (the tests' small model) over
mutual TLS on an ephemeral port and prints ``port N``. Each line ``hold SECONDS`` on its stdin
makes it hold the GIL that long, as an aggregator on a loaded machine whose thread that takes
calls from gRPC cannot run: it prints ``holding`` before and ``held`` after. Calls that arrive
meanwhile wait in gRPC's backlog. An empty stdin line or its end stops the server.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from foedus.aggregator.server import AggregatorGRPCServer
from foedus.plans import load_plan

# isort: split
from servers import make_federation  # beside this file


def hold(seconds: float) -> None:
    """Run Python on this thread alone for `seconds`: no other thread gets the GIL meanwhile."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds + 60)
    try:
        print("holding", flush=True)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    finally:
        sys.setswitchinterval(previous)
    print("held", flush=True)


def main() -> int:
    """Serve until stdin ends; hold the GIL when asked."""
    plan = load_plan(Path(sys.argv[1]))
    server = AggregatorGRPCServer(plan, make_federation(plan))
    print(f"port {server.start()}", flush=True)
    try:
        for line in sys.stdin:
            command, _, value = line.strip().partition(" ")
            if command != "hold":
                break
            hold(float(value))
    finally:
        server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
