"""`aggregator start` under cProfile in every thread that does work, for `bench.py --profile`.

Usage: ``python profiled_aggregator.py STATS_FILE start --plan PLAN ...``. `Runtime.run` (the
main thread once serving: closing rounds, aggregating, saving) is profiled whole, start-up left
out; each `GetAggregatedModel` (each step of its stream), `SendLocalTaskResults` and
`PostSecureMessage` call is profiled in its worker thread.
On exit the merged statistics are written to STATS_FILE (`pstats` format). Product code is not
changed: the methods are wrapped here, before the server registers them.
"""

from __future__ import annotations

import cProfile
import functools
import inspect
import pstats
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from foedus.aggregator import cli
from foedus.aggregator.runtime import Runtime
from foedus.aggregator.servicer import AggregatorServicer

PROFILED_RPCS = ("GetAggregatedModel", "SendLocalTaskResults", "PostSecureMessage")


def main(argv: list[str]) -> int:
    """Run the aggregator command `argv[1:]` profiled; write the statistics to `argv[0]`."""
    stats_file = Path(argv[0])
    finished: list[cProfile.Profile] = []
    lock = threading.Lock()

    def profiled(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(method):
            return profiled_stream(method)

        @functools.wraps(method)
        def wrapper(*args: Any) -> Any:
            profile = cProfile.Profile()
            try:
                return profile.runcall(method, *args)
            finally:
                with lock:
                    finished.append(profile)

        return wrapper

    def profiled_stream(method: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        """A streaming RPC: each step of its iterator is profiled, gRPC's sending between them not."""

        @functools.wraps(method)
        def wrapper(*args: Any) -> Iterator[Any]:
            profile = cProfile.Profile()
            steps = method(*args)
            try:
                while True:
                    profile.enable()
                    try:
                        item = next(steps)
                    except StopIteration:
                        return
                    finally:
                        profile.disable()
                    yield item
            finally:
                with lock:
                    finished.append(profile)

        return wrapper

    for name in PROFILED_RPCS:
        setattr(AggregatorServicer, name, profiled(getattr(AggregatorServicer, name)))
    setattr(Runtime, "run", profiled(Runtime.run))  # noqa: B010 - a method, replaced on purpose
    code = cli.main(argv[1:])
    with lock:
        if finished:
            stats = pstats.Stats(finished[0])
            for profile in finished[1:]:
                stats.add(profile)
            stats.dump_stats(stats_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
