"""AggregatorGRPCClient: the collaborator's calls to its aggregator, retried and resent.

The collaborator loop calls plain methods and gets plain Python and numpy back; protobuf and gRPC
status codes stay in this module, channels in `foedus.collaborator.connection`, the settings in
`foedus.collaborator.settings`. Every RPC goes through `_call`, the one place that decides what is
retried: only `foedus.retry.backoff.RETRYABLE` (UNAVAILABLE and DEADLINE_EXCEEDED), which say
nothing about the request itself, after a reconnect (new channel, TLS files read again) and a capped
exponential backoff with full jitter (`foedus.retry.backoff`). Every other status is a refusal a
retry cannot change and is raised at once as `RequestRejectedError`. A look at the server's
certificate that cannot complete counts as UNAVAILABLE; a server that is not our aggregator raises
`AggregatorIdentityError`, never retried.

Resending a task's results is safe because the aggregator answers OK to a duplicate (same round,
task and collaborator) and counts it once.

One client serves one collaborator loop; it is not meant to be shared between threads, since a
reconnect by one thread would close the channel under another's call. `heartbeat` is the
exception: it is sent from a thread of its own, on a channel of its own.

One module for every RPC of the collaborator (about 530 lines, secure aggregation's two among
them): each call's conversion sits beside the one `_call` that retries it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from random import random as uniform_random
from typing import Any, Self, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from foedus.collaborator.compressed import CodedPayload
from foedus.collaborator.connection import AggregatorConnection
from foedus.collaborator.decoding import Decoding, filling
from foedus.collaborator.errors import (
    AggregatorUnavailableError,
    ClientConfigurationError,
    RequestRejectedError,
    ResponseValidationError,
)
from foedus.collaborator.server_identity import ProbeFailedError
from foedus.collaborator.settings import ClientSettings
from foedus.collaborator.streaming import Filling, Stub
from foedus.plans import Plan
from foedus.privacy.clipping import Clip, ClippedValues
from foedus.protos import aggregator_pb2
from foedus.protos.aggregator_pb2_grpc import AggregatorStub
from foedus.protos.codec import (
    TensorFormatError,
    all_finite,
    coded_tensor_frame,
    decode_tensor,
    tensor_field_frame,
)
from foedus.protos.stream import UPLOAD_BYTES_METADATA, Part, framed_chunks
from foedus.retry.backoff import RETRYABLE, Backoff
from foedus.secure.wire import (
    MalformedMessage,
    Post,
    Relay,
    Stage,
    post_to_proto,
    relay_from_proto,
    relay_request_to_proto,
)

logger = logging.getLogger(__name__)

R = TypeVar("R")
# A collaborator on its way out tries to say so for this long at most, whatever the plan's
# retry budget: it must not hang on an aggregator that is gone.
LEAVE_SECONDS = 5.0


@dataclass(frozen=True)
class Tasks:
    """What the aggregator asks of this collaborator now: tasks of a round, a pause, or to quit."""

    round_number: int
    tasks: tuple[str, ...]
    sleep_seconds: int
    quit: bool


@dataclass(frozen=True, eq=False)  # arrays have no truth value, so no generated __eq__
class OutgoingTensor:
    """One tensor of a task's results: trained weights (tag "trained") or a scalar metric ("metric").

    The array is sent in its own dtype; OpenFL peers expect float32, metrics included
    (`np.float32(0.93)`, not the float64 a Python float becomes).
    """

    name: str
    array: npt.ArrayLike
    tags: tuple[str, ...] = ()
    report: bool = False  # OpenFL sets it on metrics meant for the aggregator's report
    # The tensor in the plan's compression.upload code, sent in place of `array` (which is kept
    # as trained); None: `array` travels raw.
    coded: CodedPayload | None = None
    # Differential privacy: `array` is sent clipped, scaled toward the global model's tensor a
    # slice at a time as the upload is framed (`array` itself unchanged); None: as it is.
    clip: Clip | None = None


@dataclass(frozen=True)
class HeldModel:
    """Tensors of a global model this collaborator received, and the digest the aggregator
    named that whole model by: a later download of those tensors may come as the change."""

    digest: str
    model: Mapping[str, npt.NDArray[np.generic]]
    whole: bool  # every tensor of the model (asked for none by name)

    def covers(self, names: Sequence[str]) -> bool:
        """Whether it holds every tensor `names` asks for (all of the model's when empty)."""
        return self.whole if not names else all(name in self.model for name in names)


class AggregatorGRPCClient(AggregatorConnection):
    """Calls one aggregator for one collaborator, over mutual TLS unless told `tls=False`."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = uniform_random,
    ) -> None:
        """`sleep` and `random` are the backoff's, so tests wait for nothing."""
        super().__init__(settings)
        self._sleep = sleep
        self._random = random
        # Whether the aggregator streams models (foedus's GetAggregatedModel); None: not yet known.
        self._streams_models: bool | None = None
        # The tensors last streamed under the `lossless` download code, with the digest the
        # aggregator named their model by: the next download may come as the XOR with them.
        self._held: HeldModel | None = None

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        collaborator_name: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = uniform_random,
        **overrides: Any,
    ) -> Self:
        """A client configured from the federation plan (`ClientSettings.from_plan`, `overrides` by name)."""
        settings = ClientSettings.from_plan(plan, collaborator_name, **overrides)
        return cls(settings, sleep=sleep, random=random)

    def ping(self) -> None:
        """Check that the aggregator is reachable and accepts this collaborator."""
        request = aggregator_pb2.PingRequest(header=self._header())
        response = self._call("Ping", lambda stub, timeout: stub.Ping(request, timeout=timeout))
        self.validate_response(response.header)

    def heartbeat(self) -> bool:
        """Tell the aggregator this collaborator is alive; False if it does not take heartbeats.

        Safe from another thread than the loop's: on a channel of its own (made as every channel,
        bound to the aggregator's name), one attempt, never retried (the next heartbeat comes
        soon); sent only while the loop's calls have found the server to be our aggregator
        (`_check_identity`) on the current connection. Any failure but UNIMPLEMENTED is logged
        and answered True, since the loop's own calls report a lost aggregator.
        """
        if self.settings.tls and not self._identity_checked:
            return True  # only to a server the loop's calls found to be our aggregator
        request = aggregator_pb2.HeartbeatRequest(header=self._header())
        try:
            channel = self._heartbeat_channel_now()
            response = AggregatorStub(channel).Heartbeat(request, timeout=self.settings.deadline)
            self.validate_response(response.header)
        except grpc.RpcError as error:
            code, details = _status_of(error)
            if code is grpc.StatusCode.UNIMPLEMENTED:
                return False
            logger.debug("heartbeat failed with %s (%s)", code.name, details)
            self._drop_heartbeat_channel()
        except (ClientConfigurationError, ResponseValidationError) as error:
            logger.warning("heartbeat failed: %s", error)
            self._drop_heartbeat_channel()
        return True

    def leave(self, reason: str) -> None:
        """Tell the aggregator this collaborator gives up, so no round waits for it.

        `reason` is for people (a fixed category, never data of the site). Retried on
        UNAVAILABLE like every call, but within `LEAVE_SECONDS` in all; raises the client's
        errors as the other calls do. Any later call rejoins the federation.
        """
        request = aggregator_pb2.LeaveRequest(header=self._header(), reason=reason)
        response = self._call(
            "Leave",
            lambda stub, timeout: stub.Leave(request, timeout=timeout),
            within=LEAVE_SECONDS,
        )
        self.validate_response(response.header)

    def get_tasks(self) -> Tasks:
        """Ask which tasks to run in the round in progress, or how long to wait, or whether to quit."""
        request = aggregator_pb2.GetTasksRequest(header=self._header())
        response = self._call(
            "GetTasks", lambda stub, timeout: stub.GetTasks(request, timeout=timeout)
        )
        self.validate_response(response.header)
        return Tasks(
            round_number=response.round_number,
            tasks=tuple(task.name for task in response.tasks),
            sleep_seconds=response.sleep_time,
            quit=response.quit,
        )

    def get_aggregated_tensor(
        self,
        name: str,
        round_number: int,
        *,
        report: bool = False,
        tags: Sequence[str] = ("model",),
        require_lossless: bool = True,
    ) -> npt.NDArray[np.generic]:
        """Fetch one tensor of the global model, exactly as the aggregator holds it (read-only)."""
        request = aggregator_pb2.GetAggregatedTensorRequest(
            header=self._header(),
            tensor_name=name,
            round_number=round_number,
            report=report,
            tags=list(tags),
            require_lossless=require_lossless,
        )
        response = self._call(
            "GetAggregatedTensor",
            lambda stub, timeout: stub.GetAggregatedTensor(request, timeout=timeout),
        )
        self.validate_response(response.header)
        if response.round_number != round_number:
            raise ResponseValidationError(
                f"asked the aggregator for {name!r} of round {round_number}, got round "
                f"{response.round_number}"
            )
        if response.tensor.name != name:
            raise ResponseValidationError(
                f"asked the aggregator for tensor {name!r}, got {response.tensor.name!r}"
            )
        try:
            array = decode_tensor(response.tensor, max_bytes=self.settings.max_message_bytes)
        except TensorFormatError as error:
            raise ResponseValidationError(f"the aggregator sent a bad tensor: {error}") from None
        self._check_finite(name, array)
        return array

    def _check_finite(self, name: str, array: npt.NDArray[np.generic]) -> None:
        """Refuse a global tensor holding NaN or infinities, unless the plan allows them."""
        if not self.settings.allow_non_finite and not all_finite(array):
            raise ResponseValidationError(
                f"the aggregator's global tensor {name!r} holds NaN or infinite values (the "
                f"plan's limits.allow_non_finite is false); nothing was trained on it"
            )

    def get_aggregated_model(
        self, names: Sequence[str], round_number: int
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Fetch tensors of the global model (all of them when `names` is empty), read-only.

        One streamed call (foedus's `GetAggregatedModel`), so no tensor is bound by the size of a
        message; from an aggregator without it (OpenFL's), one `GetAggregatedTensor` per name.
        """
        if self._streams_models is not False:
            try:
                model = self._streamed_model(names, round_number)
            except RequestRejectedError as error:
                if error.code is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                logger.info("the aggregator does not stream models; fetching tensor by tensor")
                self._streams_models = False
            else:
                self._streams_models = True
                return model
        if not names:
            raise ClientConfigurationError(
                "this aggregator (not foedus) serves tensors only by name: name the tensors"
            )
        return {name: self.get_aggregated_tensor(name, round_number) for name in names}

    def _streamed_model(
        self, names: Sequence[str], round_number: int
    ) -> dict[str, npt.NDArray[np.generic]]:
        held = self._held
        request = aggregator_pb2.GetAggregatedModelRequest(
            header=self._header(),
            round_number=round_number,
            tensor_names=list(names),
            foedus_held_model=held.digest if held is not None and held.covers(names) else "",
        )
        return self._call(
            "GetAggregatedModel",
            lambda stub, timeout: self._assemble_model(
                stub.get_model_chunks(request, timeout=timeout), names, round_number
            ),
        )

    def _assemble_model(
        self,
        chunks: Iterable[aggregator_pb2.ModelChunk | memoryview],
        names: Sequence[str],
        round_number: int,
    ) -> dict[str, npt.NDArray[np.generic]]:
        """The tensors a `GetAggregatedModel` stream carries, each checked before it is filled.

        A data chunk may come as a view of its data (`foedus.protos.stream.parse_model_chunk`); a
        tensor in the plan's download code is decoded as it arrives (`foedus.collaborator.decoding`).
        """
        model: dict[str, npt.NDArray[np.generic]] = {}
        wanted = set(names)
        current: Filling | Decoding | None = None
        index = -1
        digest = ""  # the whole model's, as the aggregator names it (`lossless` downloads)
        # What the request named (`_streamed_model`): a delta from anything else is refused.
        held = self._held.model if self._held is not None and self._held.covers(names) else None
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, memoryview):
                if current is None:
                    raise ResponseValidationError("the aggregator sent tensor data before a tensor")
                current.fill(chunk)
                continue
            if index == 0:
                self.validate_response(chunk.header)
                digest = chunk.foedus_model_digest
                continue
            if chunk.HasField("tensor"):
                if current is not None:
                    model[current.name] = self._finite(current)
                current = self._start_tensor(chunk, wanted, model, round_number, held)
            data = chunk.data  # read once: every read of a bytes field is a fresh copy
            if data:
                if current is None:
                    raise ResponseValidationError("the aggregator sent tensor data before a tensor")
                current.fill(data)
        if index < 0:
            raise ResponseValidationError("the aggregator's model stream ended before its header")
        if current is not None:
            model[current.name] = self._finite(current)
        missing = sorted(wanted - set(model))
        if missing:
            raise ResponseValidationError(
                f"the aggregator's model stream lacks {', '.join(map(repr, missing))}"
            )
        # Held for the next download, when the aggregator named the model.
        self._held = HeldModel(digest, dict(model), whole=not names) if digest else None
        return model

    def _finite(self, filled: Filling | Decoding) -> npt.NDArray[np.generic]:
        array = filled.done()
        self._check_finite(filled.name, array)
        return array

    def _start_tensor(
        self,
        chunk: aggregator_pb2.ModelChunk,
        wanted: set[str],
        model: Mapping[str, npt.NDArray[np.generic]],
        round_number: int,
        held: Mapping[str, npt.NDArray[np.generic]] | None,
    ) -> Filling | Decoding:
        meta = chunk.tensor
        name = meta.name
        if (wanted and name not in wanted) or name in model:
            raise ResponseValidationError(
                f"the aggregator sent tensor {name!r}, which was not asked for or came twice"
            )
        if meta.round_number != round_number:
            raise ResponseValidationError(
                f"asked the aggregator for {name!r} of round {round_number}, got round "
                f"{meta.round_number}"
            )
        return filling(meta, chunk.data_size, max_bytes=self.settings.max_tensor_bytes, held=held)

    def send_local_task_results(
        self, round_number: int, task_name: str, data_size: int, tensors: Sequence[OutgoingTensor]
    ) -> None:
        """Upload one task's results (a tensor with `coded` in its code); after a reconnect the
        very same bytes are sent again.

        Raises `foedus.protos.codec.TensorFormatError` (a ValueError) for an array whose dtype
        cannot be sent; nothing is sent then.
        """
        head = aggregator_pb2.TaskResults(
            header=self._header(),
            round_number=round_number,
            task_name=task_name,
            data_size=data_size,
        )
        # Every attempt streams these very bytes.
        parts = task_results_parts(head, tensors)
        # The aggregator refuses a stream that ends short of this (a cut the transport hid).
        declared_size = ((UPLOAD_BYTES_METADATA, str(sum(len(part) for part in parts))),)
        response = self._call(
            "SendLocalTaskResults",
            lambda stub, timeout: stub.send_framed_results(
                framed_chunks(parts), timeout=timeout, metadata=declared_size
            ),
            resend=self.settings.resend_data_on_reconnection,
        )
        self.validate_response(response.header)

    def post_secure_message(self, post: Post) -> None:
        """Post this site's part of a secure aggregation stage (`foedus.secure.wire.Post`).

        Retried as every call: the aggregator answers OK to the very same post again and
        changes nothing, so a resend after a reconnect is safe.
        """
        request = post_to_proto(post, self._header())
        response = self._call(
            "PostSecureMessage",
            lambda stub, timeout: stub.PostSecureMessage(request, timeout=timeout),
        )
        self.validate_response(response.header)

    def get_secure_relay(self, round_number: int, stage: Stage) -> Relay:
        """What the aggregator relays of `stage` of `round_number` (`ready` False: still open).

        A long poll: the aggregator holds the call until the stage closes or its
        `aggregator.long_poll_seconds` pass, within this call's deadline.
        """
        request = relay_request_to_proto(round_number, stage, self._header())
        response = self._call(
            "GetSecureRelay", lambda stub, timeout: stub.GetSecureRelay(request, timeout=timeout)
        )
        self.validate_response(response.header)
        try:
            relay = relay_from_proto(response)
        except MalformedMessage as error:
            raise ResponseValidationError(f"the aggregator sent a bad relay: {error}") from None
        if (relay.round_number, relay.stage) != (round_number, stage):
            raise ResponseValidationError(
                f"asked the aggregator for round {round_number}'s {stage.name} relay, got round "
                f"{relay.round_number}'s {relay.stage.name}"
            )
        return relay

    def validate_response(self, header: aggregator_pb2.MessageHeader) -> None:
        """Check that a response comes from our aggregator, for us, in our federation."""
        expected = (
            ("sender", header.sender, self.settings.aggregator_id),
            ("receiver", header.receiver, self.settings.collaborator_name),
            ("federation_uuid", header.federation_uuid, self.settings.federation_uuid),
        )
        for field, actual, wanted in expected:
            if actual != wanted:
                raise ResponseValidationError(
                    f"response header.{field} is {actual!r}, expected {wanted!r}: the answer is "
                    f"not from this federation's aggregator to {self.settings.collaborator_name!r}"
                )

    def _header(self) -> aggregator_pb2.MessageHeader:
        return aggregator_pb2.MessageHeader(
            sender=self.settings.collaborator_name,
            receiver=self.settings.aggregator_id,
            federation_uuid=self.settings.federation_uuid,
            single_col_cert_common_name="",
        )

    def _call(
        self,
        rpc: str,
        invoke: Callable[[Stub, float], R],
        *,
        resend: bool = True,
        within: float | None = None,
    ) -> R:
        """Run one RPC with the deadline; retry UNAVAILABLE and DEADLINE_EXCEEDED, raise the rest.

        `within`: seconds for every attempt and wait together, below the plan's budget.
        """
        started = time.monotonic()
        attempts = 0
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max, self._random)
        max_wait = self.settings.max_wait_time
        if within is not None:
            max_wait = within if max_wait is None else min(max_wait, within)
        while True:
            attempts += 1
            atomic = self.settings.enable_atomic_connections
            channel = self._open_channel() if atomic else self._kept_channel()
            deadline = self.settings.deadline
            if within is not None:
                deadline = max(0.1, min(deadline, within - (time.monotonic() - started)))
            try:
                self._check_identity(deadline)  # AggregatorIdentityError: never retried
                return invoke(Stub(channel), deadline)
            except ProbeFailedError as error:
                code, details = grpc.StatusCode.UNAVAILABLE, str(error)
            except grpc.RpcError as error:
                code, details = _status_of(error)
            finally:
                if atomic:
                    channel.close()
            if code not in RETRYABLE:
                raise RequestRejectedError(rpc, code, details)
            # Drop the failed channel now, so it does not keep reconnecting while we wait.
            self.disconnect()
            elapsed = time.monotonic() - started
            if not resend:
                raise AggregatorUnavailableError(
                    f"{rpc} to {self.target} failed with {code.name} ({details}) and is not sent "
                    f"again (resend_data_on_reconnection is off): the result may not have arrived",
                    attempts=attempts,
                    elapsed=elapsed,
                    code=code,
                    details=details,
                )
            delay = backoff.next_delay()
            limit = None
            if self.settings.max_retries is not None and attempts > self.settings.max_retries:
                limit = f"max_retries={self.settings.max_retries}"
            elif max_wait is not None and elapsed + delay > max_wait:
                limit = f"max_wait_time={max_wait:g} s"
            if limit is not None:
                raise AggregatorUnavailableError(
                    f"aggregator at {self.target} unavailable: {rpc} failed on {attempts} "
                    f"attempt{'' if attempts == 1 else 's'} in {elapsed:.1f} s ({limit}); last status {code.name}: {details}. Check that "
                    f"the aggregator runs and is reachable, and that each side trusts the "
                    f"other's certificate",
                    attempts=attempts,
                    elapsed=elapsed,
                    code=code,
                    details=details,
                )
            logger.warning(
                "%s to %s failed with %s (%s); retry %d of %s in %.2f s",
                rpc,
                self.target,
                code.name,
                details,
                attempts,
                "unbounded" if self.settings.max_retries is None else self.settings.max_retries,
                delay,
            )
            self._sleep(delay)
            self.connect()


_TENSORS_FIELD = aggregator_pb2.TaskResults.TENSORS_FIELD_NUMBER


def task_results_parts(
    head: aggregator_pb2.TaskResults, tensors: Sequence[OutgoingTensor]
) -> list[Part]:
    """A serialized `TaskResults`, written around the arrays' (or coded payloads') own buffers,
    no serialized copy of the update: `head`'s fields, then each tensor as field `tensors`, in
    `head`'s round (a clipped tensor's values made as they are sent)."""
    parts: list[Part] = [head.SerializeToString()]
    for tensor in tensors:
        parts += _tensor_parts(tensor, head.round_number)
    return parts


def _tensor_parts(tensor: OutgoingTensor, round_number: int) -> Sequence[Part]:
    """One tensor of a result as a field of the `TaskResults`: raw, clipped, or in its code."""
    coded = tensor.coded
    if coded is not None:
        return coded_tensor_frame(
            _TENSORS_FIELD,
            tensor.name,
            coded.payload,
            dtype=coded.dtype,
            shape=coded.shape,
            code=coded.code,
            delta=coded.delta,
            round_number=round_number,
            tags=tensor.tags,
            report=tensor.report,
        ).parts()
    frame = tensor_field_frame(
        _TENSORS_FIELD,
        tensor.name,
        tensor.array,
        round_number=round_number,
        tags=tensor.tags,
        report=tensor.report,
    )
    clip = tensor.clip
    if clip is None:
        return frame.parts()
    return frame.parts_made(ClippedValues(frame.data, clip.reference, clip.factor))


def _status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call (every RpcError raised by a call is a Call)."""
    if isinstance(error, grpc.Call):
        # A trailing period would double up at the end of our messages.
        return error.code(), (error.details() or "").rstrip(".")
    return grpc.StatusCode.UNKNOWN, str(error)
