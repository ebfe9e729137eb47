"""The envoy's loop: register, heartbeat, report, send logs; back off while the director is away.

One thread. Every `tick_seconds` the site's collaborators are looked after (`Site.tick`), with
or without a director; the director is called when its heartbeat is due or a state is to be
reported. A call that fails pauses calls to the director for a capped exponential backoff with
jitter (`foedus.retry.backoff.Backoff`), during which the collaborators are still looked after: the
envoy never exits because the director is away, nor because it refuses (that is logged as an
error and retried at the cap, so a director.yaml fixed later lets the site in).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib import metadata
from random import random as uniform_random

from foedus.envoy.client import DirectorClient
from foedus.envoy.config import Connection, Shard
from foedus.envoy.errors import DirectorRefusedError, DirectorUnavailableError, EnvoyError
from foedus.envoy.site import Site
from foedus.lifecycle.orders import Work
from foedus.pki.errors import PkiError
from foedus.retry.backoff import Backoff

logger = logging.getLogger(__name__)

TICK_SECONDS = 0.5
DEFAULT_HEALTH_SECONDS = 10.0


def foedus_version() -> str:
    """This installation's foedus version, sent to the director for people to see."""
    try:
        return metadata.version("foedus")
    except metadata.PackageNotFoundError:
        return "unknown"


class EnvoyLoop:
    """Runs one envoy until `stop` is set; see the module's docstring."""

    def __init__(
        self,
        site: Site,
        client: DirectorClient,
        *,
        shard: Shard,
        connection: Connection,
        stop: threading.Event,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = uniform_random,
        tick_seconds: float = TICK_SECONDS,
    ) -> None:
        """`sleep` defaults to waiting on `stop`, so a stop ends any wait at once."""
        self.site = site
        self.client = client
        self.shard = shard
        self.stop = stop
        self.sleep = sleep or stop.wait
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.backoff = Backoff(
            connection.backoff_initial_seconds, connection.backoff_max_seconds, random
        )
        self.health_seconds = DEFAULT_HEALTH_SECONDS
        self.registered = False
        self._next_heartbeat = 0.0
        self._paused_until = 0.0

    def run(self) -> None:
        """Look after the site and talk to the director until stopped."""
        self.site.recover()
        while not self.stop.is_set():
            self.step()
            self.sleep(self.tick_seconds)

    def step(self) -> None:
        """One turn: the site's collaborators, then the director if a call is due and allowed."""
        try:
            self.site.tick()
        except EnvoyError as error:  # its state folder: logged, tried again next turn
            logger.error("%s", error)
        if self.clock() < self._paused_until:
            return
        try:
            self._talk()
        except (DirectorUnavailableError, PkiError) as error:
            self._pause(f"{error}", self.backoff.next_delay())
        except DirectorRefusedError as error:
            self.backoff.at_cap()  # retried at the cap
            self._pause(f"{error}", self.backoff.next_delay(), refused=True)
        else:
            self.backoff.reset()

    def director_state(self) -> str:
        """How the director is to this envoy now: connected, unreachable or connecting."""
        if self.clock() < self._paused_until:
            return "unreachable"
        return "connected" if self.registered else "connecting"

    def _talk(self) -> None:
        if not self.registered:
            self.health_seconds = self.client.register(self.shard, foedus_version())
            self.registered = True
            self._next_heartbeat = 0.0
            self.site.state.report_all_again()  # a director that lost track hears it all again
            logger.info(
                "registered with the director at %s; heartbeat every %g s",
                self.client.target,
                self.health_seconds,
            )
        self._send_reports()
        if self.clock() < self._next_heartbeat:
            return
        work, health = self.client.heartbeat(self.site.reports())
        if health > 0:
            self.health_seconds = health
        if work is None:
            logger.warning("the director does not know this envoy; registering again")
            self.registered = False
            return
        self._next_heartbeat = self.clock() + self.health_seconds
        self._do(work)

    def _do(self, work: Work) -> None:
        self.site.receive(work)
        for order in work.logs:
            piece = self.site.read_log(order)
            try:
                self.client.upload_log(order.request_id, piece)
            except DirectorRefusedError as error:
                logger.warning("log of experiment %s not taken: %s", order.experiment_id, error)
        self._send_reports()

    def _send_reports(self) -> None:
        for report in self.site.unreported():
            try:
                self.client.report(report)
            except DirectorRefusedError as error:
                # A retry cannot change a refusal (an experiment the director removed, say).
                logger.warning("report on experiment %s refused: %s", report.experiment_id, error)
            self.site.acknowledged(report)

    def _pause(self, why: str, delay: float, *, refused: bool = False) -> None:
        self._paused_until = self.clock() + delay
        log = logger.error if refused else logger.warning
        log("director call failed: %s; next attempt in %.1f s", why, delay)
