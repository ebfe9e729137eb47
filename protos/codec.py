"""numpy arrays <-> `NamedTensor`, validated before anything is trusted.

Two encodings share the message:

* OpenFL's lossless encoding, used for every float32 array: `data_bytes` holds the array as
  little-endian float32 in C order, `transformer_metadata[0].int_list` holds the shape (empty for
  a scalar), `lossless` is true and the tags include ``compressed``. OpenFL 1.9 peers read it.
* foedus's exact-dtype encoding, for every other dtype: the same layout in the array's own
  little-endian dtype, marked by the extension field `foedus_dtype` (numpy's dtype string, such as
  ``<f8`` or ``<i8``). An empty `foedus_dtype` means OpenFL's float32 encoding. OpenFL would cast
  such arrays to float32 silently; foedus never casts unless the caller asks (`as_float32`).
  bfloat16, which numpy only knows through `ml_dtypes` (its dtype string ``<V2`` says nothing),
  travels as its 2-byte values under the name ``bfloat16`` and decodes to `ml_dtypes.bfloat16`.

Decoding never unpickles and never allocates from a claimed size: the shape's element count times
the item size must equal the byte count, and that count must be within the caller's limit.

Between foedus peers a tensor may carry one of the plan's `compression` codes (issue #24): the
extension field `foedus_code` names it (`foedus.compression.codes.Code`), `foedus_dtype` and the
shape stay the decoded tensor's, and `data_bytes` hold the code's payload (`coded_layout` reads
and checks that metadata, `coded_tensor_frame` writes it around a payload). Each code's payload:

* ``lossless``: the tensor's bytes cut by `foedus.compression.lossless.chunk_sizes`, each piece
  one Blosc2 chunk (`compress_chunk`), end to end; any dtype. The tag ``compressed`` and
  `lossless` true, as OpenFL's lossless encoding.
* ``bfloat16``, ``int8``, ``topk``: `foedus.compression.quantize` and `.topk`'s payload of the
  values flattened in C order; float32 tensors only. The tag ``lossy_compressed`` and
  `lossless` false, as OpenFL marks its lossy pipelines.

With `foedus_delta` (an upload's) the decoded values are a delta from the global model of
`round_number` as the site received it, which the receiver adds back: for ``lossless`` the
XOR of the values' bits (exact: the same bits come back), for the lossy codes trained - base
computed in float32 (`base + decoded` in float32 gives the values back, up to the code's loss).
A coded tensor is never read as raw values: `tensor_layout` refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict, TypeVar, Unpack

import numpy as np
import numpy.typing as npt

from foedus.compression.codes import Code
from foedus.protos import base_pb2
from foedus.protos.dtypes import (
    BFLOAT16,
    EXACT_DTYPES,
    FLOAT32,
    bfloat16_dtype,
    is_float,
    wire_dtype,
)
from foedus.protos.stream import MadeBytes, field_prefix
from foedus.refusals.errors import InvalidRequestError, LimitExceededError

COMPRESSED_TAG = "compressed"
LOSSY_TAG = "lossy_compressed"
MAX_DIMENSIONS = 32


class TensorFormatError(InvalidRequestError, ValueError):
    """A tensor's bytes, shape or dtype cannot be trusted; the message says which and why."""


class TensorTooLargeError(TensorFormatError, LimitExceededError):
    """A tensor claims more bytes than the receiver accepts."""


class TensorFields(TypedDict, total=False):
    """The fields `encode_tensor` passes on to `encode_tensor_meta_into`, which has their defaults."""

    round_number: int
    tags: Iterable[str]
    report: bool
    as_float32: bool


def encode_tensor(
    name: str, array: npt.ArrayLike, **fields: Unpack[TensorFields]
) -> base_pb2.NamedTensor:
    """Encode `array` exactly (float32 the OpenFL way); `as_float32` asks for a cast for OpenFL."""
    tensor = base_pb2.NamedTensor()
    data = encode_tensor_meta_into(tensor, name, array, **fields)
    # protobuf takes only `bytes`, so one copy out of the array is the floor.
    tensor.data_bytes = data.tobytes()
    return tensor


def encode_tensor_meta_into(
    tensor: base_pb2.NamedTensor,
    name: str,
    array: npt.ArrayLike,
    *,
    round_number: int = 0,
    tags: Iterable[str] = (),
    report: bool = False,
    as_float32: bool = False,
) -> npt.NDArray[np.generic]:
    """Every field of `array`'s encoding but `data_bytes`; returns the array those bytes are.

    The returned array is little-endian and C-ordered (the input itself when it already is), so
    `tensor_bytes` of it is `data_bytes` without a copy: streams and files send it as it is.
    """
    values = np.asarray(array)
    wire_name = wire_dtype(values.dtype)
    if wire_name is None:
        raise TensorFormatError(f"tensor {name!r}: dtype {values.dtype} cannot be sent")
    if as_float32:
        dtype, wire_name = FLOAT32, ""
    else:  # bfloat16 has no byte order to numpy: its values are in the machine's (little-endian)
        dtype = values.dtype if wire_name == BFLOAT16 else values.dtype.newbyteorder("<")
    data = np.asarray(values, dtype=dtype, order="C")  # keeps 0-d arrays 0-d
    tensor.name = name
    tensor.round_number = round_number
    tensor.lossless = True
    tensor.report = report
    tensor.tags.extend(sorted({*tags, COMPRESSED_TAG}))
    tensor.transformer_metadata.add().int_list.extend(data.shape)
    tensor.foedus_dtype = wire_name
    return data


def tensor_bytes(data: npt.NDArray[np.generic]) -> memoryview:
    """The bytes of a C-ordered array as a flat memoryview, without a copy."""
    return data.reshape(-1).view(np.uint8).data


_Values = TypeVar("_Values", memoryview, MadeBytes)


@dataclass(frozen=True)
class TensorFrame:
    """A tensor encoded as a field of a parent message, around its values: `head`, then the
    bytes of `data` (C order, little-endian: `tensor_bytes`), then `tail`."""

    head: bytes
    data: npt.NDArray[np.generic]
    tail: bytes

    def parts(self) -> list[bytes | memoryview]:
        """The pieces to write, in order, the values a memoryview of `data`."""
        return self._around(tensor_bytes(self.data))

    def parts_made(self, made: MadeBytes) -> list[bytes | MadeBytes]:
        """The pieces to write, in order, with `made` in place of `data`'s bytes: as many bytes,
        made as they are sent (`data` clipped: `foedus.privacy.clipping.ClippedValues`)."""
        if len(made) != self.data.nbytes:
            raise ValueError(f"{len(made)} bytes made for the {self.data.nbytes} of the tensor")
        return self._around(made)

    def _around(self, values: _Values) -> list[bytes | _Values]:
        """`head`, `values` (unless the tensor is empty), `tail` (unless empty)."""
        parts: list[bytes | _Values] = [self.head]
        if self.data.nbytes:
            parts.append(values)
        if self.tail:
            parts.append(self.tail)
        return parts


def tensor_field_frame(
    field_number: int,
    name: str,
    array: npt.ArrayLike,
    *,
    round_number: int = 0,
    tags: Iterable[str] = (),
    report: bool = False,
) -> TensorFrame:
    """`array` encoded as field `field_number` of a parent message, its values left in the array.

    The same bytes as `encode_tensor` put into the parent and serialized deterministically
    (fields in number order: `data_bytes` (7) between those before it and `foedus_dtype`
    (1000)), but the values are not copied: files and streams are written from them as they
    are (or, where they are not in memory yet, to where they go), and a large tensor costs no
    serialization. The values of an array that is already C-ordered and little-endian are not
    even read.
    """
    header = base_pb2.NamedTensor()
    data = encode_tensor_meta_into(
        header, name, array, round_number=round_number, tags=tags, report=report
    )
    head, tail = frame_around(field_number, header, data.nbytes)
    return TensorFrame(head, data, tail)


_DATA_BYTES_FIELD = base_pb2.NamedTensor.DATA_BYTES_FIELD_NUMBER
# The fields numbered after `data_bytes`, written after the data (the order of a serializer).
_TRAILING_FIELDS = ("foedus_dtype", "foedus_code", "foedus_delta")


def frame_around(field_number: int, tensor: base_pb2.NamedTensor, size: int) -> tuple[bytes, bytes]:
    """The bytes before and after the `size` data bytes of `tensor` (its other fields, its
    `data_bytes` ignored) as field `field_number` of a parent message, serialized
    deterministically: the fields numbered before `data_bytes`, then the data's key and length,
    then (the tail) `foedus_dtype`, `foedus_code` and `foedus_delta`."""
    header = base_pb2.NamedTensor()
    header.CopyFrom(tensor)
    trailer = base_pb2.NamedTensor()
    for name in _TRAILING_FIELDS:
        setattr(trailer, name, getattr(tensor, name))
        header.ClearField(name)
    header.ClearField("data_bytes")
    head = header.SerializeToString(deterministic=True)
    tail = trailer.SerializeToString(deterministic=True)
    field = field_prefix(_DATA_BYTES_FIELD, size) if size else b""  # proto3 omits b""
    total = len(head) + len(field) + size + len(tail)
    return field_prefix(field_number, total) + head + field, tail


@dataclass(frozen=True)
class CodedLayout:
    """What a coded tensor's metadata claims, checked: the decoded tensor's dtype, shape and
    byte count, the code its payload is in, and whether it decodes to a delta."""

    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    nbytes: int  # of the decoded tensor: dtype x shape
    code: Code
    delta: bool

    @property
    def count(self) -> int:
        """The decoded tensor's number of values."""
        return math.prod(self.shape)


def tensor_code(tensor: base_pb2.NamedTensor) -> Code:
    """The code a tensor's `data_bytes` are in: `Code.NONE` for the raw values (no
    `foedus_code`), else the named one; an unknown name, or "none" spelt out, is refused."""
    if not tensor.foedus_code:
        return Code.NONE
    try:
        code = Code(tensor.foedus_code)
    except ValueError:
        code = Code.NONE
    if code is Code.NONE:
        known = ", ".join(str(code) for code in Code if code is not Code.NONE)
        raise TensorFormatError(
            f"tensor {tensor.name!r}: unknown code {tensor.foedus_code!r}; expected one of {known}"
        )
    return code


def coded_layout(tensor: base_pb2.NamedTensor, *, max_bytes: int) -> CodedLayout:
    """The checked layout of a coded tensor (`tensor_code` not `none`): its dtype and shape, as
    any tensor's, the decoded size within `max_bytes`, a lossy code on float32 values only."""
    code = tensor_code(tensor)
    name = tensor.name
    if code is Code.NONE:
        raise TensorFormatError(f"tensor {name!r}: not coded")
    if len(tensor.transformer_metadata) > 1:
        raise TensorFormatError(
            f"tensor {name!r}: {len(tensor.transformer_metadata)} transformer metadata entries "
            "where a coded tensor has one, its shape"
        )
    dtype, shape = _dtype_of(tensor), _shape_of(tensor)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise TensorTooLargeError(
            f"tensor {name!r}: shape {shape} of {dtype} is {nbytes} bytes decoded, over the "
            f"limit of {max_bytes} bytes"
        )
    if code.lossy and dtype != FLOAT32:
        raise TensorFormatError(f"tensor {name!r}: {code} codes float32 values, not {dtype}")
    return CodedLayout(dtype, shape, nbytes, code, tensor.foedus_delta)


def coded_tensor_frame(
    field_number: int,
    name: str,
    payload: bytes,
    *,
    dtype: np.dtype[np.generic],
    shape: tuple[int, ...],
    code: Code,
    delta: bool,
    round_number: int = 0,
    tags: Iterable[str] = (),
    report: bool = False,
) -> TensorFrame:
    """A tensor of `dtype` and `shape` coded `code` (its `payload`, see the module) as field
    `field_number` of a parent message: `tensor_field_frame`'s bytes, the payload as the data,
    `foedus_code` and `foedus_delta` after it with `foedus_dtype`."""
    if code is Code.NONE:
        raise ValueError("a coded tensor has a code: send the raw values with tensor_field_frame")
    wire_name = wire_dtype(dtype)
    if wire_name is None:
        raise TensorFormatError(f"tensor {name!r}: dtype {dtype} cannot be sent")
    header = base_pb2.NamedTensor(
        name=name,
        round_number=round_number,
        lossless=not code.lossy,
        report=report,
        foedus_dtype=wire_name,
        foedus_code=str(code),
        foedus_delta=delta,
    )
    header.tags.extend(sorted({*tags, LOSSY_TAG if code.lossy else COMPRESSED_TAG}))
    header.transformer_metadata.add().int_list.extend(shape)
    data = np.frombuffer(payload, dtype=np.uint8)
    head, tail = frame_around(field_number, header, data.size)
    return TensorFrame(head, data, tail)


def tensor_layout(
    tensor: base_pb2.NamedTensor, *, max_bytes: int
) -> tuple[np.dtype[np.generic], tuple[int, ...], int]:
    """The checked dtype, shape and byte count a tensor's metadata claims (not its data)."""
    name = tensor.name
    if tensor.foedus_code:
        raise TensorFormatError(
            f"tensor {name!r}: coded {tensor.foedus_code!r} (compression), which is not read here "
            "as raw values"
        )
    if LOSSY_TAG in tensor.tags:
        raise TensorFormatError(f"tensor {name!r}: lossy-compressed tensors are not supported")
    if len(tensor.transformer_metadata) > 1:  # RandomShiftPipeline's values are value + shift
        raise TensorFormatError(
            f"tensor {name!r}: {len(tensor.transformer_metadata)} transformer metadata entries "
            f"where OpenFL's NoCompressionPipeline writes one; another pipeline's values (such as "
            f"RandomShiftPipeline's) are not read as they are: set compression_pipeline to "
            f"NoCompressionPipeline in the collaborator's plan"
        )
    dtype = _dtype_of(tensor)
    shape = _shape_of(tensor)
    expected = math.prod(shape) * dtype.itemsize
    if expected > max_bytes:
        raise TensorTooLargeError(
            f"tensor {name!r}: shape {shape} of {dtype} is {expected} bytes, over the limit of "
            f"{max_bytes} bytes"
        )
    return dtype, shape, expected


def empty_tensor(
    tensor: base_pb2.NamedTensor, size: int, *, max_bytes: int
) -> npt.NDArray[np.generic]:
    """A new array for a tensor whose `size` data bytes arrive apart (streamed), checked first."""
    dtype, shape, expected = tensor_layout(tensor, max_bytes=max_bytes)
    if size != expected:
        raise TensorFormatError(
            f"tensor {tensor.name!r}: shape {shape} of {dtype} needs {expected} bytes, "
            f"{size} are announced"
        )
    try:
        return np.empty(shape, dtype=dtype)
    except ValueError as error:  # an empty shape whose other dimensions overflow numpy's size
        raise TensorFormatError(
            f"tensor {tensor.name!r}: shape {shape} is unusable: {error}"
        ) from None


def decode_tensor(tensor: base_pb2.NamedTensor, *, max_bytes: int) -> npt.NDArray[np.generic]:
    """Decode a tensor after checking its dtype, shape and byte count; a read-only array over its bytes."""
    dtype, shape, expected = tensor_layout(tensor, max_bytes=max_bytes)
    data = tensor.data_bytes  # read once: every read of a bytes field is a fresh copy
    actual = len(data)
    if actual != expected:
        raise TensorFormatError(
            f"tensor {tensor.name!r}: shape {shape} of {dtype} needs {expected} bytes, got {actual}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as error:  # an empty shape whose other dimensions overflow numpy's size
        raise TensorFormatError(
            f"tensor {tensor.name!r}: shape {shape} is unusable: {error}"
        ) from None


def _dtype_of(tensor: base_pb2.NamedTensor) -> np.dtype[np.generic]:
    """The tensor's dtype: its `foedus_dtype` if marked, else OpenFL's float32."""
    if not tensor.foedus_dtype:
        return FLOAT32
    if tensor.foedus_dtype == BFLOAT16:
        return bfloat16_dtype()
    if tensor.foedus_dtype not in EXACT_DTYPES:
        raise TensorFormatError(
            f"tensor {tensor.name!r}: unknown dtype {tensor.foedus_dtype!r}; expected one of "
            f"{', '.join(sorted({*EXACT_DTYPES, BFLOAT16}))}"
        )
    return np.dtype(tensor.foedus_dtype)


def _shape_of(tensor: base_pb2.NamedTensor) -> tuple[int, ...]:
    """The shape in the first transformer metadata entry, checked for sense."""
    if not tensor.transformer_metadata:
        raise TensorFormatError(f"tensor {tensor.name!r}: no transformer metadata, so no shape")
    shape = tuple(tensor.transformer_metadata[0].int_list)
    if len(shape) > MAX_DIMENSIONS:
        raise TensorFormatError(
            f"tensor {tensor.name!r}: {len(shape)} dimensions, more than {MAX_DIMENSIONS}"
        )
    if any(dim < 0 for dim in shape):
        raise TensorFormatError(f"tensor {tensor.name!r}: negative dimension in shape {shape}")
    return shape


def all_finite(array: npt.NDArray[np.generic]) -> bool:
    """Whether no value is NaN or infinite (integers and bools always are finite).

    A sum first, since NaN and infinities survive it; element by element only if it is not.
    """
    if array.dtype.kind != "c" and not is_float(array.dtype):
        return True
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow only means: look closer
        if math.isfinite(abs(complex(np.add.reduce(array, axis=None)))):
            return True
    return bool(np.isfinite(array).all())
