"""The client's large payloads without copies: the stub's two framed methods, a tensor filled in place.

`Stub` is the generated stub plus `send_framed_results` (`SendLocalTaskResults` chunks already
serialized: `foedus.protos.stream.framed_chunks` frames the upload once, around slices of the
arrays) and `get_model_chunks` (`GetAggregatedModel`'s data chunks read in place by
`foedus.protos.stream.parse_model_chunk`), where protobuf would copy each twice. `Filling` is one
streamed tensor being filled with its data as the chunks arrive.
"""

from __future__ import annotations

import grpc
import numpy as np
import numpy.typing as npt

from foedus.collaborator.errors import ResponseValidationError
from foedus.protos import aggregator_pb2
from foedus.protos.aggregator_pb2_grpc import AggregatorStub
from foedus.protos.codec import tensor_bytes
from foedus.protos.stream import parse_model_chunk

_SEND_RESULTS = "/openfl.aggregator.Aggregator/SendLocalTaskResults"
_GET_MODEL = "/openfl.aggregator.Aggregator/GetAggregatedModel"


class Filling:
    """A streamed tensor being filled with its data as the chunks arrive."""

    def __init__(self, name: str, array: npt.NDArray[np.generic]) -> None:
        self.name = name
        self.array = array
        self._bytes = tensor_bytes(array)
        self._filled = 0

    def fill(self, data: bytes | memoryview) -> None:
        """Append one chunk's data; more than the tensor holds is the aggregator's error."""
        end = self._filled + len(data)
        if end > len(self._bytes):
            raise ResponseValidationError(
                f"the aggregator sent more data for {self.name!r} than its {len(self._bytes)} bytes"
            )
        self._bytes[self._filled : end] = data
        self._filled = end

    def done(self) -> npt.NDArray[np.generic]:
        """The tensor, read-only, once every byte arrived."""
        if self._filled != len(self._bytes):
            raise ResponseValidationError(
                f"the aggregator sent {self._filled} of the {len(self._bytes)} bytes of "
                f"{self.name!r}"
            )
        self.array.flags.writeable = False  # as the unary path's arrays over their bytes
        return self.array


class Stub(AggregatorStub):
    """The generated stub, plus two methods that spare copies of large payloads (see the module)."""

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
