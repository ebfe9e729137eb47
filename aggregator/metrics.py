"""Prometheus metrics of one aggregator, in a registry of its own, served over HTTP when asked.

`Metrics` is told what happens (a round closed, a result accepted, a call refused, bytes moved)
and reads the rest when scraped (the round in progress, collaborators online, those that have
left and why, free storage, health, the privacy budget spent), so nothing is kept twice. Counters are per process, as
Prometheus expects: they start at 0 when the aggregator starts; `foedus_round` says where the
federation stands.

The hot paths stay cheap: bytes are counted once per transfer (an upload, a model stream, a tensor),
never per chunk. `MetricsServer` serves this registry on the plan's `aggregator.metrics_address`
(`foedus.serving.metrics.RegistryServer`: prometheus-client's HTTP server in its own thread),
started and stopped with the aggregator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from foedus.aggregator.inspection import PrivacySpent
from foedus.plans.schema import Address
from foedus.serving.metrics import RegistryServer

logger = logging.getLogger(__name__)

# Round durations: from a second to a day.
ROUND_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 86400)


class Metrics:
    """The aggregator's instruments; the callables are read at each scrape."""

    def __init__(
        self,
        *,
        round_number: Callable[[], int],
        storage_free_bytes: Callable[[], float],
        serving: Callable[[], bool],
        collaborators_online: Callable[[], int] | None = None,
        collaborators_left: Callable[[], Mapping[str, str]] | None = None,
        privacy_spent: Callable[[], PrivacySpent] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        Gauge(
            "foedus_round", "The round in progress, counted from 0", registry=registry
        ).set_function(round_number)
        self.rounds = Counter(
            "foedus_rounds", "Rounds closed by this aggregator process", registry=registry
        )
        self.round_seconds = Histogram(
            "foedus_round_seconds",
            "Duration of each closed round, from the first hand-out of its tasks to its close",
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        if collaborators_online is not None:  # exported only with a source of the count
            Gauge(
                "foedus_collaborators_online",
                "Collaborators heard from recently enough to count as online",
                registry=registry,
            ).set_function(collaborators_online)
        if collaborators_left is not None:
            registry.register(_Departures(collaborators_left))
        if privacy_spent is not None:  # a federation with differential privacy only
            registry.register(_PrivacyBudget(privacy_spent))
        self.results_accepted = Counter(
            "foedus_results_accepted",
            "Task results accepted (resends of an accepted result not counted)",
            registry=registry,
        )
        self.refusals = Counter(
            "foedus_rpc_refusals",
            "Calls answered with an error status, by RPC and status code",
            ("rpc", "code"),
            registry=registry,
        )
        self.upload_bytes = Counter(
            "foedus_upload_bytes",
            "Bytes of task-result streams read (SendLocalTaskResults), refused ones included",
            registry=registry,
        )
        self.download_bytes = Counter(
            "foedus_download_bytes",
            "Bytes of the global model sent (GetAggregatedModel chunks, GetAggregatedTensor data)",
            registry=registry,
        )
        Gauge(
            "foedus_storage_free_bytes",
            "Bytes free for the aggregator in the file system of aggregator.output_dir",
            registry=registry,
        ).set_function(storage_free_bytes)
        Gauge(
            "foedus_serving",
            "1 while the health service answers SERVING, else 0",
            registry=registry,
        ).set_function(lambda: 1.0 if serving() else 0.0)

    def round_closed(self, seconds: float) -> None:
        """A round closed after `seconds`."""
        self.rounds.inc()
        self.round_seconds.observe(seconds)

    def result_accepted(self) -> None:
        """A task result was accepted (not a resend)."""
        self.results_accepted.inc()

    def refused(self, rpc: str, code: str, error: Exception) -> None:
        """A call of `rpc` was answered with status `code`."""
        self.refusals.labels(rpc=rpc, code=code).inc()

    def uploaded(self, size: int) -> None:
        """An upload stream's `size` bytes were read."""
        if size:
            self.upload_bytes.inc(size)

    def downloaded(self, size: int) -> None:
        """`size` bytes of the global model were sent."""
        if size:
            self.download_bytes.inc(size)


class MetricsServer(RegistryServer):
    """prometheus-client's HTTP server for `metrics`' registry on `address`, in its own thread."""

    def __init__(self, metrics: Metrics, address: Address) -> None:
        super().__init__(metrics.registry, address, log=logger)
        self.metrics = metrics


class _Departures(Collector):
    """Who has left, read at each scrape: how many, and each one with its reason."""

    def __init__(self, departures: Callable[[], Mapping[str, str]]) -> None:
        self._departures = departures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The two gauges, from the departures now."""
        departures = self._departures()
        yield GaugeMetricFamily(
            "foedus_collaborators_left",
            "Collaborators that have left (said they give up) and not called again",
            value=len(departures),
        )
        each = GaugeMetricFamily(
            "foedus_collaborator_left",
            "1 for each collaborator that has left, with the reason it gave",
            labels=("collaborator", "reason"),
        )
        for name, reason in departures.items():
            each.add_metric((name, reason), 1.0)
        yield each


class _PrivacyBudget(Collector):
    """A DP federation's budget, read at each scrape: the epsilon spent, its delta, the cap."""

    def __init__(self, spent: Callable[[], PrivacySpent]) -> None:
        self._spent = spent

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges, from the training rounds closed now (no cap: no `foedus_dp_max_epsilon`)."""
        spent = self._spent()
        yield GaugeMetricFamily(
            "foedus_dp_epsilon",
            "Differential privacy: the epsilon the federation has spent so far, at foedus_dp_delta",
            value=spent.epsilon,
        )
        yield GaugeMetricFamily(
            "foedus_dp_delta", "Differential privacy: the delta of the epsilon", value=spent.delta
        )
        if spent.max_epsilon is not None:
            yield GaugeMetricFamily(
                "foedus_dp_max_epsilon",
                "Differential privacy: the plan's cap on epsilon (no training round past it)",
                value=spent.max_epsilon,
            )
