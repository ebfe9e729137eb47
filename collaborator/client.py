"""AggregatorGRPCClient: the collaborator's side of the wire, with channels, retries and resend.

The collaborator loop calls plain methods and gets plain Python and numpy back; protobuf, gRPC
status codes and channels stay in this module. Every RPC goes through `_call`, the one place that
decides what is retried: only UNAVAILABLE and DEADLINE_EXCEEDED, which say nothing about the
request itself, after a reconnect (new channel, TLS files read again) and a capped exponential
backoff with full jitter. Every other status is a refusal a retry cannot change and is raised at
once as `RequestRejectedError`. Before a connection's first call the server's certificate is
looked at (`collaborator.server_identity`): a look that cannot complete counts as UNAVAILABLE; a
server that is not our aggregator raises `AggregatorIdentityError`, never retried.

Resending a task's results is safe because the aggregator answers OK to a duplicate (same round,
task and collaborator) and counts it once.

One client serves one collaborator loop; it is not meant to be shared between threads, since a
reconnect by one thread would close the channel under another's call. `heartbeat` is the
exception: it is sent from a thread of its own, on a channel of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import random as uniform_random
from types import TracebackType
from typing import Final, Self, TypedDict, TypeVar, Unpack

import grpc
import numpy as np
import numpy.typing as npt

from collaborator.errors import (
    AggregatorUnavailableError,
    ClientConfigurationError,
    RequestRejectedError,
    ResponseValidationError,
)
from collaborator.server_identity import (
    ClientFiles,
    ExpectedAggregator,
    ProbeFailedError,
    check_aggregator,
)
from pki.errors import PkiError
from pki.requests import normalise_fingerprint
from pki.tls import channel_credentials
from plans import Plan
from protos import aggregator_pb2
from protos.aggregator_pb2_grpc import AggregatorStub
from protos.channel import client_options
from protos.codec import (
    TensorFormatError,
    all_finite,
    decode_tensor,
    empty_tensor,
    tensor_bytes,
    tensor_field_frame,
)
from protos.stream import UPLOAD_BYTES_METADATA, framed_chunks, parse_model_chunk

logger = logging.getLogger(__name__)

R = TypeVar("R")
MIB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 128 * MIB
DEFAULT_MAX_TENSOR_BYTES = 1024 * MIB
MAX_PORT = 65535
# Only these say nothing about the request: the aggregator was not reached or did not answer in time.
RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# A collaborator on its way out tries to say so for this long at most, whatever the plan's
# retry budget: it must not hang on an aggregator that is gone.
LEAVE_SECONDS = 5.0
# 2**64 times any sane initial backoff is far past any cap; the bound keeps the float finite.
_MAX_BACKOFF_EXPONENT = 64


@dataclass(frozen=True)
class Tasks:
    """What the aggregator asks of this collaborator now: tasks of a round, a pause, or to quit."""

    round_number: int
    tasks: tuple[str, ...]
    sleep_seconds: int
    quit: bool


@dataclass(frozen=True, eq=False)  # arrays have no truth value, so no generated __eq__
class NamedArray:
    """One tensor of a task's results: trained weights (tag "trained") or a scalar metric ("metric").

    The array is sent in its own dtype; OpenFL peers expect float32, metrics included
    (`np.float32(0.93)`, not the float64 a Python float becomes).
    """

    name: str
    array: npt.ArrayLike
    tags: tuple[str, ...] = ()
    report: bool = False  # OpenFL sets it on metrics meant for the aggregator's report


class ClientOverrides(TypedDict, total=False):
    """The constructor's arguments but the name, so `from_plan` callers can override any by name."""

    aggregator_address: str
    aggregator_port: int
    aggregator_id: str
    federation_uuid: str
    aggregator_common_name: str | None
    aggregator_fingerprint: str | None
    tls: bool
    root_certificate: Path | None
    certificate: Path | None
    private_key: Path | None
    enable_atomic_connections: bool
    resend_data_on_reconnection: bool
    max_retries: int | None
    max_wait_time: float | None
    deadline: float
    backoff_initial: float
    backoff_max: float
    max_message_bytes: int
    max_tensor_bytes: int
    allow_non_finite: bool
    sleep: Callable[[float], None]
    random: Callable[[], float]


class AggregatorGRPCClient:
    """Calls one aggregator for one collaborator, over mutual TLS unless told `tls=False`."""

    def __init__(
        self,
        aggregator_address: str,
        aggregator_port: int,
        *,
        aggregator_id: str,
        federation_uuid: str,
        collaborator_name: str,
        aggregator_common_name: str | None = None,
        aggregator_fingerprint: str | None = None,
        tls: bool = True,
        root_certificate: Path | None = None,
        certificate: Path | None = None,
        private_key: Path | None = None,
        enable_atomic_connections: bool = False,
        resend_data_on_reconnection: bool = True,
        max_retries: int | None = 10,
        max_wait_time: float | None = 300.0,
        deadline: float = 60.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
        allow_non_finite: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = uniform_random,
    ) -> None:
        problems = _configuration_problems(
            aggregator_address=aggregator_address,
            aggregator_port=aggregator_port,
            aggregator_id=aggregator_id,
            federation_uuid=federation_uuid,
            collaborator_name=collaborator_name,
            tls=tls,
            files={
                "root_certificate": root_certificate,
                "certificate": certificate,
                "private_key": private_key,
            },
            max_retries=max_retries,
            max_wait_time=max_wait_time,
            deadline=deadline,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            max_message_bytes=max_message_bytes,
            max_tensor_bytes=max_tensor_bytes,
        )
        pin = None
        if aggregator_fingerprint is not None:
            try:
                pin = normalise_fingerprint(aggregator_fingerprint)
            except PkiError as error:
                problems.append(f"aggregator_fingerprint: {error}")
        if problems:
            raise ClientConfigurationError(
                f"cannot configure the client for {collaborator_name!r}: {'; '.join(problems)}"
            )
        self.aggregator_address = aggregator_address
        self.aggregator_port = aggregator_port
        self.aggregator_id = aggregator_id
        self.federation_uuid = federation_uuid
        self.collaborator_name = collaborator_name
        # Who the aggregator must be (collaborator.server_identity); by default the host dialled.
        self.expected = ExpectedAggregator(aggregator_common_name or aggregator_address, pin)
        self.tls = tls
        self.root_certificate = root_certificate
        self.certificate = certificate
        self.private_key = private_key
        self.enable_atomic_connections = enable_atomic_connections
        self.resend_data_on_reconnection = resend_data_on_reconnection
        self.max_retries = max_retries
        self.max_wait_time = max_wait_time
        self.deadline = deadline
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_message_bytes = max_message_bytes
        self.max_tensor_bytes = max_tensor_bytes
        # NaN/Inf in the global model are refused unless the plan allows them, as in uploads.
        self.allow_non_finite = allow_non_finite
        self._sleep = sleep
        self._random = random
        self._channel: grpc.Channel | None = None
        # Whether the aggregator streams models (foedus's GetAggregatedModel); None: not yet known.
        self._streams_models: bool | None = None
        # Whether the server's certificate was seen since the last connection failure.
        self._identity_checked = False
        # Heartbeats come from another thread (`collaborator.heartbeat`), on a channel of their own.
        self._heartbeat_lock = threading.Lock()
        self._heartbeat_channel: grpc.Channel | None = None

    @classmethod
    def from_plan(
        cls, plan: Plan, collaborator_name: str, **overrides: Unpack[ClientOverrides]
    ) -> Self:
        """A client configured from the federation plan; `overrides` replace single settings (tests, CLI)."""
        certs = plan.tls.certs
        try:
            cert = None if certs is None else certs.collaborator_cert(collaborator_name)
            key = None if certs is None else certs.collaborator_key(collaborator_name)
        except PkiError as error:
            raise ClientConfigurationError(
                f"{plan.path}: collaborator {collaborator_name!r}: {error}"
            ) from None
        connection = plan.connection
        settings: ClientOverrides = {
            "aggregator_address": plan.aggregator.host,
            "aggregator_port": plan.aggregator.port,
            "aggregator_id": plan.federation.aggregator_id,
            "federation_uuid": plan.federation.uuid,
            "aggregator_common_name": plan.aggregator.common_name,
            "aggregator_fingerprint": plan.aggregator.fingerprint,
            "tls": certs is not None,
            "root_certificate": None if certs is None else certs.ca_bundle,
            "certificate": cert,
            "private_key": key,
            "enable_atomic_connections": connection.atomic_connections,
            "resend_data_on_reconnection": connection.resend_on_reconnect,
            "max_retries": connection.max_retries,
            "max_wait_time": connection.max_wait_seconds,
            "deadline": connection.deadline_seconds,
            "backoff_initial": connection.backoff_initial_seconds,
            "backoff_max": connection.backoff_max_seconds,
            "max_message_bytes": plan.limits.max_message_bytes,
            "max_tensor_bytes": plan.limits.max_tensor_bytes,
            "allow_non_finite": plan.limits.allow_non_finite,
        }
        settings.update(overrides)
        # `settings` holds every argument from the plan, so the required ones are all there.
        return cls(collaborator_name=collaborator_name, **settings)

    @property
    def target(self) -> str:
        """The `host:port` gRPC dials, an IPv6 literal in brackets."""
        host = self.aggregator_address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.aggregator_port}"

    @property
    def connected(self) -> bool:
        """Whether a channel is held open between calls (never, with atomic connections)."""
        return self._channel is not None

    def connect(self) -> None:
        """Open the channel now (or, with atomic connections, check the TLS files now) to fail early."""
        if self.enable_atomic_connections:
            self._credentials()
        else:
            self._kept_channel()

    def disconnect(self) -> None:
        """Close the channels; the next call opens a new one, after checking who is there again."""
        self._identity_checked = False
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._drop_heartbeat_channel()

    def reconnect(self) -> None:
        """Replace the channel with a new one, reading the TLS files again (rotated certificates)."""
        self.disconnect()
        self.connect()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.disconnect()

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
        if self.tls and not self._identity_checked:
            return True  # only to a server the loop's calls found to be our aggregator
        request = aggregator_pb2.HeartbeatRequest(header=self._header())
        try:
            with self._heartbeat_lock:
                if self._heartbeat_channel is None:
                    self._heartbeat_channel = self._open_channel()
                channel = self._heartbeat_channel
            response = AggregatorStub(channel).Heartbeat(request, timeout=self.deadline)
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

    def _drop_heartbeat_channel(self) -> None:
        with self._heartbeat_lock:
            channel, self._heartbeat_channel = self._heartbeat_channel, None
        if channel is not None:
            channel.close()

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
            array = decode_tensor(response.tensor, max_bytes=self.max_message_bytes)
        except TensorFormatError as error:
            raise ResponseValidationError(f"the aggregator sent a bad tensor: {error}") from None
        self._check_finite(name, array)
        return array

    def _check_finite(self, name: str, array: npt.NDArray[np.generic]) -> None:
        """Refuse a global tensor holding NaN or infinities, unless the plan allows them."""
        if not self.allow_non_finite and not all_finite(array):
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
        request = aggregator_pb2.GetAggregatedModelRequest(
            header=self._header(), round_number=round_number, tensor_names=list(names)
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

        A data chunk may come as a view of its data (`protos.stream.parse_model_chunk`).
        """
        model: dict[str, npt.NDArray[np.generic]] = {}
        wanted = set(names)
        current: _Filling | None = None
        index = -1
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, memoryview):
                if current is None:
                    raise ResponseValidationError("the aggregator sent tensor data before a tensor")
                current.fill(chunk)
                continue
            if index == 0:
                self.validate_response(chunk.header)
                continue
            if chunk.HasField("tensor"):
                if current is not None:
                    model[current.name] = self._finite(current)
                current = self._start_tensor(chunk, wanted, model, round_number)
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
        return model

    def _finite(self, filled: _Filling) -> npt.NDArray[np.generic]:
        array = filled.done()
        self._check_finite(filled.name, array)
        return array

    def _start_tensor(
        self,
        chunk: aggregator_pb2.ModelChunk,
        wanted: set[str],
        model: Mapping[str, npt.NDArray[np.generic]],
        round_number: int,
    ) -> _Filling:
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
        try:
            array = empty_tensor(meta, chunk.data_size, max_bytes=self.max_tensor_bytes)
        except TensorFormatError as error:
            raise ResponseValidationError(f"the aggregator sent a bad tensor: {error}") from None
        return _Filling(name, array)

    def send_local_task_results(
        self, round_number: int, task_name: str, data_size: int, tensors: Sequence[NamedArray]
    ) -> None:
        """Upload one task's results; after a reconnect the very same bytes are sent again.

        Raises `protos.codec.TensorFormatError` (a ValueError) for an array whose dtype cannot be
        sent; nothing is sent then.
        """
        head = aggregator_pb2.TaskResults(
            header=self._header(),
            round_number=round_number,
            task_name=task_name,
            data_size=data_size,
        )
        # The serialized TaskResults, written around the arrays' own buffers (no serialized
        # copy of the update): the head's fields, then each tensor as field `tensors`. Every
        # attempt streams these very bytes.
        parts: list[bytes | memoryview] = [head.SerializeToString()]
        for tensor in tensors:
            parts += tensor_field_frame(
                _TENSORS_FIELD,
                tensor.name,
                tensor.array,
                round_number=round_number,
                tags=tensor.tags,
                report=tensor.report,
            ).parts()
        # The aggregator refuses a stream that ends short of this (a cut the transport hid).
        declared_size = ((UPLOAD_BYTES_METADATA, str(sum(len(part) for part in parts))),)
        response = self._call(
            "SendLocalTaskResults",
            lambda stub, timeout: stub.send_framed_results(
                framed_chunks(parts), timeout=timeout, metadata=declared_size
            ),
            resend=self.resend_data_on_reconnection,
        )
        self.validate_response(response.header)

    def validate_response(self, header: aggregator_pb2.MessageHeader) -> None:
        """Check that a response comes from our aggregator, for us, in our federation."""
        expected = (
            ("sender", header.sender, self.aggregator_id),
            ("receiver", header.receiver, self.collaborator_name),
            ("federation_uuid", header.federation_uuid, self.federation_uuid),
        )
        for field, actual, wanted in expected:
            if actual != wanted:
                raise ResponseValidationError(
                    f"response header.{field} is {actual!r}, expected {wanted!r}: the answer is "
                    f"not from this federation's aggregator to {self.collaborator_name!r}"
                )

    def _header(self) -> aggregator_pb2.MessageHeader:
        return aggregator_pb2.MessageHeader(
            sender=self.collaborator_name,
            receiver=self.aggregator_id,
            federation_uuid=self.federation_uuid,
            single_col_cert_common_name="",
        )

    def _credentials(self) -> grpc.ChannelCredentials:
        """The TLS credentials, read from the files now, so a rotated certificate is picked up."""
        if self.root_certificate is None:
            raise ClientConfigurationError("TLS needs root_certificate (the CA bundle)")
        try:
            return channel_credentials(self.root_certificate, self.certificate, self.private_key)
        except PkiError as error:
            raise ClientConfigurationError(
                f"cannot load the TLS files of {self.collaborator_name!r}: {error}"
            ) from None

    def _open_channel(self) -> grpc.Channel:
        """A new channel to the aggregator; the one place channels are made.

        gRPC checks the server's certificate against the name bound to the expected common name
        (`collaborator.server_identity`), in the handshake of the session that carries the RPCs.
        """
        options = client_options(self.max_message_bytes)
        if not self.tls:
            return grpc.insecure_channel(self.target, options=options)
        options.append(("grpc.ssl_target_name_override", self.expected.server_name))
        return grpc.secure_channel(self.target, self._credentials(), options=options)

    def _check_identity(self, timeout: float | None = None) -> None:
        """Look at the server's certificate on a handshake of our own, once per connection.

        Raises `AggregatorIdentityError` for a server that is not our aggregator and
        `ProbeFailedError` when no handshake completed.
        """
        if not self.tls or self._identity_checked:
            return
        if self.root_certificate is None:
            raise ClientConfigurationError("TLS needs root_certificate (the CA bundle)")
        files = ClientFiles(self.root_certificate, self.certificate, self.private_key)
        check_aggregator(
            self.aggregator_address,
            self.aggregator_port,
            self.expected,
            files,
            timeout=self.deadline if timeout is None else timeout,
        )
        self._identity_checked = True

    def _kept_channel(self) -> grpc.Channel:
        """The channel kept between calls, opened if there is none."""
        if self._channel is None:
            self._channel = self._open_channel()
        return self._channel

    def _call(
        self,
        rpc: str,
        invoke: Callable[[_Stub, float], R],
        *,
        resend: bool = True,
        within: float | None = None,
    ) -> R:
        """Run one RPC with the deadline; retry UNAVAILABLE and DEADLINE_EXCEEDED, raise the rest.

        `within`: seconds for every attempt and wait together, below the plan's budget.
        """
        started = time.monotonic()
        attempts = 0
        max_wait = self.max_wait_time
        if within is not None:
            max_wait = within if max_wait is None else min(max_wait, within)
        while True:
            attempts += 1
            atomic = self.enable_atomic_connections
            channel = self._open_channel() if atomic else self._kept_channel()
            deadline = self.deadline
            if within is not None:
                deadline = max(0.1, min(deadline, within - (time.monotonic() - started)))
            try:
                self._check_identity(deadline)  # AggregatorIdentityError: never retried
                return invoke(_Stub(channel), deadline)
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
            exponent = min(attempts - 1, _MAX_BACKOFF_EXPONENT)
            delay = min(self.backoff_max, self.backoff_initial * 2**exponent) * self._random()
            limit = None
            if self.max_retries is not None and attempts > self.max_retries:
                limit = f"max_retries={self.max_retries}"
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
                "unbounded" if self.max_retries is None else self.max_retries,
                delay,
            )
            self._sleep(delay)
            self.connect()


class _Filling:
    """A streamed tensor being filled with its data as the chunks arrive."""

    def __init__(self, name: str, array: npt.NDArray[np.generic]) -> None:
        self.name = name
        self.array = array
        self._bytes = tensor_bytes(array)
        self._filled = 0

    def fill(self, data: bytes | memoryview) -> None:
        end = self._filled + len(data)
        if end > len(self._bytes):
            raise ResponseValidationError(
                f"the aggregator sent more data for {self.name!r} than its {len(self._bytes)} bytes"
            )
        self._bytes[self._filled : end] = data
        self._filled = end

    def done(self) -> npt.NDArray[np.generic]:
        if self._filled != len(self._bytes):
            raise ResponseValidationError(
                f"the aggregator sent {self._filled} of the {len(self._bytes)} bytes of "
                f"{self.name!r}"
            )
        self.array.flags.writeable = False  # as the unary path's arrays over their bytes
        return self.array


_TENSORS_FIELD = aggregator_pb2.TaskResults.TENSORS_FIELD_NUMBER
_SEND_RESULTS = "/openfl.aggregator.Aggregator/SendLocalTaskResults"
_GET_MODEL = "/openfl.aggregator.Aggregator/GetAggregatedModel"


class _Stub(AggregatorStub):
    """The generated stub, plus two methods that spare copies of large payloads.

    `send_framed_results` sends `SendLocalTaskResults` chunks already serialized
    (`framed_chunks` frames the upload once, around slices of the arrays);
    `get_model_chunks` reads `GetAggregatedModel`'s data chunks in place
    (`parse_model_chunk`), where protobuf would copy each twice.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)  # type: ignore[call-arg]  # the stubs type __new__ only
        self.send_framed_results = channel.stream_unary(
            _SEND_RESULTS,
            request_serializer=_already_serialized,
            response_deserializer=aggregator_pb2.SendLocalTaskResultsResponse.FromString,
        )
        self.get_model_chunks = channel.unary_stream(
            _GET_MODEL,
            request_serializer=aggregator_pb2.GetAggregatedModelRequest.SerializeToString,
            response_deserializer=parse_model_chunk,
        )


def _already_serialized(message: bytes) -> bytes:
    return message


def _status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call (every RpcError raised by a call is a Call)."""
    if isinstance(error, grpc.Call):
        # A trailing period would double up at the end of our messages.
        return error.code(), (error.details() or "").rstrip(".")
    return grpc.StatusCode.UNKNOWN, str(error)


def _configuration_problems(
    *,
    aggregator_address: str,
    aggregator_port: int,
    aggregator_id: str,
    federation_uuid: str,
    collaborator_name: str,
    tls: bool,
    files: dict[str, Path | None],
    max_retries: int | None,
    max_wait_time: float | None,
    deadline: float,
    backoff_initial: float,
    backoff_max: float,
    max_message_bytes: int,
    max_tensor_bytes: int,
) -> list[str]:
    """Every problem with the constructor's arguments, each naming its argument."""
    problems: list[str] = []
    for label, text in (
        ("aggregator_address", aggregator_address),
        ("aggregator_id", aggregator_id),
        ("federation_uuid", federation_uuid),
        ("collaborator_name", collaborator_name),
    ):
        if not text:
            problems.append(f"{label} must not be empty")
    if not 0 < aggregator_port <= MAX_PORT:
        problems.append(f"aggregator_port must be 1-{MAX_PORT}, got {aggregator_port}")
    if tls:
        missing = [label for label, path in files.items() if path is None]
        if missing:
            problems.append(f"tls=True needs {', '.join(missing)}")
    else:
        given = [label for label, path in files.items() if path is not None]
        if given:
            problems.append(f"tls=False but {', '.join(given)} given; set tls=True to use them")
    if max_retries is not None and max_retries < 0:
        problems.append(f"max_retries must be >= 0 or None, got {max_retries}")
    if max_wait_time is not None and not max_wait_time > 0:
        problems.append(f"max_wait_time must be > 0 or None, got {max_wait_time}")
    if not deadline > 0:
        problems.append(f"deadline must be > 0 seconds, got {deadline}")
    if not backoff_initial >= 0:
        problems.append(f"backoff_initial must be >= 0 seconds, got {backoff_initial}")
    if not backoff_max >= backoff_initial:
        problems.append(
            f"backoff_max ({backoff_max}) must be >= backoff_initial ({backoff_initial})"
        )
    if not max_message_bytes > 0:
        problems.append(f"max_message_bytes must be > 0, got {max_message_bytes}")
    if not max_tensor_bytes > 0:
        problems.append(f"max_tensor_bytes must be > 0, got {max_tensor_bytes}")
    return problems
