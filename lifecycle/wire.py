"""The lifecycle's states, orders and reports from and to director.proto's messages, once.

The director's servicer and the envoy's client both convert with these, so a state or a field
added to director.proto is added here and nowhere else. Conversion only: each side's edge checks
what it received (ids, bounds) by its own rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from foedus.lifecycle.orders import CollaboratorReport, LogOrder, StartOrder, Work
from foedus.lifecycle.states import CollaboratorState
from foedus.protos import director_pb2

_C = CollaboratorState
_TO_WIRE: Final[Mapping[CollaboratorState, director_pb2.CollaboratorState]] = MappingProxyType(
    {
        _C.APPROVAL_PENDING: director_pb2.COLLABORATOR_APPROVAL_PENDING,
        _C.SITE_APPROVED: director_pb2.COLLABORATOR_SITE_APPROVED,
        _C.SITE_REJECTED: director_pb2.COLLABORATOR_SITE_REJECTED,
        _C.REFUSED: director_pb2.COLLABORATOR_REFUSED,
        _C.STARTED: director_pb2.COLLABORATOR_STARTED,
        _C.RUNNING: director_pb2.COLLABORATOR_RUNNING,
        _C.EXITED: director_pb2.COLLABORATOR_EXITED,
        _C.GAVE_UP: director_pb2.COLLABORATOR_GAVE_UP,
    }
)
_FROM_WIRE: Final[Mapping[int, CollaboratorState]] = MappingProxyType(
    {wire: state for state, wire in _TO_WIRE.items()}
)


def collaborator_state_to_proto(state: CollaboratorState | None) -> director_pb2.CollaboratorState:
    """The wire value of `state`; None (no report yet) is COLLABORATOR_STATE_UNSPECIFIED."""
    if state is None:
        return director_pb2.COLLABORATOR_STATE_UNSPECIFIED
    return _TO_WIRE[state]


def collaborator_state_from_proto(value: int) -> CollaboratorState | None:
    """The state a wire value stands for; None for UNSPECIFIED or a value this version lacks."""
    return _FROM_WIRE.get(value)


def report_to_proto(report: CollaboratorReport) -> director_pb2.CollaboratorReport:
    """An envoy's report as it is sent."""
    return director_pb2.CollaboratorReport(
        experiment_id=report.experiment_id,
        state=_TO_WIRE[report.state],
        exit_code=report.exit_code,
        reason=report.reason,
    )


def report_from_proto(message: director_pb2.CollaboratorReport) -> CollaboratorReport | None:
    """The report as received, as it is; None when its state is none this version knows."""
    state = collaborator_state_from_proto(message.state)
    if state is None:
        return None
    return CollaboratorReport(
        experiment_id=message.experiment_id,
        state=state,
        exit_code=message.exit_code,
        reason=message.reason,
    )


def work_to_proto(
    work: Work | None, health_check_seconds: float
) -> director_pb2.EnvoyHeartbeatResponse:
    """A heartbeat's answer: `work`, or (None) register again; the period asked for either way."""
    if work is None:
        return director_pb2.EnvoyHeartbeatResponse(
            register_again=True, health_check_seconds=health_check_seconds
        )
    return director_pb2.EnvoyHeartbeatResponse(
        health_check_seconds=health_check_seconds,
        start=[
            director_pb2.ExperimentToStart(
                experiment_id=order.experiment_id,
                name=order.name,
                owner=order.owner,
                plan_yaml=order.plan_yaml,
                collaborator_name=order.collaborator_name,
            )
            for order in work.start
        ],
        stop=list(work.stop),
        log_requests=[
            director_pb2.LogRequestToEnvoy(
                request_id=order.request_id,
                experiment_id=order.experiment_id,
                offset=order.offset,
                max_bytes=order.max_bytes,
            )
            for order in work.logs
        ],
    )


def work_from_proto(response: director_pb2.EnvoyHeartbeatResponse) -> Work | None:
    """The work in a heartbeat's answer, or None when the director says register again."""
    if response.register_again:
        return None
    return Work(
        start=tuple(
            StartOrder(
                experiment_id=order.experiment_id,
                name=order.name,
                owner=order.owner,
                plan_yaml=order.plan_yaml,
                collaborator_name=order.collaborator_name,
            )
            for order in response.start
        ),
        stop=tuple(response.stop),
        logs=tuple(
            LogOrder(
                request_id=order.request_id,
                experiment_id=order.experiment_id,
                offset=order.offset,
                max_bytes=order.max_bytes,
            )
            for order in response.log_requests
        ),
    )
