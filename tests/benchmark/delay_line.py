"""The wide-area round's delay line: the tests' `FaultProxy` as a process, one listener per site.

Usage: ``python delay_line.py --upstream HOST:PORT --latency SECONDS --listen HOST [--listen ...]``.
Prints ``listening HOST PORT`` for each listener, then ``ready``, and forwards until SIGTERM.
Every byte, both ways, leaves `latency` after it arrived (see `FaultProxy.set_latency`): half of
the round trip a wide-area link adds, with its pace left to the shaped link. This kernel has no
`netem` (CONFIG_NET_SCH_NETEM is off), so the delay is added here, in user space.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

# The tests' fault proxy, one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fault_proxy import FaultProxy


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a delay line per `--listen` address until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="delay_line.py", description=__doc__)
    parser.add_argument("--upstream", required=True, help="HOST:PORT every listener forwards to")
    parser.add_argument("--latency", type=float, required=True, help="seconds added each way")
    parser.add_argument("--listen", action="append", required=True, help="address to listen on")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with ExitStack() as stack:
        for address in args.listen:
            proxy = stack.enter_context(FaultProxy(host, int(port), listen_host=address))
            proxy.set_latency(args.latency)
            print(f"listening {address} {proxy.port}", flush=True)
        print("ready", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
