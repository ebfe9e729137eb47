"""The `openfl.aggregator.Aggregator` service: authenticate, decode, delegate, encode.

Nothing here decides anything about the federation; `Federation` does. Every RPC runs under
`refusals_as_status`, so a refusal reaches the caller as its status code and message.

`GetTasks` is a long poll: a collaborator with nothing to do waits (up to `long_poll_seconds`, and
within its call's deadline) until the round closes, so it starts the next round within
milliseconds instead of after a fixed sleep. Each waiting call holds a server thread, so at most
`max_long_polls` wait at once; past that the answer comes at once with the usual short sleep.

Every RPC counts against its caller's `limits.max_calls_per_collaborator`
(`foedus.aggregator.admission`) from the moment the certificate names the caller, and an upload must
end within `limits.upload_seconds`. Nothing of a refused, cut-off or cancelled upload is stored: the
federation sees a result only once the whole stream has been read and checked.

`PostSecureMessage` and `GetSecureRelay` carry secure aggregation's stages
(`foedus.aggregator.secure_stages`), converted by `foedus.secure.wire`; a relay is a long poll
as `GetTasks` is, sharing its slots.

Uploads go to disk as they arrive (`foedus.aggregator.upload`), never whole into memory, so many
large uploads at once cost memory of the order of their chunks. They have no limit on the number of
chunks: OpenFL sends 2 MiB chunks, and many tiny ones cost the sender as much as us; their size is
bounded by `limits.max_upload_bytes`, their time by `limits.upload_seconds`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

import grpc

from foedus.aggregator.admission import Admission, chunks_within
from foedus.aggregator.encoded_model import EncodedModel
from foedus.aggregator.federation import Federation
from foedus.aggregator.identity import Gatekeeper, Header
from foedus.aggregator.metrics import Metrics
from foedus.aggregator.records import DELTA_TAG, Array, Assignment, TaskResult
from foedus.aggregator.status import RefusalObserver, refusals_as_status, stream_refusals_as_status
from foedus.aggregator.upload import receive_upload
from foedus.plans import Limits
from foedus.plans.schema import CompressionSettings
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc
from foedus.protos.results_reader import Head
from foedus.protos.stream import (
    CHUNK_BYTES,
    Chunk,
    chunk_payloads,
    declared_upload_bytes,
)
from foedus.refusals.errors import InvalidRequestError
from foedus.secure import wire
from foedus.serving.identity import peer_of

logger = logging.getLogger(__name__)

# A data chunk's key and length prefix take at most 11 bytes; the rest is margin.
CHUNK_FRAMING_BYTES = 64
# A long poll ends this long before the caller's deadline, so its answer still arrives in time.
DEADLINE_MARGIN_SECONDS = 0.5
T = TypeVar("T")


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServicer):
    """Serves one federation to its collaborators."""

    def __init__(
        self,
        federation: Federation,
        gatekeeper: Gatekeeper,
        limits: Limits,
        *,
        long_poll_seconds: float = 0.0,
        max_long_polls: int = 0,
        upload_folder: Path | None = None,
        metrics: Metrics | None = None,
        observers: Sequence[RefusalObserver] = (),
        compression: CompressionSettings | None = None,
    ) -> None:
        self.federation = federation
        # The plan's codes: the streamed model goes in `download`'s (`EncodedModel`); uploads may
        # come coded in `upload`'s (deltas, made raw as they are received: `aggregator.transcode`).
        self.compression = compression or CompressionSettings()
        # Counts accepted results and the bytes moved; told of refusals with the `observers`.
        self.metrics = metrics
        self.observers: tuple[RefusalObserver, ...] = (
            *observers,
            *(() if metrics is None else (metrics,)),
        )
        # Uploads are written here as they arrive: the store's folder, so that keeping one is
        # a rename; a store in memory keeps none, and the system's temporary folder serves.
        # The streamed model is spooled here too (in files without a name).
        self.upload_folder = upload_folder or Path(tempfile.gettempdir())
        self.gatekeeper = gatekeeper
        self.limits = limits
        self.admission = Admission(limits.max_calls_per_collaborator)
        self.long_poll_seconds = long_poll_seconds
        self._long_polls = threading.BoundedSemaphore(max(1, max_long_polls))
        self._long_polling = max_long_polls > 0 and long_poll_seconds > 0
        self._stopping = threading.Event()
        # A chunk's data and its few bytes of framing fit in one message of the plan's limit.
        self._encoded = EncodedModel(
            chunk_bytes=min(CHUNK_BYTES, limits.max_message_bytes - CHUNK_FRAMING_BYTES),
            folder=self.upload_folder,
            download=self.compression.download.code,
        )

    def stop_long_polls(self) -> None:
        """Answer waiting and future `GetTasks` calls at once (the server is stopping)."""
        self._stopping.set()
        self.federation.wake_waiters()

    @refusals_as_status
    def Ping(  # noqa: N802 - the name is the RPC's
        self, request: aggregator_pb2.PingRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.PingResponse:
        """Answer a collaborator that checks it can reach and authenticate to the aggregator."""
        with self._authenticated(context, request.header) as caller:
            return aggregator_pb2.PingResponse(header=self._reply_header(caller))

    @refusals_as_status
    def Heartbeat(  # noqa: N802
        self, request: aggregator_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.HeartbeatResponse:
        """Note that a collaborator busy with a task is alive: foedus's extension.

        The identity check marks it seen (`_authenticated`), as for every RPC; nothing else. It
        does not rejoin a collaborator that has left: one sent just before its `Leave` may
        arrive after it (a collaborator started again calls `GetTasks` first anyway).
        """
        with self._authenticated(context, request.header, rejoins=False) as caller:
            return aggregator_pb2.HeartbeatResponse(header=self._reply_header(caller))

    @refusals_as_status
    def Leave(  # noqa: N802
        self, request: aggregator_pb2.LeaveRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.LeaveResponse:
        """Note that a collaborator has given up, so no round waits for it: foedus's extension.

        Answered once its departure is durable; a resend is answered OK and changes nothing.
        """
        with self._authenticated(context, request.header, rejoins=False) as caller:
            if not self.federation.leave(caller, request.reason):
                logger.info("%s said again that it leaves; answered OK, nothing changed", caller)
            return aggregator_pb2.LeaveResponse(header=self._reply_header(caller))

    @refusals_as_status
    def GetTasks(  # noqa: N802
        self, request: aggregator_pb2.GetTasksRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetTasksResponse:
        """Tell a collaborator its tasks of the round in progress, to wait, or to quit."""
        with self._authenticated(context, request.header) as caller:
            assignment = self._assignment(caller, context)
        return aggregator_pb2.GetTasksResponse(
            header=self._reply_header(caller),
            round_number=assignment.round_number,
            tasks=[
                aggregator_pb2.Task(name=task, function_name=task, task_type=task)
                for task in assignment.tasks
            ],
            sleep_time=assignment.sleep_seconds,
            quit=assignment.quit,
        )

    @refusals_as_status
    def GetAggregatedTensor(  # noqa: N802
        self, request: aggregator_pb2.GetAggregatedTensorRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetAggregatedTensorResponse:
        """Send one tensor of the global model of the round in progress."""
        with self._authenticated(context, request.header) as caller:
            # OpenFL's use_delta_updates asks for a delta and would add a whole model to its own.
            if DELTA_TAG in request.tags:
                raise InvalidRequestError(
                    f"tensor {request.tensor_name!r}: foedus sends whole models, not deltas (in "
                    "the collaborator's plan set use_delta_updates: false, or db_store_rounds: 0 "
                    "so that it asks for the whole model each round)"
                )
            array = self.federation.global_tensor(request.tensor_name, request.round_number)
            response = aggregator_pb2.GetAggregatedTensorResponse(
                header=self._reply_header(caller), round_number=request.round_number
            )
            # CopyFrom, not `tensor=` in the constructor: the latter is about 3 times slower.
            response.tensor.CopyFrom(
                self._encoded.tensor(request.round_number, request.tensor_name, array)
            )
            if self.metrics is not None:
                self.metrics.downloaded(array.nbytes)
            return response

    @stream_refusals_as_status
    def GetAggregatedModel(  # type: ignore[override]  # noqa: N802 - bytes: see the docstring
        self, request: aggregator_pb2.GetAggregatedModelRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Stream tensors of the global model (all when none are named): foedus's extension.

        Answers with serialized `ModelChunk` messages (see
        `foedus.aggregator.server.method_handlers`): each tensor's chunks are encoded once per round
        and the same bytes go to every collaborator (`foedus.aggregator.encoded_model`), in the
        plan's `compression.download` code (`GetAggregatedTensor`, OpenFL's, stays raw). Under
        `lossless` the first chunk names the model's digest, and a site that holds the previous
        round's model whole gets the XOR with it (`EncodedModel.chunks`'s `held`).
        """
        with self._authenticated(context, request.header) as caller:
            round_number, names = request.round_number, list(request.tensor_names)
            tensors = self.federation.global_tensors(names, round_number)

            def whole() -> dict[str, Array]:
                """The whole model of that round, for its digest (a round closed meanwhile is
                refused); asked for by a round's first lossless request only."""
                return dict(self.federation.global_tensors([], round_number) if names else tensors)

            header = aggregator_pb2.ModelChunk(
                header=self._reply_header(caller),
                foedus_model_digest=self._encoded.model_digest(round_number, whole),
            )
            yield header.SerializeToString()
            held = request.foedus_held_model
            sent = 0  # counted once per stream, not per chunk (see aggregator.metrics)
            try:
                for name, array in tensors:
                    for chunk in self._encoded.chunks(round_number, name, array, held=held):
                        yield chunk
                        sent += len(chunk)
            finally:
                if self.metrics is not None:
                    self.metrics.downloaded(sent)

    @refusals_as_status
    def SendLocalTaskResults(  # noqa: N802
        self, request_iterator: Iterator[Chunk], context: grpc.ServicerContext
    ) -> aggregator_pb2.SendLocalTaskResultsResponse:
        """Receive a streamed `TaskResults` to disk as it arrives, check it, hand it to the federation."""
        # Who is calling is known from the certificate before a byte of the stream is read, so
        # the call counts against its limit from the start; an insecure server only learns the
        # caller from the header, and counts it from then on.
        peer = self._identify(context)
        limit = self.limits.max_upload_bytes
        declared = declared_upload_bytes(context.invocation_metadata(), max_bytes=limit)
        upload = chunks_within(request_iterator, self.limits.upload_seconds)
        payloads = _Counted(chunk_payloads(upload, max_bytes=limit))
        metrics = self.metrics
        with ExitStack() as held, closing(upload):  # closed: its reader stops if we stop early
            if metrics is not None:  # what was read, whatever becomes of it
                held.callback(lambda: metrics.uploaded(payloads.size))
            held.enter_context(self._slot(peer))
            callers: list[str] = []

            def on_head(head: Head) -> None:
                """Refuse a stranger, or a result for a closed round, before its tensors arrive."""
                caller = self.gatekeeper.check_header(peer, _header(head.header))
                held.enter_context(self._slot(caller if peer is None else None))
                held.enter_context(self.federation.liveness.calling(caller))
                self.federation.rejoin(caller)
                self.federation.check_arriving(caller, head.round_number, head.task_name)
                callers.append(caller)

            received = receive_upload(
                payloads,
                self.upload_folder,
                on_head=on_head,
                model_dtype=self.federation.model_dtype,
                max_tensor_bytes=self.limits.max_tensor_bytes,
                expected_bytes=declared,
                base=self._round_base,
                upload_code=self.compression.upload,
                raw_base=self._raw_base,
            )
            try:
                head = received.head
                result = TaskResult(
                    collaborator=callers[0],
                    round_number=head.round_number,
                    task_name=head.task_name,
                    data_size=head.data_size,
                    tensors=received.tensors,
                    upload=received.file,
                )
                return self._submit(callers[0], result)
            finally:
                # Moved into the store if accepted; refused, or a resend: not kept.
                received.file.path.unlink(missing_ok=True)

    def _round_base(self, name: str) -> Array | None:
        """What a coded upload's tensor `name` is a delta from: the global model's tensor of the
        round in progress as the sites received it (decoded, under a lossy download code:
        `EncodedModel.base`); None: not in the model. An upload for another round is refused, or
        a resend answered OK, whatever its values."""
        round_number = self.federation.round_number
        array = self.federation.model().get(name)
        return None if array is None else self._encoded.base(round_number, name, array)

    def _raw_base(self, name: str) -> Array | None:
        """What an OpenFL collaborator's delta (`use_delta_updates`) of tensor `name` is from: the
        global model's tensor of the round in progress, raw, as `GetAggregatedTensor` sends it."""
        return self.federation.model().get(name)

    def _submit(
        self, caller: str, result: TaskResult
    ) -> aggregator_pb2.SendLocalTaskResultsResponse:
        """Hand a decoded upload to the federation."""
        if not self.federation.submit(result):
            logger.info(
                "%s resent %s of round %d; answered OK, counted once",
                caller,
                result.task_name,
                result.round_number,
            )
        elif self.metrics is not None:
            self.metrics.result_accepted()
        return aggregator_pb2.SendLocalTaskResultsResponse(header=self._reply_header(caller))

    @refusals_as_status
    def PostSecureMessage(  # noqa: N802
        self, request: aggregator_pb2.SecureMessage, context: grpc.ServicerContext
    ) -> aggregator_pb2.SecureReceipt:
        """Take a site's post to a secure stage: answered once it is durable; a resend OK."""
        with self._authenticated(context, request.header) as caller:
            try:
                post = wire.post_from_proto(request)
            except wire.MalformedMessage as error:
                raise InvalidRequestError(str(error)) from None
            if not self.federation.post_secure(caller, post, wire.post_bytes(post)):
                logger.info(
                    "%s resent its %s post of round %d; answered OK, nothing changed",
                    caller,
                    post.stage.name,
                    post.round_number,
                )
            return aggregator_pb2.SecureReceipt(header=self._reply_header(caller))

    @refusals_as_status
    def GetSecureRelay(  # noqa: N802
        self, request: aggregator_pb2.SecureRelayRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.SecureRelay:
        """Relay what a closed secure stage relays to the caller, waiting for it to close."""
        with self._authenticated(context, request.header) as caller:
            try:
                round_number, stage = wire.relay_request_from_proto(request)
            except wire.MalformedMessage as error:
                raise InvalidRequestError(str(error)) from None
            relay = self._waited(
                context,
                lambda wait: self.federation.secure_relay(
                    caller, round_number, stage, wait, cancel=self._stopping
                ),
            )
            return wire.relay_to_proto(relay, self._reply_header(caller))

    def InteropRelay(  # noqa: N802
        self, request: aggregator_pb2.InteropMessage, context: grpc.ServicerContext
    ) -> aggregator_pb2.InteropMessage:
        """OpenFL's Flower relay; foedus does not relay, and says so instead of UNKNOWN."""
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "InteropRelay is not supported by foedus")

    def _assignment(self, caller: str, context: grpc.ServicerContext) -> Assignment:
        """Wait for work if allowed (a free long-poll slot, time before the deadline); else answer now."""
        return self._waited(
            context,
            lambda wait: (
                self.federation.wait_for_assignment(caller, wait, cancel=self._stopping)
                if wait > 0
                else self.federation.assignment(caller)
            ),
        )

    def _waited(self, context: grpc.ServicerContext, answer: Callable[[float], T]) -> T:
        """`answer(seconds)` of a long poll: waiting if allowed (a free long-poll slot, time
        before the deadline), else `answer(0)`, now."""
        wait = self.long_poll_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, remaining - DEADLINE_MARGIN_SECONDS)
        if (
            not self._long_polling
            or self._stopping.is_set()
            or wait <= 0
            or not self._long_polls.acquire(blocking=False)
        ):
            return answer(0)
        try:
            return answer(wait)
        finally:
            self._long_polls.release()

    @contextmanager
    def _authenticated(
        self,
        context: grpc.ServicerContext,
        header: aggregator_pb2.MessageHeader,
        *,
        rejoins: bool = True,
    ) -> Iterator[str]:
        """The caller a request speaks for, holding one of its call slots while inside.

        Inside, the caller counts as alive (`foedus.aggregator.liveness`): a call in progress. A
        caller that had left has rejoined (every RPC but `Leave` and `Heartbeat`: `rejoins`).
        """
        peer = self._identify(context)
        with self._slot(peer):
            caller = self.gatekeeper.check_header(peer, _header(header))
            with (
                self._slot(caller if peer is None else None),
                self.federation.liveness.calling(caller),
            ):
                if rejoins:
                    self.federation.rejoin(caller)
                yield caller

    def _identify(self, context: grpc.ServicerContext) -> str | None:
        """The authorised collaborator behind the TLS peer, by its certificate (`Gatekeeper`)."""
        peer = peer_of(context)
        return self.gatekeeper.identify(peer.common_names, peer.certificate)

    def _slot(self, name: str | None) -> AbstractContextManager[None]:
        """One of `name`'s call slots (see `Admission`); nothing to hold for None."""
        return nullcontext() if name is None else self.admission.admit(name)

    def _reply_header(self, caller: str) -> aggregator_pb2.MessageHeader:
        return aggregator_pb2.MessageHeader(
            sender=self.gatekeeper.aggregator_id,
            receiver=caller,
            federation_uuid=self.gatekeeper.federation_uuid,
        )


class _Counted:
    """An upload's payloads, passed through as they are, their bytes added up on the way."""

    def __init__(self, payloads: Iterator[bytes | memoryview]) -> None:
        self._payloads = payloads
        self.size = 0

    def __iter__(self) -> Iterator[bytes | memoryview]:
        for payload in self._payloads:
            self.size += len(payload)
            yield payload


def _header(header: aggregator_pb2.MessageHeader) -> Header:
    return Header(
        sender=header.sender, receiver=header.receiver, federation_uuid=header.federation_uuid
    )
