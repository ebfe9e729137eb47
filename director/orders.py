"""The work a director hands an envoy in a heartbeat's answer: plain data both sides share.

The director builds it (`director.service`), the envoy acts on it (`envoy.site`); each side's gRPC
edge converts it from and to director.proto's messages, so neither side's logic sees the wire.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StartOrder:
    """Run a collaborator for an experiment (director.proto's ExperimentToStart)."""

    experiment_id: str
    name: str
    owner: str
    plan_yaml: str
    collaborator_name: str


@dataclass(frozen=True)
class LogOrder:
    """Send part of a collaborator's log (director.proto's LogRequestToEnvoy)."""

    request_id: str
    experiment_id: str
    offset: int
    max_bytes: int


@dataclass(frozen=True)
class Work:
    """A heartbeat's answer: experiments to start and to stop, logs to send."""

    start: tuple[StartOrder, ...] = ()
    stop: tuple[str, ...] = ()
    logs: tuple[LogOrder, ...] = ()
