"""Each collaborator's state and metrics in Redis, in FLorist's scheme.

One key per collaborator uuid (the experiment id for a director's) holding its JSON state
(`foedus.envoy.progress.describe`: state, rounds with per-round metrics, start and end times): after
each change, `SET <uuid> <json>` then `PUBLISH <uuid> update`. Only envoy.yaml's
`metrics.redis_url` is read, never a plan's: where a site's metrics go is the site's decision,
and a director's plan must not send them elsewhere.

A thread of its own (`RedisReporter`) polls the state every `interval` seconds and sends what
changed, so Redis never slows the envoy's loop. Redis away: logged once per outage, retried after a
capped backoff (`foedus.retry.backoff.Backoff`); when it is back every key is sent again (the latest
state of each, not every step in between), as a restarted Redis may have lost them.
"""

from __future__ import annotations

import json
import logging
import threading

import redis

from foedus.envoy.progress import ProgressBook, describe
from foedus.envoy.site import LOG_FILE, Site
from foedus.retry.backoff import Backoff

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 1.0
_TIMEOUT_SECONDS = 5.0


class RedisReporter:
    """Sends every collaborator's changed state to Redis until `stop`; see the module's docstring."""

    def __init__(
        self,
        site: Site,
        url: str,
        progress: ProgressBook,
        *,
        interval: float = INTERVAL_SECONDS,
        backoff: Backoff | None = None,
    ) -> None:
        """Nothing is sent before `start`; `url` is envoy.yaml's metrics.redis_url."""
        self.site = site
        self.progress = progress
        self.interval = interval
        self.backoff = backoff or Backoff(initial=0.5, cap=30.0)
        self.client = redis.Redis.from_url(
            url, socket_timeout=_TIMEOUT_SECONDS, socket_connect_timeout=_TIMEOUT_SECONDS
        )
        self.redacted_url = _redact(url)
        self._sent: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        """Report from a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="redis-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Send what changed one last time (if Redis answers), then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3 * _TIMEOUT_SECONDS)
            self._thread = None
        self.client.close()

    def _run(self) -> None:
        wait = self.interval
        while True:
            stopping = self._stop.is_set()
            try:
                self.send_changes()
            except (redis.RedisError, OSError) as error:
                wait = self.backoff.next_delay()
                self._sent.clear()  # a Redis that comes back may have lost every key
                if not self._failing:
                    logger.warning(
                        "metrics to Redis at %s failed: %s; trying again (training goes on)",
                        self.redacted_url,
                        error,
                    )
                self._failing = True
            except Exception:  # never the envoy's end: logged, tried again
                logger.exception("metrics to Redis: unexpected error")
                wait = self.backoff.next_delay()
            else:
                if self._failing:
                    logger.info("metrics to Redis at %s: sending again", self.redacted_url)
                self._failing = False
                self.backoff.reset()
                wait = self.interval
            if stopping:
                return
            self._stop.wait(wait)  # set by `stop`: one last round, then the end

    def send_changes(self) -> int:
        """SET and PUBLISH each collaborator whose state changed since last sent; how many.

        With nothing to send it PINGs, so a Redis gone (and come back empty) is noticed and
        every key is sent again.
        """
        sent = 0
        for experiment in self.site.state.experiments():
            key = experiment.experiment_id
            folder = self.site.folder(key)
            document = describe(experiment, self.progress.read(key, folder / LOG_FILE), folder)
            text = json.dumps(document, sort_keys=True)
            if self._sent.get(key) == text:
                continue
            pipeline = self.client.pipeline(transaction=False)
            pipeline.set(key, text)
            pipeline.publish(key, "update")
            pipeline.execute()
            self._sent[key] = text
            sent += 1
        if not sent:
            self.client.ping()
        return sent


def _redact(url: str) -> str:
    """The URL without its password, for the log."""
    scheme, _, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}://{'***@' if at else ''}{host}" if credentials or at else url
