"""A streamed global tensor received in the plan's download code, decoded as its chunks arrive.

foedus's aggregator streams each tensor of the model in `compression.download`'s code
(`foedus.aggregator.encoded_model`; the payloads are said in `foedus.protos.codec`). The client
allocates the decoded tensor from its metadata (`coded_layout`, within `max_tensor_bytes`), never
from a size it is told, and decodes each chunk's bytes into it as they come, whatever they are cut
into: `lossless` chunk by chunk (`TensorDecompressor`, each chunk checked before it is inflated
into its place; as the XOR with a tensor the collaborator holds when the aggregator sends the
change, the held bits XORed back once the tensor is in), `int8` a part at a time (its header, then
every block's scale, then the values straight into the array), `bfloat16` on 2-byte edges. A
payload longer or shorter than its metadata announced, one that does not fit the tensor, or a chunk
that would inflate past its place is `ResponseValidationError` naming the tensor; nothing more is
held than one lossless chunk, or int8's scales.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from foedus.collaborator.errors import ResponseValidationError
from foedus.collaborator.streaming import Filling
from foedus.compression.codes import Code
from foedus.compression.errors import CompressedFormatError
from foedus.compression.lossless import MAX_OVERHEAD, TensorDecompressor, chunk_bytes
from foedus.compression.quantize import (
    BFLOAT16_BYTES,
    INT8_HEADER_BYTES,
    Int8Layout,
    bfloat16_decode,
    int8_dequantize,
    int8_layout,
    int8_scales,
)
from foedus.protos import base_pb2
from foedus.protos.codec import (
    CodedLayout,
    TensorFormatError,
    coded_layout,
    empty_tensor,
    tensor_bytes,
    tensor_code,
)

BAD_TENSOR = "the aggregator sent a bad tensor"


class Decoding:
    """A streamed tensor's payload in a code, decoded into its array as the chunks arrive: no
    more than the `data_size` bytes its metadata announced, and all of them."""

    def __init__(self, name: str, array: npt.NDArray[np.generic], data_size: int) -> None:
        self.name = name
        self.array = array
        self.data_size = data_size
        self._received = 0

    def fill(self, data: bytes | memoryview) -> None:
        """Decode the next chunk's bytes into the array."""
        end = self._received + len(data)
        if end > self.data_size:
            raise ResponseValidationError(
                f"the aggregator sent more data for {self.name!r} than the {self.data_size} "
                "bytes it announced"
            )
        self._received = end
        try:
            self._feed(memoryview(data).cast("B"))
        except CompressedFormatError as error:
            raise ResponseValidationError(f"{BAD_TENSOR}: {error}") from None

    def done(self) -> npt.NDArray[np.generic]:
        """The decoded tensor, read-only, once the whole payload arrived."""
        if self._received != self.data_size:
            raise ResponseValidationError(
                f"the aggregator sent {self._received} of the {self.data_size} bytes of "
                f"{self.name!r}"
            )
        try:
            self._finish()
        except CompressedFormatError as error:
            raise ResponseValidationError(f"{BAD_TENSOR}: {error}") from None
        self.array.flags.writeable = False  # as a raw tensor's (`Filling.done`)
        return self.array

    def _feed(self, data: memoryview) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Check that what arrived is the whole tensor (the payload's size alone may not say)."""


def filling(
    meta: base_pb2.NamedTensor,
    data_size: int,
    *,
    max_bytes: int,
    held: Mapping[str, npt.NDArray[np.generic]] | None = None,
) -> Filling | Decoding:
    """What takes a streamed tensor's data: its raw values filled in place, or its payload in a
    code decoded; its metadata checked first (`ResponseValidationError`). `held`: the tensors
    the collaborator named in its request (`HeldModel`), from which a `lossless` tensor may come
    as the XOR of its bits with the held one's."""
    try:
        if tensor_code(meta) is Code.NONE:
            return Filling(meta.name, empty_tensor(meta, data_size, max_bytes=max_bytes))
        layout = coded_layout(meta, max_bytes=max_bytes)
    except TensorFormatError as error:
        raise ResponseValidationError(f"{BAD_TENSOR}: {error}") from None
    name = meta.name
    base = None
    if layout.delta:
        base = None if held is None else held.get(name)
        if layout.code is not Code.LOSSLESS or base is None:
            raise ResponseValidationError(
                f"{BAD_TENSOR}: tensor {name!r} is a delta ({layout.code}) from a model this "
                "collaborator does not hold"
            )
        if base.dtype != layout.dtype or base.shape != layout.shape:
            raise ResponseValidationError(
                f"{BAD_TENSOR}: tensor {name!r} is a delta for {layout.dtype}{list(layout.shape)}, "
                f"and the held model's is {base.dtype}{list(base.shape)}"
            )
    if layout.code not in _DECODINGS:
        raise ResponseValidationError(
            f"{BAD_TENSOR}: tensor {name!r} is coded {layout.code}, which is for uploads only "
            "(a download sends the whole model)"
        )
    try:
        array = np.empty(layout.shape, dtype=layout.dtype)
    except ValueError as error:  # an empty shape whose other dimensions overflow numpy's size
        raise ResponseValidationError(
            f"{BAD_TENSOR}: tensor {name!r}: shape {layout.shape} is unusable: {error}"
        ) from None
    if base is not None:
        return _LosslessDelta(name, array, data_size, layout, base)
    return _DECODINGS[layout.code](name, array, data_size, layout)


class _Lossless(Decoding):
    """`lossless`: the tensor's bytes in Blosc2 chunks, each inflated into its place."""

    def __init__(
        self, name: str, array: npt.NDArray[np.generic], data_size: int, layout: CodedLayout
    ) -> None:
        super().__init__(name, array, data_size)
        itemsize = layout.dtype.itemsize
        chunks = -(-layout.nbytes // chunk_bytes(itemsize))
        most = layout.nbytes + chunks * MAX_OVERHEAD
        if data_size > most:
            raise ResponseValidationError(
                f"{BAD_TENSOR}: tensor {name!r} announces {data_size} bytes, more than its "
                f"{chunks} lossless chunks of {layout.nbytes} bytes in all can take ({most})"
            )
        self._decompressor = TensorDecompressor(tensor_bytes(array), itemsize, tensor=name)

    def _feed(self, data: memoryview) -> None:
        self._decompressor.feed(data)

    def _finish(self) -> None:
        self._decompressor.finish()


class _LosslessDelta(_Lossless):
    """`lossless` with `foedus_delta`: the bits XOR the held model's tensor's, inflated into place
    as they come, the held bits XORed back once the whole payload is in."""

    def __init__(
        self,
        name: str,
        array: npt.NDArray[np.generic],
        data_size: int,
        layout: CodedLayout,
        base: npt.NDArray[np.generic],
    ) -> None:
        super().__init__(name, array, data_size, layout)
        self._base = base

    def _finish(self) -> None:
        super()._finish()
        bits = self.array.reshape(-1).view(np.uint8)  # a view: the array is new, C-ordered
        held = np.ascontiguousarray(self._base).reshape(-1).view(np.uint8)
        np.bitwise_xor(bits, held, out=bits)


class _Bfloat16(Decoding):
    """`bfloat16`: 2 bytes a value; a value cut by a chunk's end waits for its second byte."""

    def __init__(
        self, name: str, array: npt.NDArray[np.generic], data_size: int, layout: CodedLayout
    ) -> None:
        super().__init__(name, array, data_size)
        if data_size != BFLOAT16_BYTES * layout.count:
            raise ResponseValidationError(
                f"{BAD_TENSOR}: tensor {name!r} announces {data_size} bytes where bfloat16's "
                f"{layout.count} values are {BFLOAT16_BYTES * layout.count}"
            )
        self._values = array.reshape(-1)  # a view: the array is new and C-ordered
        self._decoded = 0
        self._odd = b""  # the first byte of a value a chunk cut

    def _feed(self, data: memoryview) -> None:
        if self._odd and data.nbytes:
            self._decode(memoryview(self._odd + data[:1]))
            self._odd, data = b"", data[1:]
        whole = data.nbytes - data.nbytes % BFLOAT16_BYTES
        self._decode(data[:whole])
        self._odd = bytes(data[whole:])

    def _decode(self, part: memoryview) -> None:
        count = part.nbytes // BFLOAT16_BYTES
        if count:
            at = self._decoded
            self._values[at : at + count] = bfloat16_decode(part, count, name=self.name)
            self._decoded = at + count


class _Int8(Decoding):
    """`int8`: its header and every block's scale (kept), then the values dequantized into
    the array as they come."""

    def __init__(
        self, name: str, array: npt.NDArray[np.generic], data_size: int, layout: CodedLayout
    ) -> None:
        super().__init__(name, array, data_size)
        self._values = array.reshape(-1).view(np.float32)  # a view: the array is new, float32
        self._count = layout.count
        self._pending = bytearray()  # the header and the scales, until they are whole
        self._layout: Int8Layout | None = None  # from the header
        self._scales: tuple[Int8Layout, npt.NDArray[np.float32]] | None = None
        self._decoded = 0

    def _feed(self, data: memoryview) -> None:
        while data.nbytes:
            if self._scales is None:
                data = self._head(data)
                continue
            layout, scales = self._scales
            at, count = self._decoded, data.nbytes
            out = self._values[at : at + count]
            int8_dequantize(data, scales, layout, at, out=out, name=self.name)
            self._decoded, data = at + count, data[count:]

    def _head(self, data: memoryview) -> memoryview:
        """Take the header's and the scales' bytes from `data`; what follows them."""
        end = INT8_HEADER_BYTES if self._layout is None else self._layout.codes_start
        need = end - len(self._pending)
        self._pending += data[:need]
        if self._layout is None and len(self._pending) == INT8_HEADER_BYTES:
            self._layout = int8_layout(
                self._pending, self._count, size=self.data_size, name=self.name
            )
        layout = self._layout
        if layout is not None and len(self._pending) == layout.codes_start:
            scales = int8_scales(self._pending[INT8_HEADER_BYTES:], layout, name=self.name)
            self._scales = layout, scales
            self._pending = bytearray()
        return data[need:]

    def _finish(self) -> None:
        if self._layout is None:  # fewer bytes than a header arrived: int8_layout says so
            int8_layout(self._pending, self._count, size=self.data_size, name=self.name)


_DECODINGS: dict[Code, type[_Lossless | _Bfloat16 | _Int8]] = {
    Code.LOSSLESS: _Lossless,
    Code.BFLOAT16: _Bfloat16,
    Code.INT8: _Int8,
}
