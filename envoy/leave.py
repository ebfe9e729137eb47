"""Telling an experiment's aggregator that the site has given its collaborator up (`Leave`).

When the envoy gives a collaborator up (`foedus.envoy.site`: exit 2, restarts used up, the site
operator's stop), no round should wait for that site any more. The envoy holds the site's
collaborator certificate and wrote the site's plan, so it calls `Leave` as the site, with a fixed
category for a reason (never a log line: that stays at the site). Best effort, in a thread of its
own so the envoy's loop never waits: one call, bounded by the client's `LEAVE_SECONDS`, a failure
logged. The plan the director writes for the aggregator stops waiting for a silent site anyway
(`foedus.director.experiment_plan`); this makes it immediate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from foedus.collaborator.client import AggregatorGRPCClient
from foedus.collaborator.errors import ClientError
from foedus.pki.errors import PkiError
from foedus.plans.loader import PlanError, load_plan

logger = logging.getLogger(__name__)

# What a Leave is: (experiment id, the site's plan, the site, the reason).
LeaveCall = Callable[[str, Path, str, str], object]


def leave(experiment_id: str, plan_path: Path, site: str, reason: str) -> bool:
    """Call `Leave` as `site` on the aggregator of its plan; whether it was told (never raises)."""
    try:
        plan = load_plan(plan_path)
        with AggregatorGRPCClient.from_plan(plan, site) as client:
            client.leave(reason)
    except PlanError as error:
        problem = "; ".join(error.problems)
    except (ClientError, PkiError, OSError) as error:
        problem = str(error)
    else:
        logger.info(
            "experiment %s: told the aggregator that %s left: %s", experiment_id, site, reason
        )
        return True
    logger.warning(
        "experiment %s: could not tell the aggregator that %s left (it stops waiting for a "
        "silent site by itself): %s",
        experiment_id,
        site,
        problem,
    )
    return False


class Leaving:
    """`Leave` calls, each in a thread of its own: the envoy's loop never waits for one."""

    def __init__(self, call: LeaveCall = leave) -> None:
        """`call` makes one Leave (tests give their own)."""
        self._call = call
        self._threads: list[threading.Thread] = []

    def __call__(self, experiment_id: str, plan_path: Path, site: str, reason: str) -> None:
        """Start telling the aggregator; returns at once."""
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        thread = threading.Thread(
            target=self._call,
            args=(experiment_id, plan_path, site, reason),
            name=f"leave-{experiment_id}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def wait(self, timeout: float) -> None:
        """Wait at most `timeout` seconds in all for the calls under way, as the envoy stops."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
