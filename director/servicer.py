"""DirectorServicer: the wire side of the director, thin: identify, admit, convert, delegate.

Every RPC runs under `_unary`, `_receiving` or `_streaming`: the caller is identified from its
certificate there (the one place, `foedus.director.identity.Roster.identify`), admitted
(`foedus.director.capacity`), and any refusal becomes its status (`foedus.refusals.grpc`, `abort`).
The logic is the desks' (`foedus.director.envoys`, `foedus.director.people`, put together by
`foedus.director.service`).

So that no identity can exhaust the director, each call holds a slot of director.yaml's limits from
right after its caller is identified until it ends, and one past them is refused at once
(RESOURCE_EXHAUSTED naming the limit): `limits.max_calls_per_identity` per certificate name,
`limits.max_people_calls` for all users and admins together; an envoy's heartbeats, registrations
and reports count apart from its log uploads, so that they always have slots of their own. A stream
sent to the director (a submitted model, an uploaded log) that sends nothing for
`limits.idle_stream_seconds` ends with DEADLINE_EXCEEDED (`foedus.admission.calls.chunks_within`).
`foedus.director.server` sizes its worker threads so that every admitted call has one. A followed
stream waits between reads for the director's next change (`_follow`, `foedus.director.changes`).
About 500 lines: the conversions of all 16 RPCs, a few lines each, kept together as the one wire
side.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import NoReturn, TypeVar

import grpc

from foedus.admission.calls import chunks_within
from foedus.director.capacity import Capacity
from foedus.director.changes import Follow
from foedus.director.fields import checked_id, checked_length, checked_offset
from foedus.director.folders import ModelUpload
from foedus.director.identity import Caller
from foedus.director.people import ExperimentView, PrivacyBudget, SiteView
from foedus.director.records import ExperimentState, ShardInfo
from foedus.director.service import DirectorService
from foedus.lifecycle.orders import CollaboratorReport
from foedus.lifecycle.wire import collaborator_state_to_proto, report_from_proto, work_to_proto
from foedus.plans.reader import NAME_PATTERN, shown
from foedus.protos import director_pb2, director_pb2_grpc
from foedus.refusals.errors import InvalidRequestError, StreamTimeoutError
from foedus.refusals.grpc import answer, status_for
from foedus.serving.identity import peer_of

logger = logging.getLogger(__name__)

M = TypeVar("M")
R = TypeVar("R")
T = TypeVar("T")
MAX_NAME = 200  # an experiment's name, as the site API bounds its own
MAX_REASON = 1000  # a review's reason, as the site API bounds its own
MAX_DESCRIPTION = 4096  # a shard's description, its labels' keys and values, an envoy's version
MAX_LABELS = 256
MAX_REPORT_REASON = 2000  # of an envoy's report on its collaborator: more is cut

_EXPERIMENT_TO_WIRE = {
    ExperimentState.SUBMITTED: director_pb2.EXPERIMENT_SUBMITTED,
    ExperimentState.APPROVED: director_pb2.EXPERIMENT_APPROVED,
    ExperimentState.REJECTED: director_pb2.EXPERIMENT_REJECTED,
    ExperimentState.WAITING: director_pb2.EXPERIMENT_WAITING,
    ExperimentState.RUNNING: director_pb2.EXPERIMENT_RUNNING,
    ExperimentState.COMPLETED: director_pb2.EXPERIMENT_COMPLETED,
    ExperimentState.FAILED: director_pb2.EXPERIMENT_FAILED,
    ExperimentState.CANCELLED: director_pb2.EXPERIMENT_CANCELLED,
}
_MODEL_KINDS = {director_pb2.MODEL_KIND_BEST: "best", director_pb2.MODEL_KIND_LAST: "last"}


def _unary(
    method: Callable[[DirectorServicer, Caller, R, grpc.ServicerContext], T],
) -> Callable[[DirectorServicer, R, grpc.ServicerContext], T]:
    """An RPC: its caller identified first, a refusal answered with its status."""

    @functools.wraps(method)
    def guarded(servicer: DirectorServicer, request: R, context: grpc.ServicerContext) -> T:
        try:
            with servicer.admitted(context, method.__name__) as caller:
                return method(servicer, caller, request, context)
        except Exception as error:
            abort(context, method.__name__, error)

    return guarded


def _receiving(
    method: Callable[[DirectorServicer, Caller, Iterator[R], grpc.ServicerContext], T],
) -> Callable[[DirectorServicer, Iterator[R], grpc.ServicerContext], T]:
    """`_unary` for an RPC a client streams to: a stream that stops sending is ended."""

    @functools.wraps(method)
    def guarded(
        servicer: DirectorServicer, request: Iterator[R], context: grpc.ServicerContext
    ) -> T:
        rpc = method.__name__
        try:
            with servicer.admitted(context, rpc) as caller:
                seconds = servicer.service.config.limits.idle_stream_seconds
                messages = chunks_within(
                    request,
                    seconds,
                    what=f"{rpc} stream",
                    key="limits.idle_stream_seconds",
                    timeout=StreamTimeoutError,
                    idle=True,
                )
                with closing(messages):  # closed: its reader stops if we stop early
                    return method(servicer, caller, messages, context)
        except Exception as error:
            abort(context, rpc, error)

    return guarded


def _streaming(
    method: Callable[[DirectorServicer, Caller, R, grpc.ServicerContext], Iterator[T]],
) -> Callable[[DirectorServicer, R, grpc.ServicerContext], Iterator[T]]:
    """`_unary` for an RPC that answers with a stream: a refusal ends the stream with its status."""

    @functools.wraps(method)
    def guarded(
        servicer: DirectorServicer, request: R, context: grpc.ServicerContext
    ) -> Iterator[T]:
        try:
            with servicer.admitted(context, method.__name__) as caller:
                yield from method(servicer, caller, request, context)
        except Exception as error:
            abort(context, method.__name__, error)

    return guarded


class DirectorServicer(director_pb2_grpc.DirectorServicer):
    """The Director service of protos/director.proto over a `DirectorService`."""

    def __init__(self, service: DirectorService, stopping: threading.Event) -> None:
        """Serve `service`; followed streams end when `stopping` is set."""
        self.service = service
        self.envoys = service.envoy_desk
        self.people = service.people
        self.stopping = stopping
        self.capacity = Capacity(service.config.limits)

    def identify(self, context: grpc.ServicerContext) -> Caller:
        """The caller: its verified certificate's common name, given its role by director.yaml,
        and the certificate's role mark."""
        peer = peer_of(context)
        return self.service.roster.identify(peer.common_names, peer.certificate)

    @contextmanager
    def admitted(self, context: grpc.ServicerContext, rpc: str) -> Iterator[Caller]:
        """The identified caller, holding its slots for `rpc` while inside (`foedus.director.capacity`)."""
        caller = self.identify(context)
        with self.capacity.admit(caller, rpc):
            yield caller

    # -- envoys -------------------------------------------------------------------------------

    @_unary
    def RegisterEnvoy(  # noqa: N802 - the name is the RPC's
        self,
        caller: Caller,
        request: director_pb2.RegisterEnvoyRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.RegisterEnvoyResponse:
        """An envoy registers its shard."""
        shard = _shard(request.shard, request.version)
        period = self.envoys.register(caller, shard, request.version)
        return director_pb2.RegisterEnvoyResponse(health_check_seconds=period)

    @_unary
    def EnvoyHeartbeat(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.EnvoyHeartbeatRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.EnvoyHeartbeatResponse:
        """An envoy is alive; answer its work."""
        reports = [_report(report) for report in request.collaborators]
        work = self.envoys.heartbeat(caller, reports)
        return work_to_proto(work, self.service.config.health_check_seconds)

    @_unary
    def ReportCollaborator(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.CollaboratorReport,
        context: grpc.ServicerContext,
    ) -> director_pb2.ReportCollaboratorResponse:
        """An envoy reports one collaborator's state."""
        self.envoys.report(caller, _report(request))
        return director_pb2.ReportCollaboratorResponse()

    @_receiving
    def UploadLog(  # noqa: N802
        self,
        caller: Caller,
        request: Iterator[director_pb2.LogUpload],
        context: grpc.ServicerContext,
    ) -> director_pb2.UploadLogResponse:
        """An envoy sends a log the director asked for."""
        first = _first(request, "request_id")
        checked_id("request_id", first.request_id)

        def pieces() -> Iterator[bytes]:
            yield first.data
            for message in request:
                yield message.data

        self.envoys.upload_log(caller, first.request_id, first.found, pieces())
        return director_pb2.UploadLogResponse()

    # -- people -------------------------------------------------------------------------------

    @_receiving
    def SubmitExperiment(  # noqa: N802
        self,
        caller: Caller,
        request: Iterator[director_pb2.SubmitChunk],
        context: grpc.ServicerContext,
    ) -> director_pb2.Experiment:
        """A person submits a plan and maybe an initial model."""
        first = _first(request, "plan_yaml")

        def pieces() -> Iterator[bytes]:
            yield first.initial_model_data
            for message in request:
                if message.plan_yaml or message.has_initial_model or message.name:
                    raise InvalidRequestError(
                        "plan_yaml, name, has_initial_model: only in the first message"
                    )
                yield message.initial_model_data

        checked_length("name", first.name, MAX_NAME)
        model = ModelUpload(first.initial_model_size, pieces()) if first.has_initial_model else None
        if model is None and (first.initial_model_size or first.initial_model_data):
            raise InvalidRequestError("initial_model_data: sent without has_initial_model")
        view = self.people.submit(caller, first.plan_yaml, first.name, model)
        return experiment_to_wire(view)

    @_unary
    def ListExperiments(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ListExperimentsRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.ListExperimentsResponse:
        """The caller's experiments."""
        views = self.people.experiments(caller)
        return director_pb2.ListExperimentsResponse(
            experiments=[experiment_to_wire(view) for view in views]
        )

    @_unary
    def GetExperiment(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ExperimentRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.Experiment:
        """One experiment."""
        return experiment_to_wire(self.people.experiment(caller, _id(request.experiment_id)))

    @_streaming
    def WatchExperiment(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ExperimentRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[director_pb2.Experiment]:
        """The experiment now and at every change, until it ends."""
        experiment_id = _id(request.experiment_id)
        last = None
        for view in self.people.watch(caller, experiment_id, self._follow(context)):
            message = experiment_to_wire(view)
            if message != last:  # a change the wire does not carry is not sent
                yield message
                last = message

    @_streaming
    def GetMetricStream(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.MetricStreamRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[director_pb2.MetricRow]:
        """Metric rows as written; with follow, until the experiment ends."""
        experiment_id = _id(request.experiment_id)
        from_row = checked_offset("from_row", request.from_row)
        follow = self._follow(context) if request.follow else None
        rows = self.people.follow_metric_rows(caller, experiment_id, from_row, follow)
        for index, row in rows:
            yield director_pb2.MetricRow(index=index, json=row)

    @_streaming
    def GetLogs(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.LogRequestFromUser,
        context: grpc.ServicerContext,
    ) -> Iterator[director_pb2.LogChunk]:
        """The aggregator's log, or a site's through its envoy; with follow, until the end."""
        experiment_id = _id(request.experiment_id)
        offset = checked_offset("offset", request.offset)
        if request.site and not NAME_PATTERN.match(request.site):
            raise InvalidRequestError(f"site: {shown(request.site)} is not a site's name")
        follow = self._follow(context) if request.follow else None
        chunks = self.people.follow_log(caller, experiment_id, request.site, offset, follow)
        for at, data in chunks:
            yield director_pb2.LogChunk(offset=at, data=data)

    @_streaming
    def DownloadModel(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.DownloadModelRequest,
        context: grpc.ServicerContext,
    ) -> Iterator[director_pb2.ModelFileChunk]:
        """The best or last model file, in chunks."""
        kind = _MODEL_KINDS.get(request.kind)
        if kind is None:
            raise InvalidRequestError("kind: MODEL_KIND_BEST or MODEL_KIND_LAST")
        model = self.people.model(caller, _id(request.experiment_id), kind)
        with closing(model.chunks):
            yield director_pb2.ModelFileChunk(total_size=model.size, data=next(model.chunks, b""))
            for data in model.chunks:
                yield director_pb2.ModelFileChunk(data=data)

    @_unary
    def CancelExperiment(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ExperimentRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.Experiment:
        """Stop an experiment."""
        return experiment_to_wire(self.people.cancel(caller, _id(request.experiment_id)))

    @_unary
    def RemoveExperiment(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ExperimentRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.RemoveExperimentResponse:
        """Forget an ended experiment and its files."""
        self.people.remove(caller, _id(request.experiment_id))
        return director_pb2.RemoveExperimentResponse()

    @_unary
    def ApproveExperiment(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ReviewRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.Experiment:
        """An admin lets a submitted experiment run."""
        return self._review(caller, request, approve=True)

    @_unary
    def RejectExperiment(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ReviewRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.Experiment:
        """An admin refuses a submitted experiment."""
        return self._review(caller, request, approve=False)

    @_unary
    def ListEnvoys(  # noqa: N802
        self,
        caller: Caller,
        request: director_pb2.ListEnvoysRequest,
        context: grpc.ServicerContext,
    ) -> director_pb2.ListEnvoysResponse:
        """The registered envoys."""
        return director_pb2.ListEnvoysResponse(
            health_check_seconds=self.service.config.health_check_seconds,
            envoys=[
                director_pb2.EnvoyInfo(
                    name=envoy.name,
                    shard=director_pb2.ShardInfo(
                        description=envoy.shard.description,
                        train_samples=envoy.shard.train_samples,
                        valid_samples=envoy.shard.valid_samples,
                        labels=dict(envoy.shard.labels),
                    ),
                    online=envoy.online,
                    registered_at=envoy.registered_at,
                    last_seen=envoy.last_seen,
                    version=envoy.version,
                    experiments=list(experiments),
                )
                for envoy, experiments in self.people.envoys(caller)
            ],
        )

    def _review(
        self, caller: Caller, request: director_pb2.ReviewRequest, *, approve: bool
    ) -> director_pb2.Experiment:
        """An admin's decision, either way."""
        experiment_id, reason = _id(request.experiment_id), _reason(request.reason)
        view = self.people.review(caller, experiment_id, approve=approve, reason=reason)
        return experiment_to_wire(view)

    def _follow(self, context: grpc.ServicerContext) -> Follow:
        """A followed stream's bounds (WatchExperiment, GetMetricStream and GetLogs with follow,
        the people's desk's generators): over when its call ends (cancelled, or past its
        deadline) or the server stops."""
        ended = threading.Event()

        def end() -> None:
            ended.set()
            self.service.state.changes.wake()

        if not context.add_callback(end):
            ended.set()  # the call has already ended
        return Follow(
            over=lambda: ended.is_set() or self.stopping.is_set(),
            time_left=context.time_remaining,
        )


def experiment_to_wire(view: ExperimentView) -> director_pb2.Experiment:
    """An experiment as the wire's message."""
    experiment = view.experiment
    return director_pb2.Experiment(
        experiment_id=experiment.experiment_id,
        name=experiment.name,
        owner=experiment.owner,
        state=_EXPERIMENT_TO_WIRE[experiment.state],
        reason=experiment.reason,
        submitted_at=experiment.submitted_at,
        started_at=experiment.started_at,
        ended_at=experiment.ended_at,
        sites=[
            director_pb2.SiteStatus(
                site=site.site,
                state=collaborator_state_to_proto(site.state),
                exit_code=site.exit_code,
                reason=site.reason,
                online=site.online,
                budget=_site_budget_to_wire(site),
            )
            for site in view.sites
        ],
        rounds=experiment.rounds,
        rounds_completed=view.rounds_completed,
        queue_position=view.queue_position,
        has_best_model=view.has_best_model,
        has_last_model=view.has_last_model,
        secure_aggregation=view.secure,
        differential_privacy=_privacy_to_wire(view.privacy),
    )


def _site_budget_to_wire(site: SiteView) -> director_pb2.SiteBudget | None:
    """A site's own DP-SGD budget as the wire's message; None: it reports none."""
    if site.budget is None:
        return None
    return director_pb2.SiteBudget(
        epsilon=site.budget.epsilon,
        delta=site.budget.delta,
        max_epsilon=site.budget.max_epsilon,
        round=site.budget_round,
    )


def _privacy_to_wire(budget: PrivacyBudget | None) -> director_pb2.DifferentialPrivacy | None:
    """A DP experiment's settings and spent epsilon as the wire's message; None: no DP."""
    if budget is None:
        return None
    settings = budget.settings
    return director_pb2.DifferentialPrivacy(
        clip=settings.clip,
        noise_multiplier=settings.noise_multiplier,
        delta=settings.delta,
        max_epsilon=settings.max_epsilon,
        epsilon=budget.epsilon,
    )


def _report(message: director_pb2.CollaboratorReport) -> CollaboratorReport:
    """An envoy's report as received, its state known, its id checked, its reason bounded."""
    report = report_from_proto(message)
    if report is None:
        raise InvalidRequestError(f"state: {message.state} is not a collaborator state")
    return dataclasses.replace(
        report, experiment_id=_id(report.experiment_id), reason=report.reason[:MAX_REPORT_REASON]
    )


def _first(messages: Iterator[M], field: str) -> M:
    """A client stream's first message, which must set `field`."""
    first = next(messages, None)
    if first is None or not getattr(first, field):
        raise InvalidRequestError(f"{field}: required in the first message")
    return first


def abort(context: grpc.ServicerContext, method: str, error: Exception) -> NoReturn:
    """End the call with the error's status and a message for the caller; log what a person needs."""
    answer(context, method, error, status_for(context, error), service="director", log=logger)


def _id(experiment_id: str) -> str:
    """The request's experiment id, checked for form before anything looks it up."""
    return checked_id("experiment_id", experiment_id)


def _reason(text: str) -> str:
    return checked_length("reason", text, MAX_REASON)


def _shard(shard: director_pb2.ShardInfo, version: str) -> ShardInfo:
    """A registration's shard, its free text bounded: it is kept and shown to every person."""
    checked_length("shard.description", shard.description, MAX_DESCRIPTION)
    checked_length("version", version, MAX_DESCRIPTION)
    if len(shard.labels) > MAX_LABELS:
        raise InvalidRequestError(f"shard.labels: {len(shard.labels)} labels; at most {MAX_LABELS}")
    for key, value in shard.labels.items():
        checked_length("shard.labels key", key, MAX_DESCRIPTION)
        checked_length(f"shard.labels.{shown(key)}", value, MAX_DESCRIPTION)
    return ShardInfo(
        description=shard.description,
        train_samples=shard.train_samples,
        valid_samples=shard.valid_samples,
        labels=dict(shard.labels),
    )
