"""What the director and an envoy say to each other, as plain data both sides share.

The director hands an envoy `Work` in a heartbeat's answer (`foedus.director.envoys` builds it,
`foedus.envoy.site` acts on it); the envoy sends back a `CollaboratorReport` for each change of its
collaborators' states. Each side's gRPC edge converts them from and to director.proto's messages
with `foedus.lifecycle.wire`, so neither side's logic sees the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from foedus.lifecycle.states import CollaboratorState


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


@dataclass(frozen=True)
class CollaboratorReport:
    """An envoy's report on its collaborator for one experiment (director.proto's CollaboratorReport)."""

    experiment_id: str
    state: CollaboratorState
    exit_code: int = 0
    reason: str = ""
