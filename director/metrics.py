"""The director's Prometheus metrics, read from its state at each scrape, in a registry of its own.

Nothing is counted twice: every value is computed from `DirectorState` when Prometheus scrapes, so
a restarted director reports the same as before. Served on director.yaml's `metrics_address` (off
by default) by `foedus.serving.metrics.RegistryServer`, never the process-wide default registry.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from foedus.director.records import ExperimentState
from foedus.director.state import DirectorState
from foedus.plans.schema import Address
from foedus.serving.metrics import RegistryServer

logger = logging.getLogger(__name__)


class DirectorCollector(Collector):
    """Experiments by state, envoys registered and online, the queue: read at each scrape."""

    def __init__(self, state: DirectorState) -> None:
        """Read `state` at each scrape."""
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The director's gauges, now."""
        experiments = self.state.experiments()
        by_state = Counter(experiment.state for experiment in experiments)
        family = GaugeMetricFamily(
            "foedus_director_experiments",
            "Experiments the director keeps, by lifecycle state",
            labels=["state"],
        )
        for state in ExperimentState:  # every state, 0 included, so a series never vanishes
            family.add_metric([state.value], by_state.get(state, 0))
        yield family
        envoys = self.state.envoys()
        yield GaugeMetricFamily(
            "foedus_director_envoys_registered",
            "Envoys that have registered with this director",
            value=len(envoys),
        )
        yield GaugeMetricFamily(
            "foedus_director_envoys_online",
            "Envoys whose last heartbeat is at most two health periods old",
            value=sum(1 for envoy in envoys if envoy.online),
        )
        yield GaugeMetricFamily(
            "foedus_director_queue_length",
            "Approved experiments waiting for a running place (max_running_experiments)",
            value=len(self.state.queue()),
        )
        yield GaugeMetricFamily(
            "foedus_director_aggregators",
            "Experiments whose aggregator process the director runs now",
            value=sum(1 for e in experiments if e.aggregator_pid is not None),
        )


class DirectorMetrics(RegistryServer):
    """The registry with the director's collector, and its HTTP server when started."""

    def __init__(self, state: DirectorState, address: Address) -> None:
        """Metrics of `state`, to be served on `address`."""
        registry = CollectorRegistry()
        registry.register(DirectorCollector(state))
        super().__init__(registry, address, "director metrics", logger)
