"""Failpoints: named places where a fault-injection test may have the aggregator kill itself.

For crash tests only, in the spirit of etcd's gofail: the environment variable
``FOEDUS_FAILPOINTS`` arms some points, each with a count, as ``NAME:COUNT[,NAME:COUNT...]``,
for example ``after_accept:3,while_saving:2``. The COUNT-th time the process reaches an armed
point it sends itself SIGKILL, so it dies at that exact place as it would in a power cut or an
OOM kill: no handler, no ``finally``, no flush. Unarmed, `failpoint` costs one dict lookup.

The points (see `POINTS`):

* ``after_accept``: a task result is durable (file written, SQLite row committed), not yet
  answered OK; the collaborator will resend it.
* ``while_aggregating``: in the middle of a round's aggregation: its results read, not averaged.
* ``before_round_commit``: the round's new global model file is written, the round not committed.
* ``while_saving``: writing ``last_model.pbuf`` or ``best_model.pbuf``: the new bytes are in a
  temporary file, not yet renamed over the old one.

`configure` is called once by ``aggregator start``; a malformed value is refused there with one
line, never silently ignored.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping

ENVIRONMENT_VARIABLE = "FOEDUS_FAILPOINTS"
POINTS = ("after_accept", "while_aggregating", "before_round_commit", "while_saving")

_armed: dict[str, int] = {}  # point -> hits left before the kill
_lock = threading.Lock()


class FailpointError(ValueError):
    """``FOEDUS_FAILPOINTS`` is malformed or names an unknown point."""


def parse(spec: str) -> dict[str, int]:
    """The points and counts of a ``NAME:COUNT,...`` spec; `FailpointError` names what is wrong."""
    armed: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        if name not in POINTS:
            raise FailpointError(
                f"{ENVIRONMENT_VARIABLE}: unknown failpoint {name!r} (known: {', '.join(POINTS)})"
            )
        if not count.isdigit() or int(count) < 1:
            raise FailpointError(
                f"{ENVIRONMENT_VARIABLE}: {name}: expected a count of 1 or more, got {count!r}"
            )
        armed[name] = int(count)
    return armed


def configure(environment: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Arm the points `environment` names (none when the variable is unset); the armed points."""
    armed = parse(environment.get(ENVIRONMENT_VARIABLE, ""))
    with _lock:
        _armed.clear()
        _armed.update(armed)
    return dict(armed)


def failpoint(name: str) -> None:
    """SIGKILL this process if `name` is armed and this is its COUNT-th hit; else nothing."""
    if _armed.get(name) is None:
        return
    with _lock:
        left = _armed.get(name)
        if left is None:
            return
        if left > 1:
            _armed[name] = left - 1
            return
    os.write(2, f"failpoint {name} reached: SIGKILL\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
