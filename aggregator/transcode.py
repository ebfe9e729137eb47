"""A coded upload made raw: what a site sent in the plan's `compression.upload` code, decoded and
added back to the round's global model, written as the `TaskResults` it would have sent raw.

Everything after an upload is received (the store, its recovery after kill -9, the digests,
FedAvg) reads raw `TaskResults` files. A tensor's code travels after its data
(`foedus.protos.codec`), so `foedus.aggregator.upload` spools the upload as it arrives and,
when a tensor came coded, has `transcode` write a new file from that spool: the head again, raw
tensors' bytes as they are, and each coded tensor decoded from its payload's bytes in the spool
a slice at a time (`SLICE_BYTES` of values), its base (the round's global model as the site
received it) added back:

* ``lossless``: chunk by chunk, each chunk's header checked before it is inflated (one that
  would inflate past its place is refused first), its bytes XORed with the base's;
* ``bfloat16``, ``int8``: a slice of values decoded, plus the base's in float32;
* ``topk``: the payload read whole (its size first checked against the most the plan's
  fraction gives), its kept values placed a slice at a time, plus the base's in float32.

Memory stays at a few MB an upload whatever the model's size; a topk payload and its positions,
and an int8 payload's scales (1.6 % of it), are held whole. NaN and infinities are looked for in
the values written, base added.

An OpenFL 1.9 collaborator's tensors in one of its own compression pipelines (no `foedus_code`:
recognised by `foedus.compression.openfl.openfl_pipeline` from the tags and the metadata) are
made raw here too: its payload read whole (OpenFL sends each tensor in one message) and decoded
by `decode_openfl_tensor`, and a `delta` (OpenFL's `use_delta_updates`) added back to the round's
global model as OpenFL's collaborators receive it: raw (`GetAggregatedTensor`). Eden and unknown
pipelines are refused by name (`UnsupportedPipelineError`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from foedus.aggregator.records import Array
from foedus.compression.codes import TOPK_MAX_FRACTION, Code
from foedus.compression.errors import CompressedFormatError, CompressedTooLargeError
from foedus.compression.lossless import (
    HEADER_BYTES,
    check_header,
    chunk_bytes,
    chunk_sizes,
    decompress_chunk_into,
)
from foedus.compression.openfl import (
    Metadata,
    Pipeline,
    check_decodable,
    decode_openfl_tensor,
    openfl_pipeline,
)
from foedus.compression.quantize import (
    INT8_HEADER_BYTES,
    bfloat16_decode,
    int8_dequantize,
    int8_layout,
    int8_scales,
)
from foedus.compression.topk import kept_count, topk_kept, topk_max_size
from foedus.plans.schema import CodeSettings
from foedus.protos import aggregator_pb2, base_pb2
from foedus.protos.codec import (
    COMPRESSED_TAG,
    LOSSY_TAG,
    MAX_DIMENSIONS,
    CodedLayout,
    TensorFormatError,
    TensorTooLargeError,
    all_finite,
    coded_layout,
    frame_around,
    tensor_code,
)
from foedus.protos.dtypes import FLOAT32, is_float
from foedus.protos.results_reader import TENSORS_FIELD, Head
from foedus.refusals.errors import InvalidRequestError, StorageError

logger = logging.getLogger(__name__)

# The global model's tensor a coded tensor of this name is a delta from; None: not in the model.
Base = Callable[[str], Array | None]
SLICE_BYTES: Final = 1024 * 1024  # decoded values written at a time
_SLICE_VALUES: Final = SLICE_BYTES // 4  # of float32
DELTA_TAG: Final = "delta"  # OpenFL's tag of a delta from the round's model (use_delta_updates)


class Sink(Protocol):
    """Where the raw upload is written (`foedus.aggregator.upload`'s spool): bytes appended."""

    @property
    def size(self) -> int:
        """The bytes written so far."""
        ...

    def write(self, chunk: bytes | memoryview) -> None:
        """Append `chunk`."""
        ...


@dataclass(frozen=True)
class OpenflLayout:
    """What an OpenFL pipeline's tensor claims, checked: its pipeline, its declared shape, whether
    it is a delta, and the most bytes its decoded float32 values may take."""

    pipeline: Pipeline
    shape: tuple[int, ...]
    delta: bool
    max_bytes: int


@dataclass(frozen=True)
class Spooled:
    """One tensor as it lies in the spool of the upload as sent: `layout` None for raw values."""

    meta: base_pb2.NamedTensor  # every field but data_bytes
    data_offset: int | None
    data_size: int
    layout: CodedLayout | OpenflLayout | None


@dataclass(frozen=True)
class Placed:
    """One tensor as it lies in the raw file: its metadata with no code, where its values are,
    and (decoded ones) whether they are all finite; None for raw tensors, checked as they came."""

    meta: base_pb2.NamedTensor
    data_offset: int | None
    data_size: int
    finite: bool | None


def no_base(name: str) -> None:
    """No global model to add deltas to: a receiver that takes raw tensors only."""
    return None


def check_coded(
    meta: base_pb2.NamedTensor, upload: CodeSettings, *, in_model: bool, max_tensor_bytes: int
) -> CodedLayout:
    """The layout of a coded tensor, checked when it ends (its code is then known): the plan's
    upload code, a delta, a tensor of the global model; `InvalidRequestError` otherwise."""
    name, code = meta.name, tensor_code(meta)
    if code is not upload.code:
        raise InvalidRequestError(
            f"tensor {name!r} is coded {code}, where the plan's compression.upload is {upload.code}"
        )
    if not meta.foedus_delta:
        raise InvalidRequestError(
            f"tensor {name!r} is coded {code} but is not a delta (foedus_delta): an upload's "
            "coded tensors are deltas from the round's global model"
        )
    if not in_model:
        raise InvalidRequestError(
            f"tensor {name!r} is coded {code} but is not in the global model: only the model's "
            "tensors travel coded, metrics raw"
        )
    return coded_layout(meta, max_bytes=max_tensor_bytes)


def is_openfl_coded(meta: base_pb2.NamedTensor) -> bool:
    """Whether a tensor with no `foedus_code` is not plain values: an OpenFL pipeline's output
    (tag `lossy_compressed`, more than one metadata entry) or a delta (`use_delta_updates`)."""
    return not meta.foedus_code and (
        LOSSY_TAG in meta.tags or DELTA_TAG in meta.tags or len(meta.transformer_metadata) > 1
    )


def check_openfl(
    meta: base_pb2.NamedTensor, *, in_model: bool, max_tensor_bytes: int, max_small_bytes: int
) -> OpenflLayout:
    """The layout of an OpenFL pipeline's tensor, checked when it ends: a shipped pipeline whose
    format is fixed (else `UnsupportedPipelineError`, naming it), float32, a delta of a model
    tensor only; a tensor not in the model (a metric) decodes to `max_small_bytes` at most."""
    name = meta.name
    metadata = openfl_metadata(meta)
    try:
        pipeline = openfl_pipeline(list(meta.tags), metadata)
        check_decodable(pipeline)  # Eden: told now, before the rest of the upload arrives
    except CompressedFormatError as error:
        raise type(error)(f"tensor {name!r}: {error}") from None
    if meta.foedus_dtype:
        raise TensorFormatError(
            f"tensor {name!r}: an OpenFL pipeline's tensor is float32, not {meta.foedus_dtype!r}"
        )
    delta = DELTA_TAG in meta.tags
    if delta and not in_model:
        raise InvalidRequestError(
            f"tensor {name!r} is a delta (tag {DELTA_TAG!r}) but is not in the global model: "
            "only the model's tensors are sent as deltas"
        )
    shape = tuple(metadata[0].int_list)
    if len(shape) > MAX_DIMENSIONS or any(dimension < 0 for dimension in shape):
        raise TensorFormatError(f"tensor {name!r}: shape {shape} is not a tensor's")
    max_bytes = max_tensor_bytes if in_model else min(max_small_bytes, max_tensor_bytes)
    if math.prod(shape) * FLOAT32.itemsize > max_bytes:
        raise TensorTooLargeError(
            f"tensor {name!r}: shape {shape} of float32 is {math.prod(shape) * FLOAT32.itemsize} "
            f"bytes decoded, over the limit of {max_bytes} bytes"
        )
    return OpenflLayout(pipeline, shape, delta, max_bytes)


def openfl_metadata(meta: base_pb2.NamedTensor) -> list[Metadata]:
    """A tensor's `transformer_metadata`, copied out of its protobuf for `compression.openfl`."""
    return [
        Metadata(dict(entry.int_to_float), tuple(entry.int_list), tuple(entry.bool_list))
        for entry in meta.transformer_metadata
    ]


def transcode(
    source: Path,
    head: Head,
    tensors: Sequence[Spooled],
    sink: Sink,
    *,
    base: Base,
    upload: CodeSettings,
    raw_base: Base = no_base,
) -> list[Placed]:
    """Write the raw `TaskResults` of the upload spooled at `source` to `sink`; where each tensor
    went. `raw_base` is the global model as OpenFL's collaborators receive it (raw), which an
    OpenFL delta is added back to. Raises `InvalidRequestError` (`CompressedFormatError`,
    `CompressedTooLargeError`) for a coded tensor that cannot be decoded or added back,
    `StorageError` when files fail."""
    bases = [_base_for(t, base, raw_base) for t in tensors]
    sink.write(
        aggregator_pb2.TaskResults(
            header=head.header,
            round_number=head.round_number,
            task_name=head.task_name,
            data_size=head.data_size,
        ).SerializeToString(deterministic=True)
    )
    try:
        descriptor = os.open(source, os.O_RDONLY)
    except OSError as error:
        raise StorageError(f"{source}: cannot read: {error.strerror or error}") from None
    try:
        reader = _Reader(descriptor, source)
        placed = [
            _place(reader, tensor, flat, sink, upload)
            for tensor, flat in zip(tensors, bases, strict=True)
        ]
    finally:
        os.close(descriptor)
    _log_openfl(head, tensors)
    return placed


def _log_openfl(head: Head, tensors: Sequence[Spooled]) -> None:
    """Say which OpenFL pipelines an upload came in: an operator sees a peer's lossy updates."""
    layouts = [t.layout for t in tensors if isinstance(t.layout, OpenflLayout)]
    if layouts:
        logger.info(
            "%s's %s results of round %d: %d tensor(s) in OpenFL's %s decoded, %d of them "
            "deltas added back to the global model",
            head.header.sender,
            head.task_name,
            head.round_number,
            len(layouts),
            ", ".join(sorted({str(layout.pipeline) for layout in layouts})),
            sum(layout.delta for layout in layouts),
        )


def _base_for(tensor: Spooled, base: Base, raw_base: Base) -> npt.NDArray[np.generic] | None:
    """What a tensor's decoded values are added to, flat: None for raw values and non-deltas."""
    layout = tensor.layout
    if isinstance(layout, OpenflLayout):
        return _base_of(tensor.meta.name, FLOAT32, layout.shape, raw_base) if layout.delta else None
    if layout is None:
        return None
    return _base_of(tensor.meta.name, layout.dtype, layout.shape, base, layout.code)


def _base_of(
    name: str,
    dtype: np.dtype[np.generic],
    shape: tuple[int, ...],
    base: Base,
    code: Code | None = None,
) -> npt.NDArray[np.generic]:
    """The base of a coded tensor (or an OpenFL delta), flat, once it has its dtype and shape."""
    reference = base(name)
    if reference is None:
        what = f"coded {code}" if code is not None else f"a delta (tag {DELTA_TAG!r})"
        raise InvalidRequestError(
            f"tensor {name!r} is {what} but is not in the global model: only the "
            "model's tensors travel coded, metrics raw"
        )
    if reference.dtype != dtype or reference.shape != shape:
        raise InvalidRequestError(
            f"tensor {name!r} is {dtype}{list(shape)}, the global model's is "
            f"{reference.dtype}{list(reference.shape)}"
        )
    flat: npt.NDArray[np.generic] = np.ascontiguousarray(reference).reshape(-1)
    return flat


def _place(
    reader: _Reader,
    tensor: Spooled,
    flat: npt.NDArray[np.generic] | None,
    sink: Sink,
    upload: CodeSettings,
) -> Placed:
    """Write one tensor raw: its frame around its values, copied or decoded."""
    layout = tensor.layout
    if isinstance(layout, OpenflLayout):
        return _place_openfl(reader, tensor, layout, flat, sink)
    meta = tensor.meta if layout is None else _raw_meta(tensor.meta)
    size = tensor.data_size if layout is None else layout.nbytes
    head, tail = frame_around(TENSORS_FIELD, meta, size)
    sink.write(head)
    offset = sink.size
    finite = None
    if layout is None:
        reader.copy(tensor.data_offset or 0, size, sink)
    else:
        assert flat is not None
        payload = _Payload(reader, tensor.data_offset or 0, tensor.data_size, meta.name)
        finite = _DECODERS[layout.code](payload, layout, flat, sink, upload)
        if not is_float(layout.dtype):
            finite = None
    sink.write(tail)
    return Placed(meta, offset if size else None, size, finite)


def _place_openfl(
    reader: _Reader,
    tensor: Spooled,
    layout: OpenflLayout,
    flat: npt.NDArray[np.generic] | None,
    sink: Sink,
) -> Placed:
    """Write an OpenFL pipeline's tensor raw: decoded whole, a delta added to its base."""
    meta, name = tensor.meta, tensor.meta.name
    count = math.prod(layout.shape)
    if flat is not None:
        count = flat.size  # the model's: the declared shape was checked equal to it
    data = reader.read(tensor.data_offset or 0, tensor.data_size) if tensor.data_size else b""
    try:
        values = decode_openfl_tensor(
            list(meta.tags), openfl_metadata(meta), data, count=count, limit=layout.max_bytes
        )
    except CompressedFormatError as error:
        raise type(error)(f"tensor {name!r}: {error}") from None
    finite = True
    if flat is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found just below
            np.add(flat, values, out=values, dtype=np.float32)
        finite = all_finite(values)
    raw = base_pb2.NamedTensor(
        name=name, round_number=meta.round_number, lossless=True, report=meta.report
    )
    raw.tags.extend(sorted({*meta.tags, COMPRESSED_TAG} - {LOSSY_TAG, DELTA_TAG}))
    raw.transformer_metadata.add().int_list.extend(layout.shape)
    head, tail = frame_around(TENSORS_FIELD, raw, values.nbytes)
    sink.write(head)
    offset = sink.size
    sink.write(values.view(np.uint8).data)
    sink.write(tail)
    return Placed(raw, offset if values.nbytes else None, values.nbytes, finite)


def _raw_meta(meta: base_pb2.NamedTensor) -> base_pb2.NamedTensor:
    """A coded tensor's metadata as its raw values' (`encode_tensor`'s): no code, no delta."""
    raw = base_pb2.NamedTensor()
    raw.CopyFrom(meta)
    raw.ClearField("foedus_code")
    raw.ClearField("foedus_delta")
    raw.lossless = True
    tags = sorted({*raw.tags, COMPRESSED_TAG} - {LOSSY_TAG})
    del raw.tags[:]
    raw.tags.extend(tags)
    return raw


class _Reader:
    """Reads ranges of the spooled upload by offset."""

    def __init__(self, descriptor: int, path: Path) -> None:
        self._descriptor = descriptor
        self._path = path

    def read(self, offset: int, size: int) -> bytes:
        """Exactly `size` bytes from `offset`."""
        try:
            data = os.pread(self._descriptor, size, offset)
        except OSError as error:
            raise StorageError(f"{self._path}: cannot read: {error.strerror or error}") from None
        if len(data) != size:  # a regular file gives all but past its end
            raise StorageError(f"{self._path}: ends before byte {offset + size}")
        return data

    def copy(self, offset: int, size: int, sink: Sink) -> None:
        """Append `size` bytes from `offset` to `sink`, a slice at a time."""
        for start in range(offset, offset + size, SLICE_BYTES):
            sink.write(self.read(start, min(SLICE_BYTES, offset + size - start)))


@dataclass(frozen=True)
class _Payload:
    """A coded tensor's payload: `size` bytes at `offset` of the spool."""

    reader: _Reader
    offset: int
    size: int
    name: str

    def read(self, start: int, size: int) -> bytes:
        """`size` bytes from `start` within the payload."""
        return self.reader.read(self.offset + start, size)


Decoder = Callable[[_Payload, CodedLayout, npt.NDArray[np.generic], Sink, CodeSettings], bool]


def _lossless(
    payload: _Payload,
    layout: CodedLayout,
    flat: npt.NDArray[np.generic],
    sink: Sink,
    upload: CodeSettings,
) -> bool:
    """Inflate chunk by chunk, each XORed with the base's bytes (exact)."""
    name, itemsize = payload.name, layout.dtype.itemsize
    base_bytes = flat.view(np.uint8)
    sizes = list(chunk_sizes(layout.nbytes, itemsize))
    out = np.empty(min(layout.nbytes, chunk_bytes(itemsize)), np.uint8)
    position = done = 0
    finite = True
    for number, raw in enumerate(sizes):
        if payload.size - position < HEADER_BYTES:
            raise CompressedFormatError(
                f"lossless tensor {name!r}: its {payload.size} bytes end inside chunk {number} "
                f"of {len(sizes)}"
            )
        header = payload.read(position, HEADER_BYTES)
        length = check_header(header, expected_bytes=raw, itemsize=itemsize, tensor=name)
        if payload.size - position < length:
            raise CompressedFormatError(
                f"lossless tensor {name!r}: its {payload.size} bytes end inside chunk {number} "
                f"of {len(sizes)}"
            )
        target = out[:raw]
        decompress_chunk_into(payload.read(position, length), target.data, itemsize, tensor=name)
        np.bitwise_xor(target, base_bytes[done : done + raw], out=target)
        finite = finite and all_finite(target.view(layout.dtype))
        sink.write(target.data)
        position += length
        done += raw
    if position != payload.size:
        raise CompressedFormatError(
            f"lossless tensor {name!r}: {payload.size - position} bytes past its {len(sizes)} "
            "chunks"
        )
    return finite


def _bfloat16(
    payload: _Payload,
    layout: CodedLayout,
    flat: npt.NDArray[np.generic],
    sink: Sink,
    upload: CodeSettings,
) -> bool:
    """Decode 2-byte values a slice at a time, each added to the base's."""
    count = layout.count
    if payload.size != 2 * count:
        raise CompressedFormatError(
            f"bfloat16 payload of tensor {payload.name!r}: {payload.size} bytes where {count} "
            f"values need {2 * count}"
        )

    def decoded(start: int, size: int) -> npt.NDArray[np.float32]:
        return bfloat16_decode(payload.read(2 * start, 2 * size), size, name=payload.name)

    return _added_slices(count, flat, sink, decoded)


def _int8(
    payload: _Payload,
    layout: CodedLayout,
    flat: npt.NDArray[np.generic],
    sink: Sink,
    upload: CodeSettings,
) -> bool:
    """Read the scales, then decode a slice of values at a time, each added to the base's."""
    name, count = payload.name, layout.count
    header = payload.read(0, min(INT8_HEADER_BYTES, payload.size))
    int8 = int8_layout(header, count, size=payload.size, name=name)
    scales = int8_scales(
        payload.read(INT8_HEADER_BYTES, int8.codes_start - INT8_HEADER_BYTES), int8, name=name
    )
    out = np.empty(min(count, _SLICE_VALUES), np.float32)

    def decoded(start: int, size: int) -> npt.NDArray[np.float32]:
        codes = payload.read(int8.codes_start + start, size)
        return int8_dequantize(codes, scales, int8, start, out=out[:size], name=name)

    return _added_slices(count, flat, sink, decoded)


def _topk(
    payload: _Payload,
    layout: CodedLayout,
    flat: npt.NDArray[np.generic],
    sink: Sink,
    upload: CodeSettings,
) -> bool:
    """Read the payload whole (small: checked first), then place its values a slice at a time."""
    name, count = payload.name, layout.count
    fraction = TOPK_MAX_FRACTION if upload.fraction is None else upload.fraction
    most = topk_max_size(count, kept_count(count, fraction))
    if payload.size > most:
        raise CompressedTooLargeError(
            f"topk payload of tensor {name!r}: {payload.size} bytes, more than the {most} that "
            f"the plan's compression.upload.fraction ({fraction:g}) of its {count} values takes "
            "at most"
        )
    positions, kept = topk_kept(payload.read(0, payload.size), count, name=name)
    out = np.empty(min(count, _SLICE_VALUES), np.float32)

    def decoded(start: int, size: int) -> npt.NDArray[np.float32]:
        values = out[:size]
        values.fill(0)
        low, high = np.searchsorted(positions, (start, start + size))
        values[positions[low:high] - start] = kept[low:high]
        return values

    return _added_slices(count, flat, sink, decoded)


def _added_slices(
    count: int,
    base: npt.NDArray[np.generic],
    sink: Sink,
    decoded: Callable[[int, int], npt.NDArray[np.float32]],
) -> bool:
    """Write base + `decoded(start, size)` a slice of `_SLICE_VALUES` at a time (the lossy
    codes' decoders, each its own `decoded`); whether every value is finite."""
    finite = True
    for start in range(0, count, _SLICE_VALUES):
        size = min(_SLICE_VALUES, count - start)
        finite = _added(decoded(start, size), base[start : start + size], sink) and finite
    return finite


def _added(decoded: npt.NDArray[np.float32], base: npt.NDArray[np.generic], sink: Sink) -> bool:
    """Write base + decoded (float32, in `decoded`); whether all of it is finite."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found just below
        np.add(base, decoded, out=decoded, dtype=np.float32)
    sink.write(decoded.view(np.uint8).data)
    return all_finite(decoded)


_DECODERS: dict[Code, Decoder] = {
    Code.LOSSLESS: _lossless,
    Code.BFLOAT16: _bfloat16,
    Code.INT8: _int8,
    Code.TOPK: _topk,
}
